"""The kit's pictures and the class explorer: one module per pipeline stage (= notebook).

``common`` (image grids, ``save_figure``), ``data``, ``embed``, ``cvpn``, ``maps`` (UMAP), ``generate``,
``classifier``, ``evaluate``, ``explorer`` (``07_explore``) and ``demo_generator``. Nothing is
imported here, so ``import ncis_core.viz.common`` pulls in neither umap-learn nor ipywidgets.
"""

__all__ = ["common", "data", "embed", "cvpn", "maps", "generate", "classifier", "evaluate", "explorer",
           "demo_generator"]
