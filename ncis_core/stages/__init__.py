"""One module per pipeline stage, mirroring the notebooks one to one (``NN_<stage>.ipynb``).

Each stage module has ``run(cfg, run_dir)`` plus the functions it is made of; it reads its inputs
and writes its artefacts through :mod:`ncis_core.runs`.
"""

__all__: list[str] = []
