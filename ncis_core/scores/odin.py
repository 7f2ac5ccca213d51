"""ODIN (Liang et al., 2018): temperature scaling plus a small input perturbation that raises the
maximum softmax, more for ID than for OOD inputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .spec import Score

__all__ = ["ODINScore"]


class ODINScore(Score):
    """``max softmax(f(x̃) / T)`` with ``x̃ = x − ε · sign(∇ₓ[−log max softmax(f(x) / T)])``.

    Args:
        epsilon: ε, in the model's (normalised) input space (0.0014, ODIN's CIFAR value).
    """

    name = "odin"
    forward_passes = 3  # forward, backward to the input, forward on the perturbed input

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
