"""The energy score (the paper's): ``sign · T · logsumexp(f(x) / T)``, the negative free energy.

Example:
    >>> import torch
    >>> EnergyScore()(lambda x: x, torch.zeros(1, 4))  # logsumexp of four zero logits = log 4
    tensor([1.3863])
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Score, register_score

__all__ = ["EnergyScore"]


@register_score
class EnergyScore(Score):
    """``sign · T · logsumexp(f(x) / T)`` (Liu et al., 2020).

    Args:
        temperature: T (1 in the paper).
        sign: +1, or −1 when the energy head's slope is negative (then outliers got the higher
            logsumexp during training; METHOD.md defect 6). Stage 6 sets it from
            ``evaluate.energy_sign`` (:func:`ncis_core.stages.evaluate.energy_sign`), so a run's
            ``score_args`` may not.
    """

    name = "energy"
    stage_args = ("sign",)

    def __init__(self, temperature: float = 1.0, sign: float = 1.0):
        self.temperature, self.sign = temperature, float(sign)

    @torch.no_grad()
    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        logits = model(images)
        return self.sign * self.temperature * torch.logsumexp(logits / self.temperature, dim=1)
