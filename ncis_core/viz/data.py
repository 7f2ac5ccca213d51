"""Pictures of stage 0 (``00_data.ipynb``): images per class and per OOD set, seeded example rows.

    >>> from ncis_core.config import load_config
    >>> from ncis_core.data import build_splits
    >>> from ncis_core.stages.data_summary import summarize
    >>> splits = build_splits(load_config("smoke").data)
    >>> fig = plot_counts(summarize(splits))
    >>> [ax.get_title() for ax in fig.axes]  # the labelled splits (near-OOD too), then the OOD sets
    ['id-train (id-train): 48', 'id-test (id-test): 48', 'demo_near (ood-near): 16',
     'OOD sets (orange: near, red: far)']
    >>> names, rows = split_examples(splits[0], per_group=3)  # the rows of an image_grid
    >>> names[:2], [len(row) for row in rows], rows[0][0].shape
    (['bear', 'bird'], [3, 3, 3, 3, 3, 3], (32, 32, 3))
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..data.base import Split

__all__ = ["plot_counts", "split_examples"]


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
    """``(row names, rows)`` for :func:`image_grid`: up to ``per_group`` seeded images per class or set."""
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
