"""``none``: no outliers; stage 5 trains with cross-entropy only (the plain energy baseline)."""

from __future__ import annotations

from .base import NOTHING, OutlierMethod, register_method

__all__ = ["METHOD"]

METHOD = register_method(OutlierMethod(
    name="none", label="no outliers", produces=NOTHING,
    summary="cross-entropy only, no energy term (the plain baseline)"))
