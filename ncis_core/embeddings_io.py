"""The embeddings file of stage 1 (``embeddings.safetensors``): writer, reader, and a synthetic twin.

The file holds three tensors and a little metadata:

* ``embeddings``: ``N × D`` float32, one optimised token-embedding row per training image;
* ``labels``: ``N`` int64, the class index of each row (``0 … C-1``);
* ``image_ids``: ``N`` int64, the image's index in the ID training split;
* metadata: ``format`` (``ncis-embeddings/1``), ``dim``, ``num_classes``, ``class_names`` (JSON list)
  and any extra string entries the writer adds.

:func:`synthetic_embeddings` makes a file-shaped dict with low-rank class manifolds plus small
noise, so that each class has a known number of invariant directions. Tests use it, and so does the
``smoke`` preset while stage 1 is absent (see ``ncis_core.stages.train_cvpn.ensure_smoke_embeddings``).

Example:
    >>> import tempfile
    >>> data = synthetic_embeddings(num_classes=3, per_class=20, dim=16, seed=0, rank=2)
    >>> path = save_embeddings(Path(tempfile.mkdtemp()) / "embeddings.safetensors", **data)
    >>> back = load_embeddings(path)
    >>> back["embeddings"].shape, back["num_classes"], back["class_names"]
    (torch.Size([60, 16]), 3, ['class_0', 'class_1', 'class_2'])
    >>> torch.equal(back["embeddings"], data["embeddings"]), back["labels"][::20].tolist()
    (True, [0, 1, 2])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from .runs import atomic_write_safetensors

__all__ = ["EMBEDDINGS_FORMAT", "save_embeddings", "load_embeddings", "synthetic_embeddings"]

EMBEDDINGS_FORMAT = "ncis-embeddings/1"


def _as_tensor(value, dtype: torch.dtype, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() != dtype.is_floating_point:
        raise ValueError(f"{name} must be {'floating point' if dtype.is_floating_point else 'integer'}, "
                         f"got {tensor.dtype}")
    return tensor.detach().to("cpu", dtype).contiguous()


def save_embeddings(path: str | os.PathLike, embeddings, labels, image_ids,
                    class_names: Sequence[str], extra: dict[str, str] | None = None) -> Path:
    """Write an embeddings file atomically.

    Args:
        path: the target file (``run.path("embeddings")`` in a run).
        embeddings: ``N × D`` floats (stored as float32).
        labels: ``N`` class indices in ``[0, len(class_names))``.
        image_ids: ``N`` image indices.
        class_names: the ``C`` class names.
        extra: further metadata (string → string), e.g. ``{"source": "synthetic"}``.

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
    """Read an embeddings file.

    Returns:
        ``{"embeddings": N×D float32, "labels": N int64, "image_ids": N int64,
        "class_names": [str], "num_classes": C, "metadata": {str: str}}``.

    Raises:
        ValueError: the file lacks one of the three tensors.
    """
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

    ``x = m_c + B_c (s ⊙ w) + noise · ε`` with a random mean ``m_c`` (scale 1), an orthonormal random
    basis ``B_c`` (``D × rank``), per-direction scales ``s`` decaying from 1 to 0.5, and
    ``w, ε ~ N(0, I)``. Each class therefore has about ``D − rank`` invariant directions.

    Returns:
        A dict with the arguments of :func:`save_embeddings` (``embeddings``, ``labels``,
        ``image_ids``, ``class_names``).
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
