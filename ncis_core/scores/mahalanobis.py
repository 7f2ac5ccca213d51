"""The Mahalanobis score (Lee et al., 2018, without input preprocessing or feature ensembles)."""

from __future__ import annotations

import torch
from torch import nn

from .spec import Batches, Score

__all__ = ["MahalanobisScore"]


class MahalanobisScore(Score):
    """``−min_c (φ(x) − μ_c)ᵀ Σ⁻¹ (φ(x) − μ_c)`` on penultimate features φ, one shared Σ (float64)."""

    name = "mahalanobis"
    needs_setup = True

    def __init__(self):
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    @torch.no_grad()
    def setup(self, model: nn.Module, id_train_batches: Batches) -> "MahalanobisScore":
        """Fit μ_c and the shared Σ; the classes are the model's logits (every one needs data)."""
        feats, labels, num_classes = [], [], 0
        for images, y in id_train_batches:
            logits, phi = model(images, return_features=True)
            num_classes = logits.shape[1]
            feats.append(phi.double().cpu())
            labels.append(y.cpu())
        if not feats:
            raise ValueError("Mahalanobis setup: no ID training batches")
        feats, labels = torch.cat(feats), torch.cat(labels)
        present = torch.bincount(labels, minlength=num_classes)
        if len(present) > num_classes:
            raise ValueError(f"Mahalanobis setup: labels up to {len(present) - 1} but the model has "
                             f"{num_classes} logits")
        if (present == 0).any():
            missing = torch.nonzero(present == 0).flatten().tolist()
            raise ValueError(f"Mahalanobis setup: no training features for classes {missing}")
        means = torch.zeros(num_classes, feats.shape[1], dtype=torch.float64)
        means.index_add_(0, labels, feats)
        means /= present[:, None]
        centred = feats - means[labels]
        cov = centred.T @ centred / len(feats)  # the tied (maximum-likelihood) covariance
        self.means, self.precision = means, torch.linalg.pinv(cov, hermitian=True)
        return self

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.means is None:
            raise RuntimeError("MahalanobisScore must be fitted on ID training data first (.setup)")
        feats = model(images, return_features=True)[1].double().cpu()
        diff = feats[:, None, :] - self.means[None]  # B × C × F
        dist = torch.einsum("bcf,fg,bcg->bc", diff, self.precision, diff)
        return (-dist.min(dim=1).values).float()
