"""``idgen``, the control: images of the plain class prompt, nothing injected. It tells whether
boundary sampling adds anything beyond "generated images are outliers"."""

from __future__ import annotations

from .spec import PROMPT_IMAGES, OutlierMethod

__all__ = ["METHOD"]

METHOD = OutlierMethod(
    name="idgen", label="plain prompt", produces=PROMPT_IMAGES,
    summary="the plain class prompt rendered, no injected embedding (the null NCIS must beat)")
