"""One module per pipeline stage, mirroring the notebooks one to one (``NN_<stage>.ipynb``).

Each has ``run(cfg, run_dir)`` and its contract ``STAGE`` in :data:`ncis_core.runs.STAGES`; no stage
imports another. Nothing is imported here: import the stage a caller needs.
"""

__all__ = ["data_summary", "embed", "train_cvpn", "sample", "generate", "train_classifier", "evaluate"]


def __getattr__(name: str):
    if name in __all__:  # `ncis_core.stages.embed` without importing it first
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
