"""The maximum softmax probability (Hendrycks & Gimpel, 2017).

    >>> import torch
    >>> MSPScore()(lambda x: x, torch.zeros(1, 4))
    tensor([0.2500])
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .spec import Score

__all__ = ["MSPScore"]


class MSPScore(Score):
    """``max_c softmax(f(x))_c``."""

    name = "msp"

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return F.softmax(model(images), dim=1).max(dim=1).values
