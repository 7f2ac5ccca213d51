"""``none``: no outliers; stage 5 trains with cross-entropy only (the plain energy baseline)."""

from __future__ import annotations

from .spec import NOTHING, OutlierMethod

__all__ = ["METHOD"]

METHOD = OutlierMethod(
    name="none", label="no outliers", produces=NOTHING,
    summary="cross-entropy only, no energy term (the plain baseline)")
