"""The deep nearest-neighbour score (Sun et al., 2022, "Out-of-Distribution Detection with Deep
Nearest Neighbors"; the score NPOS evaluates with): the negative squared L2 distance from an
image's L2-normalised penultimate feature to its K-th nearest L2-normalised ID training feature.

The paper writes the score with the distance itself, ``−‖z − z_(K)‖₂``; its code and OpenOOD's
``KNNPostprocessor`` search with faiss ``IndexFlatL2``, which returns *squared* distances, and
score ``−D[:, K−1]``. Squaring is monotone on distances, so every ranking metric (FPR95, AUROC,
AUPR) is the same either way; this module follows the code: **−(squared L2 distance to the K-th
nearest training feature)**, exact (no approximate index). K = 50 is OpenOOD's default and the
paper's CIFAR-10 value (50 000 training images); the paper scales K with the training-set size
(ImageNet: K = 1000 for 1.28 M images, K = 10 on a 1 % sample).

Example (a stand-in "model" whose logits and penultimate features are its 2-D inputs; three ID
training features, K = 2; a run's model is stage 5's classifier, its batches the ID training split):
    >>> class Features(torch.nn.Module):
    ...     def forward(self, x, return_features=False):
    ...         return (x, x) if return_features else x
    >>> id_train_batches = [(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), torch.tensor([0, 1, 1]))]
    >>> score = KNNScore(k=2).setup(Features(), id_train_batches)
    >>> score(Features(), torch.tensor([[2.0, 0.0], [-1.0, 0.0]]))  # (2, 0) is normalised to (1, 0)
    tensor([-0.8000, -3.2000])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .base import Batches, Score, register_score

__all__ = ["KNNScore", "kth_nearest_squared_distance"]

# Query rows × keys per distance block (float32: 64 MiB), e.g. 335 queries against CIFAR-100's
# 50 000 training features; bounds memory whatever the batch size.
_BLOCK_ELEMENTS = 2 ** 24


def kth_nearest_squared_distance(queries: torch.Tensor, keys: torch.Tensor, k: int,
                                 block_elements: int = _BLOCK_ELEMENTS) -> torch.Tensor:
    """For each row of ``queries`` (Q × D), the squared L2 distance to its ``k``-th nearest row of
    ``keys`` (N × D), exactly; computed in blocks of queries so that at most ``block_elements``
    distances are held at once.

    Example:
        >>> kth_nearest_squared_distance(torch.tensor([[0.0, 0.0]]),
        ...                              torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), k=2)
        tensor([4.])
    """
    if not 1 <= k <= len(keys):
        raise ValueError(f"k = {k} must lie between 1 and the number of keys ({len(keys)})")
    key_norms = keys.pow(2).sum(dim=1)
    rows = max(1, block_elements // len(keys))
    out = []
    for block in queries.split(rows):
        # ‖q − x‖² = ‖q‖² + ‖x‖² − 2 q·x: one matmul; rounding can dip just below 0
        d2 = block.pow(2).sum(dim=1, keepdim=True) + key_norms - 2 * block @ keys.T
        out.append(d2.topk(k, dim=1, largest=False).values[:, -1].clamp_min(0))
    return torch.cat(out) if out else queries.new_zeros(0)


@register_score
class KNNScore(Score):
    """``−‖z − z_(K)‖²`` with ``z = φ(x) / ‖φ(x)‖`` and ``z_(K)`` the K-th nearest of the
    normalised ID training features stored by :meth:`setup`.

    Args:
        k: K, the neighbour whose distance is the score (OpenOOD's default 50); at most the number
            of ID training images.
    """

    name = "knn"
    needs_setup = True

    def __init__(self, k: int = 50):
        if k < 1:
            raise ValueError(f"kNN score: k must be at least 1, not {k}")
        self.k = k
        self.train_features: torch.Tensor | None = None

    @staticmethod
    def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(model(images, return_features=True)[1].float(), dim=1)

    @torch.no_grad()
    def setup(self, model: nn.Module, id_train_batches: Batches) -> "KNNScore":
        """Store the normalised penultimate features of every ID training image (N × D, on the
        model's device: 100 MB for CIFAR-100's 50 000 × 512)."""
        feats = [self._features(model, images) for images, _ in id_train_batches]
        if not feats:
            raise ValueError("kNN setup: no ID training batches")
        feats = torch.cat(feats)
        if self.k > len(feats):
            raise ValueError(f"kNN score: k = {self.k} but there are only {len(feats)} ID training "
                             f"features; lower evaluate.score_args.knn.k")
        self.train_features = feats
        return self

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.train_features is None:
            raise RuntimeError("KNNScore must see the ID training features first (.setup)")
        queries = self._features(model, images).to(self.train_features.device)
        return -kth_nearest_squared_distance(queries, self.train_features, self.k)
