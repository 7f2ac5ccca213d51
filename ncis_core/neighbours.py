"""Exact k-nearest neighbours under the L2 distance, a block of queries at a time (at most
:data:`BLOCK_BYTES` of distances held at once): the kit's one kNN, behind the kNN score,
``knn_boundary``, the UMAP maps' graph and the explorer."""

from __future__ import annotations

from typing import Iterator

import torch

__all__ = ["BLOCK_BYTES", "kth_nearest", "nearest"]

BLOCK_BYTES = 64 * 2**20


def _squared_distance_blocks(queries: torch.Tensor, keys: torch.Tensor, k: int, exact: bool,
                             block_bytes: int | None) -> Iterator[torch.Tensor]:
    """``B × N`` squared distances of consecutive blocks of the flattened queries."""
    if not 1 <= k <= len(keys):
        raise ValueError(f"k = {k} must lie between 1 and the number of keys ({len(keys)})")
    flat = queries.reshape(-1, queries.shape[-1])
    rows = max(1, (block_bytes or BLOCK_BYTES) // (len(keys) * flat.element_size()))
    key_sq = None if exact else keys.pow(2).sum(1)
    for start in range(0, len(flat), rows):
        q = flat[start:start + rows]
        if exact:
            yield torch.cdist(q, keys, compute_mode="donot_use_mm_for_euclid_dist").square()
        else:
            # ‖q − x‖² = (‖q‖² + ‖x‖²) − 2 q·x: one matmul; rounding can dip just below 0
            yield (q.pow(2).sum(1, keepdim=True) + key_sq).sub_(q @ keys.T, alpha=2).clamp_min_(0)


def _kth_smallest(d2: torch.Tensor, k: int) -> torch.Tensor:
    # the same value either way; topk is the faster for a few of many, kthvalue for many of a few
    if 8 * k <= d2.shape[1]:
        return d2.topk(k, dim=1, largest=False).values.amax(1)
    return d2.kthvalue(k, dim=1).values


def kth_nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exact: bool = False,
                block_bytes: int | None = None) -> torch.Tensor:
    """The squared L2 distance from each query (``... × D``) to its ``k``-th nearest row of ``keys``
    (``N × D``; 1-based ``k``: a query that is one of the keys is its own first neighbour); shape ``...``.

    ``exact=False`` computes ``‖q‖² + ‖x‖² − 2 q·x`` (one matmul, clamped at 0), ``exact=True``
    the differences themselves (``torch.cdist`` without the matmul): slower, but a distance far
    below the norms keeps its digits. ``block_bytes``: distances held at once (default
    :data:`BLOCK_BYTES`, read at each call).

    Example:
        >>> kth_nearest(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), k=2)
        tensor([4.])
    """
    out = [_kth_smallest(d2, k) for d2 in _squared_distance_blocks(queries, keys, k, exact, block_bytes)]
    return (torch.cat(out) if out else queries.new_zeros(0)).reshape(queries.shape[:-1])


def nearest(queries: torch.Tensor, keys: torch.Tensor, k: int, *, exact: bool = False,
            block_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(squared distances, indices)`` of the ``k`` nearest rows of ``keys`` to each query, each
    ``... × k``, nearest first; equal distances: the lower index first (also at the ``k``-th place).
    ``exact`` as in :func:`kth_nearest`.

    Example:
        >>> nearest(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), k=2)
        (tensor([[1., 1.]]), tensor([[1, 2]]))
    """
    distances, indices = [], []
    for d2 in _squared_distance_blocks(queries, keys, k, exact, block_bytes):
        kth = _kth_smallest(d2, k)[:, None]
        keep = d2 <= kth
        crowded = keep.sum(1) > k  # more keys at the k-th distance than places: the first of them
        if crowded.any():
            sub, t = d2[crowded], kth[crowded]
            below, tied = sub < t, sub == t
            keep[crowded] = below | (tied & (tied.cumsum(1) <= k - below.sum(1, keepdim=True)))
        index = keep.nonzero()[:, 1].view(len(d2), k)  # ascending per row
        value = d2.gather(1, index)
        order = torch.sort(value, dim=1, stable=True).indices
        distances.append(value.gather(1, order))
        indices.append(index.gather(1, order))
    shape = (*queries.shape[:-1], k)
    if not distances:
        return queries.new_zeros(shape), torch.zeros(shape, dtype=torch.long, device=queries.device)
    return torch.cat(distances).reshape(shape), torch.cat(indices).reshape(shape)
