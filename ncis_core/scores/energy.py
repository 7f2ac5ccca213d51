"""The energy score (the paper's): ``sign · T · logsumexp(f(x) / T)``, the negative free energy.

    >>> import torch
    >>> EnergyScore()(lambda x: x, torch.zeros(1, 4))  # logsumexp of four zero logits = log 4
    tensor([1.3863])
"""

from __future__ import annotations

import torch
from torch import nn

from .spec import Score

__all__ = ["EnergyScore"]


class EnergyScore(Score):
    """``sign · T · logsumexp(f(x) / T)`` (Liu et al., 2020).

    Args:
        sign: +1, or −1 for a negative energy head's slope; set by stage 6, not by ``score_args``.
    """

    name = "energy"
    stage_args = ("sign",)

    def __init__(self, temperature: float = 1.0, sign: float = 1.0):
        self.temperature, self.sign = temperature, float(sign)

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        logits = model(images)
        return self.sign * self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
