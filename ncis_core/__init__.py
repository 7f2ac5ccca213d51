"""ncis_core: NCIS (Non-Linear Outlier Synthesis for OOD detection) as a notebook-driven research kit.

The package holds the logic; ``notebooks/`` walks through the stages with pictures; papermill runs
the same notebooks headlessly (``python -m ncis_core run``). Modules are imported on demand, so
``import ncis_core`` stays light.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
