"""What a sampler reads: :class:`SampleInputs`, built by stage 3 (cVPN and token rows load on demand)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from ..config import SampleConfig

__all__ = ["SampleInputs"]


@dataclass
class SampleInputs:
    """The data a sampler works on.

    Attributes:
        embeddings: ``N × D`` float32 training rows (the cVPN's, on ``device``), ``labels`` their classes.
        seed: the run's seed (every method derives its random streams from it).
        tail: the tail sampler's settings (``cfg.sample``: rounds, draws, keep, reg_weight).
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    seed: int
    tail: SampleConfig
    device: torch.device
    _load_cvpn: Callable[[], tuple] | None = field(default=None, repr=False)
    _load_token_rows: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def cvpn(self) -> tuple:
        """``(model, meta, input_mean)`` of the run's best cVPN (stage 2), loaded once."""
        if "cvpn" not in self._cache:
            if self._load_cvpn is None:
                raise ValueError("this sampler needs the trained cVPN, and none was given")
            self._cache["cvpn"] = self._load_cvpn()
        return self._cache["cvpn"]

    def class_token_rows(self) -> torch.Tensor:
        """``C × D`` float32: the class tokens' rows of the generator's embedding table, loaded once."""
        if "rows" not in self._cache:
            if self._load_token_rows is None:
                raise ValueError("this sampler needs the class tokens' rows, and no pipeline was given")
            rows = self._load_token_rows().to(self.device, torch.float32)
            if rows.shape[0] != self.num_classes:
                raise ValueError(f"the generator has class tokens for {rows.shape[0]} classes but the "
                                 f"embeddings have {self.num_classes}")
            self._cache["rows"] = rows
        return self._cache["rows"]
