"""Pictures used by several stages: a labelled image grid, :func:`save_figure` (into the run's
``figures/``) and the note a notebook shows instead of a view that has too little data to draw.

    >>> import tempfile
    >>> from ncis_core.config import load_config
    >>> from ncis_core.runs import RunDir
    >>> black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    >>> fig = image_grid(["bear", "cat"], [[black, white, black], [white]])
    >>> len(fig.axes), [ax.get_ylabel() for ax in fig.axes[::3]]  # 2 rows × 3 columns
    (6, ['bear', 'cat'])
    >>> run = RunDir.create(load_config("smoke", out=tempfile.mkdtemp()))
    >>> save_figure(fig, run, "00_id_examples.png").relative_to(run.root).as_posix()
    'figures/00_id_examples.png'
    >>> with too_little_data_note("per-class maps"):
    ...     raise TooLittleData("1 embedding of bear: a UMAP map needs at least 5")
    <IPython.core.display.Markdown object>
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..errors import TooLittleData

__all__ = ["save_figure", "image_grid", "TooLittleData", "too_little_data_note"]


@contextmanager
def too_little_data_note(what: str):
    """On :class:`TooLittleData` inside, show ``*<what> not drawn: <why>*`` instead of stopping."""
    try:
        yield
    except TooLittleData as why:
        from IPython.display import Markdown, display

        display(Markdown(f"*{what} not drawn: {why}*"))


def save_figure(fig, run, name: str, dpi: int = 120) -> Path:
    """Save ``fig`` as ``<run>/figures/<name>`` and return the path."""
    path = run.figure_path(name)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def image_grid(row_names: list[str], rows: list[list[np.ndarray]], title: str = "", cell: float = 0.9):
    """A grid with one labelled row per entry of ``rows`` (lists of ``H×W×3`` uint8 images)."""
    n_cols = max((len(r) for r in rows), default=1) or 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(cell * n_cols + 1.2, cell * len(rows) + 0.4),
                             squeeze=False)
    for r, (name, images) in enumerate(zip(row_names, rows)):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_size_inches()[1]) if title else None)
    return fig
