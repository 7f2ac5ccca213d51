"""Pictures of stage 1 (``01_embed.ipynb``): how far per-image embeddings moved from their class
token, and a PCA map of the embeddings.

    >>> x, labels, rows = [[3.0, 4.0], [1.0, 2.0], [6.0, 8.0]], [0, 1, 0], [[0.0, 0.0], [1.0, 1.0]]
    >>> fig = plot_token_distances(x, labels, rows, ["bear", "cat"])
    >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
    ['bear', 'cat']
    >>> fig.axes[0].lines[-1].get_ydata().round(3).tolist()  # the rows' own norms ‖e_c‖
    [0.0, 1.414]
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_token_distances", "plot_embedding_pca"]


def plot_token_distances(embeddings, labels, class_rows, names: Sequence[str], max_classes: int = 30):
    """Per class, a box plot of ‖x_i − e_c‖ and, dashed, the row's own norm for scale."""
    x, y, rows = np.asarray(embeddings), np.asarray(labels), np.asarray(class_rows)
    classes = list(range(min(len(names), max_classes)))
    dist = [np.linalg.norm(x[y == c] - rows[c], axis=1) for c in classes]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(classes) + 2), 3.4))
    ax.boxplot(dist, showfliers=False)
    ax.plot(range(1, len(classes) + 1), np.linalg.norm(rows[classes], axis=1), "k_", ms=14,
            label="‖e_c‖ (the class token's own norm)")
    ax.set_xticks(range(1, len(classes) + 1), [names[c] for c in classes], rotation=60, fontsize=8)
    ax.set_ylabel("‖x_i − e_c‖")
    ax.set_title("distance of each image's embedding from its class token's row")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_embedding_pca(embeddings, labels, names: Sequence[str], class_rows=None, max_classes: int = 20):
    """The embeddings on their first two principal components, with the class tokens' rows as crosses."""
    x, y = np.asarray(embeddings, dtype=np.float64), np.asarray(labels)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    proj = (x - mean) @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c in range(min(len(names), max_classes)):
        color = cmap(c % cmap.N)
        ax.scatter(*proj[y == c].T, s=8, color=color, alpha=0.6, label=names[c])
        if class_rows is not None:
            row = (np.asarray(class_rows[c], dtype=np.float64) - mean) @ vt[:2].T
            ax.scatter(*row, marker="X", s=90, color=color, edgecolors="black")
    ax.set_xlabel("PC 1"), ax.set_ylabel("PC 2")
    ax.set_title("per-image embeddings (PCA); ✕ = class token rows")
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    return fig
