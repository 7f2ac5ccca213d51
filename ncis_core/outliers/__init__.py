"""Outlier methods as plug-ins: the registry (:mod:`.base`), one module per method, and where each
method's outliers live in a run (:mod:`.sources`).

Built in, in the order tables list them:

* ``none`` — no outliers (cross-entropy only);
* ``idgen`` — the plain class prompt rendered (the control);
* ``linear`` — tail sampling in embedding space (the paper's ablation);
* ``ncis`` — tail sampling in the cVPN's latent space, mapped back (the method);
* ``knn_boundary`` — Dream-OOD's boundary sampler on the same embeddings.

A new method is one module that calls :func:`register_method` with an :class:`OutlierMethod`;
importing it (before the config is loaded) makes it a valid ``sample.method``,
``classifier.outliers`` and ``compare --methods`` entry, a layer of the UMAP maps and a choice of
the explorer. See ``tests/test_outlier_methods.py`` for a toy method registered inside a test.
"""

from .base import (EMBEDDINGS, NEEDS, NOTHING, PROMPT_IMAGES, OutlierMethod, check_method_args, get_method,
                   method_inputs, method_names, method_params, methods, register_method,
                   unregister_method)
from . import none, idgen, linear, ncis, knn_boundary  # noqa: E402,F401  (registers the built-ins)

__all__ = ["EMBEDDINGS", "PROMPT_IMAGES", "NOTHING", "NEEDS", "OutlierMethod", "register_method",
           "unregister_method", "get_method", "method_names", "methods", "method_params",
           "check_method_args", "method_inputs"]
