"""Progress bars: one rule for every loop of the kit.

``tqdm.auto`` bars everywhere (a widget in JupyterLab, text in a terminal), quiet under
``TQDM_DISABLE=1``. tqdm reads that variable only for arguments the caller leaves unset, so a
bar must never be given ``disable=False`` (it would override the variable) nor ``disable=None``
(it would hide the bar wherever stderr is not a terminal, JupyterLab included):
:func:`bar_options` gives ``disable=True`` only when the caller turned progress off, or in a
headless run (``$NCIS_HEADLESS``, set by the runner for its kernels: no one watches those bars,
and papermill would save each one frozen at its first frame, "0%| 0/5").

Example:
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
    """``{}`` when ``progress`` (tqdm's defaults, which honour ``TQDM_DISABLE``), else ``{"disable": True}``;
    ``{"disable": True}`` in a headless run too (:func:`headless`)."""
    return {} if progress and not headless() else {"disable": True}
