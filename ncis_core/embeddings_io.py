"""Stage 1's embeddings file (``embeddings.safetensors``: ``N × D`` rows, labels, image ids, class
names): writer, reader, checks, the holdout split, a synthetic twin; and stage 3's outliers file.

    >>> import tempfile
    >>> data = synthetic_embeddings(num_classes=3, per_class=20, dim=16, seed=0, rank=2)
    >>> back = load_embeddings(save_embeddings(Path(tempfile.mkdtemp()) / "e.safetensors", **data))
    >>> back["embeddings"].shape, back["class_names"]
    (torch.Size([60, 16]), ['class_0', 'class_1', 'class_2'])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open

from .errors import TooLittleData
from .runs import atomic_write_safetensors

__all__ = ["EMBEDDINGS_FORMAT", "save_embeddings", "load_embeddings", "synthetic_embeddings",
           "validate_embeddings", "holdout_split", "OUTLIERS_FORMAT", "save_outliers", "load_outliers"]

EMBEDDINGS_FORMAT = "ncis-embeddings/1"


def _as_tensor(value, dtype: torch.dtype, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() != dtype.is_floating_point:
        raise ValueError(f"{name} must be {'floating point' if dtype.is_floating_point else 'integer'}, "
                         f"got {tensor.dtype}")
    return tensor.detach().to("cpu", dtype).contiguous()


def save_embeddings(path: str | os.PathLike, embeddings, labels, image_ids,
                    class_names: Sequence[str], extra: dict[str, str] | None = None) -> Path:
    """Write an embeddings file atomically (``extra``: further string metadata).

    Raises:
        ValueError: shapes that do not agree, a label outside ``[0, C)`` or a non-finite value.
    """
    emb = _as_tensor(embeddings, torch.float32, "embeddings")
    lab = _as_tensor(labels, torch.int64, "labels")
    ids = _as_tensor(image_ids, torch.int64, "image_ids")
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be N × D, got shape {tuple(emb.shape)}")
    if lab.shape != (emb.shape[0],) or ids.shape != (emb.shape[0],):
        raise ValueError(f"labels {tuple(lab.shape)} and image_ids {tuple(ids.shape)} must both have "
                         f"shape ({emb.shape[0]},) to match embeddings {tuple(emb.shape)}")
    names = [str(n) for n in class_names]
    if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= len(names)):
        raise ValueError(f"labels must lie in [0, {len(names)}), got {int(lab.min())} … {int(lab.max())}")
    if not torch.isfinite(emb).all():
        raise ValueError("embeddings contain NaN or Inf values")
    metadata = {"format": EMBEDDINGS_FORMAT, "dim": str(emb.shape[1]), "num_classes": str(len(names)),
                "class_names": json.dumps(names)}
    metadata.update({str(k): str(v) for k, v in (extra or {}).items()})
    return atomic_write_safetensors(path, {"embeddings": emb, "labels": lab, "image_ids": ids}, metadata)


def load_embeddings(path: str | os.PathLike) -> dict:
    """Read an embeddings file: its three tensors, ``class_names``, ``num_classes`` and ``metadata``."""
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        missing = {"embeddings", "labels", "image_ids"} - set(f.keys())
        if missing:
            raise ValueError(f"{path} is not an embeddings file: missing {', '.join(sorted(missing))}")
        for key in ("embeddings", "labels", "image_ids"):
            tensors[key] = f.get_tensor(key)
    names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
    if names is None:
        num = int(tensors["labels"].max()) + 1 if len(tensors["labels"]) else 0
        names = [f"class_{i}" for i in range(num)]
    return {**tensors, "class_names": names, "num_classes": len(names), "metadata": metadata}


def synthetic_embeddings(num_classes: int, per_class: int, dim: int, seed: int = 0, rank: int = 3,
                         noise: float = 1e-2, class_names: Sequence[str] | None = None) -> dict:
    """Embeddings with a known structure: class ``c`` lies near a ``rank``-dimensional affine subspace.

    Returns the arguments of :func:`save_embeddings`; ``x = m_c + B_c (s ⊙ w) + noise · ε``.
    """
    if rank > dim:
        raise ValueError(f"rank {rank} exceeds dim {dim}")
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=gen)
    bases = torch.linalg.qr(torch.randn(num_classes, dim, rank, generator=gen)).Q
    scales = torch.linspace(1.0, 0.5, rank)
    coords = torch.randn(num_classes, per_class, rank, generator=gen) * scales
    x = means[:, None, :] + coords @ bases.transpose(1, 2)
    x = x + noise * torch.randn(num_classes, per_class, dim, generator=gen)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return {"embeddings": x.reshape(-1, dim).float(), "labels": labels,
            "image_ids": torch.arange(num_classes * per_class), "class_names": names}


# ----------------------------------------------------------------------------- checks and splits
def validate_embeddings(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        dim: int | None = None, min_per_class: int = 2) -> None:
    """Refuse input the cVPN cannot use (non-finite, bad labels or width; TooLittleData: few rows)."""
    if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(f"embeddings must be N × D with N labels; got {tuple(embeddings.shape)} "
                         f"and {tuple(labels.shape)}")
    if dim is not None and embeddings.shape[1] != dim:
        raise ValueError(f"the embeddings are {embeddings.shape[1]}-dimensional but the cVPN checkpoint "
                         f"expects {dim}; retrain stage 2 (cvpn) on these embeddings")
    bad = ~torch.isfinite(embeddings).all(dim=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} embedding rows contain NaN or Inf (first: row "
                         f"{int(bad.nonzero()[0])}); rerun stage 1 (embed)")
    outside = (labels < 0) | (labels >= num_classes)
    if outside.any():
        raise ValueError(f"label {int(labels[outside][0])} (row {int(outside.nonzero()[0])}) is outside "
                         f"[0, {num_classes}) for {num_classes} classes")
    counts = torch.bincount(labels, minlength=num_classes)
    few = (counts < min_per_class).nonzero().flatten()
    if len(few):
        raise TooLittleData(f"class {int(few[0])} has {int(counts[few[0]])} embeddings (need at least "
                            f"{min_per_class} for a class covariance); {len(few)} class(es) affected: embed "
                            f"at least {min_per_class} images per class (embed.max_per_class, capped by "
                            f"data.max_per_class)")


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class ``(train_index, holdout_index)``: ``floor(fraction × n_c)`` held out, ≥ 2 kept."""
    n = len(labels)
    if fraction <= 0 or n == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(labels)
    hold = torch.clamp(torch.floor(counts.double() * fraction).long(), max=(counts - 2).clamp_min(0))
    keys = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    order = torch.from_numpy(np.lexsort((keys.numpy(), labels.numpy())))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[labels[order]]
    held = rank < hold[labels]
    return (~held).nonzero().flatten(), held.nonzero().flatten()


# ----------------------------------------------------------------------------- stage 3's outlier embeddings
OUTLIERS_FORMAT = "ncis-outliers/1"


def save_outliers(path: str | os.PathLike, result: dict, metadata: dict) -> Path:
    """Write an outlier-embeddings file atomically: ``result``'s tensors, ``labels`` and ``metadata``."""
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
