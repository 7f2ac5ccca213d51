"""The kit's pictures and the class explorer: one module per pipeline stage (= notebook).

=====================  ==========================================================================
module                 serves
=====================  ==========================================================================
``common``             several stages: :func:`~ncis_core.viz.common.image_grid`,
                       :func:`~ncis_core.viz.common.save_figure` (every figure under ``figures/``)
``data``               stage 0, ``00_data``: images per class / OOD set, example rows
``embed``              stage 1, ``01_embed``: distances from the class tokens, embedding PCA
``cvpn``               stages 2 and 3, ``02_train_cvpn`` / ``03_sample_outliers``: cVPN losses,
                       PCA spectra, invariant energies, a class's PCA map with its outliers
``maps``               stages 1, 3 and 7: UMAP maps of the embeddings with outliers placed on them
                       (cached in ``RUN/cache/umap/``)
``generate``           stage 4, ``04_generate_outliers``: ordinary generations beside NCIS outliers
``classifier``         stage 5, ``05_train_classifier``: training curves per epoch
``evaluate``           stage 6, ``06_evaluate``: score histograms, ROC curves
``explorer``           ``07_explore``: the class explorer (ipywidgets) and its static twins
``demo_generator``     ``extras/train_demo_generator``: the generator's loss curves
=====================  ==========================================================================

Nothing is imported here, so ``import ncis_core.viz.common`` pulls in neither umap-learn nor
ipywidgets; import the module a notebook needs.

Example (a notebook's run folder is the one :func:`ncis_core.notebook.start` opened):
    >>> import tempfile
    >>> from ncis_core.config import load_config
    >>> from ncis_core.runs import RunDir
    >>> from ncis_core.viz import common, evaluate
    >>> run = RunDir.create(load_config("smoke", out=tempfile.mkdtemp()))
    >>> fig = evaluate.plot_roc({"energy/id-test": [3.0, 2.0], "energy/svhn": [1.0, 2.5]}, "energy")
    >>> common.save_figure(fig, run, "06_roc_energy.png").relative_to(run.root).as_posix()
    'figures/06_roc_energy.png'
"""

__all__ = ["common", "data", "embed", "cvpn", "maps", "generate", "classifier", "evaluate", "explorer",
           "demo_generator"]
