"""Pictures: dataset counts, example grids (more to come: UMAP maps, galleries, curves, ROC).

Every function returns a matplotlib ``Figure``; :func:`save_figure` writes it under the run's
``figures/`` so that what a notebook shows survives a headless papermill run.

Example:
    >>> fig = plot_counts(summary)            # doctest: +SKIP
    >>> save_figure(fig, run, "00_counts.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .data.base import Split

__all__ = ["save_figure", "plot_counts", "image_grid", "split_examples"]


def save_figure(fig, run, name: str, dpi: int = 120) -> Path:
    """Save ``fig`` as ``<run>/figures/<name>`` and return the path."""
    path = run.figure_path(name)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_counts(summary: list[dict]):
    """Bar charts of images per class for every labelled split, and per set for the OOD sets."""
    labelled = [row for row in summary if row["per_class"] and row["role"] != "ood-far"]
    fig, axes = plt.subplots(1, len(labelled) + 1, figsize=(4 * (len(labelled) + 1), 3.2),
                             squeeze=False)
    for ax, row in zip(axes[0], labelled):
        names, counts = zip(*row["per_class"].items())
        ax.bar(range(len(names)), counts, color="tab:blue" if row["role"].startswith("id") else "tab:orange")
        ax.set_xticks(range(len(names)), names, rotation=60 if len(names) <= 20 else 90,
                      fontsize=8 if len(names) <= 20 else 4)
        ax.set_title(f"{row['name']} ({row['role']}): {row['count']}")
    ax = axes[0][-1]
    ood = [row for row in summary if row["role"].startswith("ood")]
    ax.bar([r["name"] for r in ood], [r["count"] for r in ood],
           color=["tab:orange" if r["role"] == "ood-near" else "tab:red" for r in ood])
    ax.set_title("OOD sets (orange: near, red: far)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def split_examples(split: Split, per_group: int = 8, seed: int = 0, by_class: bool = True
                   ) -> tuple[list[str], list[list[np.ndarray]]]:
    """Up to ``per_group`` seeded example images per class (``by_class`` and a labelled split) or
    for the whole set; returns ``(row names, rows of images)`` for :func:`image_grid`."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.dataset.labels)
    if by_class and split.classes:
        groups = [(name, np.flatnonzero(labels == i)) for i, name in enumerate(split.classes)]
    else:
        groups = [(split.name, np.arange(len(labels)))]
    names, rows = [], []
    for name, index in groups:
        chosen = rng.choice(index, size=min(per_group, len(index)), replace=False) if len(index) else []
        names.append(name)
        rows.append([split.dataset[int(i)][0] for i in chosen])
    return names, rows


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
