"""Pictures of stage 4 (``04_generate_outliers.ipynb``): ordinary generations beside NCIS outliers.

    >>> image = np.zeros((32, 32, 3), np.uint8)
    >>> fig = plot_outlier_rows(["bear"], [[image, image]], [[image]])
    >>> len(fig.axes), [ax.get_ylabel() for ax in fig.axes[::2]]
    (4, ['bear: class prompt', 'bear: NCIS outliers'])
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .common import image_grid

__all__ = ["plot_outlier_rows"]


def plot_outlier_rows(names: Sequence[str], ordinary: Sequence[Sequence[np.ndarray]],
                      outliers: Sequence[Sequence[np.ndarray]], title: str = ""):
    """Per class two rows: ordinary generations from the class prompt, then NCIS outliers."""
    row_names, rows = [], []
    for name, plain, odd in zip(names, ordinary, outliers):
        row_names += [f"{name}: class prompt", f"{name}: NCIS outliers"]
        rows += [list(plain), list(odd)]
    return image_grid(row_names, rows, title=title)
