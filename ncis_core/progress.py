"""Progress bars: ``tqdm.auto`` everywhere, set up by :func:`bar_options` (quiet under ``TQDM_DISABLE=1``).

    >>> from tqdm.auto import tqdm
    >>> for _ in tqdm(range(3), **bar_options(progress=False)): pass
"""

from __future__ import annotations

import os

__all__ = ["HEADLESS_ENV", "headless", "bar_options"]

HEADLESS_ENV = "NCIS_HEADLESS"


def headless() -> bool:
    """Whether this process is a headless run's kernel (``$NCIS_HEADLESS`` set and not ``0``)."""
    return os.environ.get(HEADLESS_ENV, "") not in ("", "0")


def bar_options(progress: bool) -> dict:
    """``{}`` when ``progress`` and not :func:`headless` (tqdm's defaults), else ``{"disable": True}``."""
    return {} if progress and not headless() else {"disable": True}
