"""What an outlier method is: :class:`OutlierMethod`, the spec every method module fills in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["EMBEDDINGS", "PROMPT_IMAGES", "NOTHING", "NEEDS", "OutlierMethod"]

EMBEDDINGS = "embeddings"        # outlier embeddings (C × M × D); stage 4 renders them
PROMPT_IMAGES = "prompt_images"  # images of the plain class prompt, nothing injected
NOTHING = "nothing"              # no outliers: stage 5 trains without the energy term
_PRODUCES = (EMBEDDINGS, PROMPT_IMAGES, NOTHING)
NEEDS = ("embeddings", "cvpn", "class_token_rows")


@dataclass(frozen=True)
class OutlierMethod:
    """One outlier method.

    Args:
        name: the name in configs, tables and folders (``outliers_<name>/``); ``label``: in figures.
        produces: :data:`EMBEDDINGS`, :data:`PROMPT_IMAGES` or :data:`NOTHING`.
        needs: a subset of :data:`NEEDS`.
        sample: ``sample(SampleInputs, params, progress) -> {"outliers": C × M × D, "log_density"?}``.
        params: a frozen dataclass of the method's parameters (defaults = the paper's), or None.
        flops: ``flops(params, rows_per_class, dim) -> float`` per class (for ``plan``), or None.
    """

    name: str
    label: str
    summary: str
    produces: str
    needs: tuple[str, ...] = ()
    sample: Callable[[Any, Any, bool], dict] | None = None  # (SampleInputs, params, progress)
    params: type | None = None
    flops: Callable[[Any, int, int], float] | None = None

    def __post_init__(self):
        if self.produces not in _PRODUCES:
            raise ValueError(f"outlier method {self.name!r}: produces must be one of {_PRODUCES}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"outlier method {self.name!r}: unknown needs {sorted(unknown)}; use {NEEDS}")
        if (self.produces == EMBEDDINGS) != (self.sample is not None):
            raise ValueError(f"outlier method {self.name!r}: a sample function exactly when it "
                             f"produces embeddings")
