"""OOD score functions behind one interface: ``score(model, images) -> tensor``, higher = more ID.

* :class:`EnergyScore` — negative free energy ``T·logsumexp(f(x)/T)`` (the paper's score), times
  ``sign`` so that a classifier whose energy head learned a negative slope (METHOD.md defect 6)
  cannot silently invert a table;
* :class:`MSPScore` — maximum softmax probability;
* :class:`MaxLogitScore` — the largest logit;
* :class:`ODINScore` — temperature scaling plus a small input perturbation that raises the
  maximum softmax (Liang et al., 2018);
* :class:`MahalanobisScore` — class-conditional Gaussians with one shared covariance on the
  penultimate features, fitted on ID training data; score = −min_c Mahalanobis distance².

``model`` is a classifier returning logits, and ``(logits, features)`` with ``return_features=True``
(all networks of :mod:`ncis_core.models.resnet`). ``images`` is a normalised ``B × 3 × H × W`` batch.

Example:
    >>> score = build_score("energy")
    >>> score(model, images)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["EnergyScore", "MSPScore", "MaxLogitScore", "ODINScore", "MahalanobisScore",
           "SCORES", "build_score"]


class EnergyScore:
    """``sign · T · logsumexp(f(x) / T)``.

    Args:
        temperature: T (1 in the paper).
        sign: +1, or −1 when the energy head's slope is negative (then outliers got the higher
            logsumexp during training).
    """

    name = "energy"

    def __init__(self, temperature: float = 1.0, sign: float = 1.0):
        self.temperature, self.sign = temperature, float(sign)

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        logits = model(images)
        return self.sign * self.temperature * torch.logsumexp(logits / self.temperature, dim=1)


class MSPScore:
    """Maximum softmax probability."""

    name = "msp"

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return F.softmax(model(images), dim=1).max(dim=1).values


class MaxLogitScore:
    """The largest logit."""

    name = "maxlogit"

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images).max(dim=1).values


class ODINScore:
    """ODIN: ``max softmax(f(x̃) / T)`` with ``x̃ = x − ε · sign(∇ₓ[−log max softmax(f(x) / T)])``.

    The perturbation is taken in the model's (normalised) input space.

    Args:
        temperature: T (ODIN's default 1000).
        epsilon: ε, the perturbation size (0.0014 in the config default).
    """

    name = "odin"

    def __init__(self, temperature: float = 1000.0, epsilon: float = 0.0014):
        self.temperature, self.epsilon = temperature, epsilon

    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x) / self.temperature
            # loss = −log p(ŷ | x) for the predicted class ŷ; stepping against its gradient raises p(ŷ)
            loss = F.cross_entropy(logits, logits.argmax(dim=1))
            (grad,) = torch.autograd.grad(loss, x)
        x_tilde = images - self.epsilon * grad.sign()
        with torch.no_grad():
            return F.softmax(model(x_tilde) / self.temperature, dim=1).max(dim=1).values


class MahalanobisScore:
    """``−min_c (φ(x) − μ_c)ᵀ Σ⁻¹ (φ(x) − μ_c)`` on penultimate features φ, with class means μ_c
    and one covariance Σ shared by all classes, both from ID training data (:meth:`fit`)."""

    name = "mahalanobis"

    def __init__(self):
        self.means: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    @torch.no_grad()
    def fit(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            num_classes: int) -> "MahalanobisScore":
        """Fit μ_c and the shared Σ on ``(images, labels)`` batches of ID training data."""
        feats, labels = [], []
        for images, y in batches:
            feats.append(model(images, return_features=True)[1].double().cpu())
            labels.append(y.cpu())
        feats, labels = torch.cat(feats), torch.cat(labels)
        present = torch.bincount(labels, minlength=num_classes)
        if (present == 0).any():
            missing = torch.nonzero(present == 0).flatten().tolist()
            raise ValueError(f"Mahalanobis fit: no training features for classes {missing}")
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
            raise RuntimeError("MahalanobisScore must be fitted on ID training data first (.fit)")
        feats = model(images, return_features=True)[1].double().cpu()
        diff = feats[:, None, :] - self.means[None]  # B × C × F
        dist = torch.einsum("bcf,fg,bcg->bc", diff, self.precision, diff)
        return (-dist.min(dim=1).values).float()


SCORES = {"energy": EnergyScore, "msp": MSPScore, "maxlogit": MaxLogitScore, "odin": ODINScore,
          "mahalanobis": MahalanobisScore}


def build_score(name: str, *, temperature: float = 1000.0, epsilon: float = 0.0014, sign: float = 1.0):
    """A score function by name (``energy``, ``msp``, ``maxlogit``, ``odin``, ``mahalanobis``).

    ``temperature``/``epsilon`` are ODIN's; ``sign`` is the energy score's (see :class:`EnergyScore`).
    A Mahalanobis score still needs :meth:`MahalanobisScore.fit`.
    """
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; use one of {', '.join(SCORES)}")
    if name == "energy":
        return EnergyScore(sign=sign)
    if name == "odin":
        return ODINScore(temperature, epsilon)
    return SCORES[name]()
