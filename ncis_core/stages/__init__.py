"""One module per pipeline stage, mirroring the notebooks one to one (``NN_<stage>.ipynb``).

Each stage module has ``run(cfg, run_dir)`` plus the functions it is made of, and declares next to
it what it reads and writes (``STAGE``, a :class:`~ncis_core.runs.Stage`); it reads its inputs and
writes its artefacts through :mod:`ncis_core.runs`. Importing this package registers every stage,
in order, in :data:`ncis_core.runs.STAGES`. :mod:`.command` is the stage modules' shared command
line (``python -m ncis_core.stages.<stage>``, also under ``accelerate launch``). :mod:`.train_many`
is stage 5 for many classifiers at once (``compare``'s trainings), made of stage 5's own pieces.
"""

from . import data_summary, embed, train_cvpn, sample, generate, train_classifier, evaluate  # noqa: F401

__all__ = ["data_summary", "embed", "train_cvpn", "sample", "generate", "train_classifier", "evaluate"]
