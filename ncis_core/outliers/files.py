"""The outlier-embeddings file (``outlier_embeddings.safetensors``, and every method's cached twin
under ``RUN/cache/outlier_embeddings/``): writer and reader.

Tensors: ``outliers`` (C × M × D float32), ``log_density`` (C × M float64; NaN for a method that
draws from no Gaussian), any per-outlier tensor of the method (e.g. ``knn_distance``), ``labels``
(C); metadata ``format``, ``method`` and the writer's entries (JSON-encoded unless strings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..runs import atomic_write_safetensors

__all__ = ["OUTLIERS_FORMAT", "save_outliers", "load_outliers"]

OUTLIERS_FORMAT = "ncis-outliers/1"


def save_outliers(path: str | os.PathLike, result: dict, metadata: dict) -> Path:
    """Write the outlier embeddings file atomically."""
    outliers = result["outliers"].contiguous()
    tensors = {key: value.contiguous() for key, value in result.items()
               if isinstance(value, torch.Tensor)}  # outliers, log_density, a method's own tensors
    tensors["labels"] = torch.arange(outliers.shape[0])
    meta = {"format": OUTLIERS_FORMAT, "method": result["method"]}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return atomic_write_safetensors(path, tensors, meta)


def load_outliers(path: str | os.PathLike) -> dict:
    """Read ``outlier_embeddings.safetensors``: the tensors plus ``method`` and ``metadata``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        result = {k: f.get_tensor(k) for k in f.keys()}
    result["method"] = meta.get("method")
    result["metadata"] = meta
    return result
