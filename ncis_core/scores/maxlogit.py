"""The largest logit (Hendrycks et al., 2022).

    >>> import torch
    >>> MaxLogitScore()(lambda x: x, torch.tensor([[1.0, 3.0, 2.0]]))
    tensor([3.])
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import Score

__all__ = ["MaxLogitScore"]


class MaxLogitScore(Score):
    """``max_c f(x)_c``."""

    name = "maxlogit"

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images).max(dim=1).values
