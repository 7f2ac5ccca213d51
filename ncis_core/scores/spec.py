"""What an OOD score is: :class:`Score` (OpenOOD's postprocessor shape), which every score subclasses."""

from __future__ import annotations

from typing import ClassVar, Iterable

import torch
from torch import nn

__all__ = ["Score", "Batches"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Score:
    """The interface of an OOD score (subclass it; :mod:`ncis_core.scores.base` registers it).

    Class attributes: ``needs_setup`` (:meth:`setup` must see ID training data), ``stage_args`` (set by
    stage 6, not a config: energy's ``sign``), ``forward_passes`` (network passes per image, for ``plan``).
    ``model(images, return_features=True)`` gives ``(logits, features)``; treat outputs as read-only.
    """

    name: ClassVar[str] = ""
    needs_setup: ClassVar[bool] = False
    stage_args: ClassVar[tuple[str, ...]] = ()
    forward_passes: ClassVar[int] = 1

    def setup(self, model: nn.Module, id_train_batches: Batches) -> "Score":
        """Fit on ID training data (``(images, labels)`` batches); a no-op here. Returns ``self``."""
        return self

    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """One score per image (a 1-D tensor of length ``B``), higher = more ID."""
        raise NotImplementedError
