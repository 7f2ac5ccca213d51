"""Progress bars: one rule for every loop of the kit.

``tqdm.auto`` bars everywhere (a widget in JupyterLab, text in a terminal), quiet under
``TQDM_DISABLE=1``. tqdm reads that variable only for arguments the caller leaves unset, so a
bar must never be given ``disable=False`` (it would override the variable) nor ``disable=None``
(it would hide the bar wherever stderr is not a terminal, JupyterLab included):
:func:`bar_options` gives ``disable=True`` only when the caller turned progress off.

Example:
    >>> from tqdm.auto import tqdm
    >>> for _ in tqdm(range(3), **bar_options(progress=False)): pass
"""

from __future__ import annotations

__all__ = ["bar_options"]


def bar_options(progress: bool) -> dict:
    """``{}`` when ``progress`` (tqdm's defaults, which honour ``TQDM_DISABLE``), else ``{"disable": True}``."""
    return {} if progress else {"disable": True}
