"""The deep nearest-neighbour score (Sun et al., 2022; the score NPOS evaluates with): the negative
*squared* L2 distance from an image's L2-normalised penultimate feature to its K-th nearest
normalised ID training feature, exact, as the paper's code and OpenOOD compute it (the ranking is
the same as with the distance).

Example (a stand-in "model" whose logits and penultimate features are its 2-D inputs; K = 2):
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

from ..neighbours import kth_nearest
from .spec import Batches, Score

__all__ = ["KNNScore"]


class KNNScore(Score):
    """``−‖z − z_(K)‖²`` with ``z = φ(x) / ‖φ(x)‖`` and ``z_(K)`` the K-th nearest of the
    normalised ID training features stored by :meth:`setup`.

    Args:
        k: K, the neighbour whose distance is the score (OpenOOD's default 50; the paper scales
            it with the training-set size); at most the number of ID training images.
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
        return -kth_nearest(queries, self.train_features, self.k)
