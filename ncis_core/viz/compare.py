"""Pictures of ``compare`` (shown in ``06_evaluate.ipynb``): a forest plot of the paired differences
and a gallery of one class's outliers by method, the same starting noise in each column.

    >>> paired = [{"metric": "auroc", "method": "ncis", "reference": "linear", "set": "mean far",
    ...            "mean": 0.02, "low": 0.01, "high": 0.03, "detectable": 0.005, "told_apart": True,
    ...            "seeds": 3}]
    >>> fig = plot_paired_forest(paired)
    >>> fig.axes[0].get_xlabel(), [t.get_text() for t in fig.axes[0].get_yticklabels()]
    ('AUROC difference (points, ↑ better)', ['ncis − linear · far'])
    >>> fig.axes[0].lines[0].get_xdata().tolist()  # the 95 % interval, in points
    [1.0, 3.0]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

__all__ = ["plot_paired_forest", "method_gallery_rows", "plot_method_gallery"]

_METRICS = {"auroc": "AUROC difference (points, ↑ better)", "fpr95": "FPR95 difference (points, ↓ better)"}


def plot_paired_forest(paired: list[dict]):
    """One panel per metric: each paired difference with its 95 % t-interval (filled: told apart)
    and, shaded, ± the detectable difference."""
    metrics = [m for m in _METRICS if any(r["metric"] == m for r in paired)]
    labels = list(dict.fromkeys(f"{r['method']} − {r['reference']} · {r['set'].replace('mean ', '')}"
                                for r in paired if r["metric"] in metrics))
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(5.2 * max(len(metrics), 1), 0.34 * len(labels) + 1.4),
                             squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        for y, label in enumerate(labels):
            row = next((r for r in paired if r["metric"] == metric and
                        f"{r['method']} − {r['reference']} · {r['set'].replace('mean ', '')}" == label), None)
            if row is None:
                continue
            mean = 100 * row["mean"]
            if row.get("detectable") is not None:
                ax.fill_betweenx([y - 0.35, y + 0.35], -100 * row["detectable"], 100 * row["detectable"],
                                 color="0.9", zorder=0)
            if row["low"] is not None:
                ax.plot([100 * row["low"], 100 * row["high"]], [y, y], color="tab:blue", lw=1.4, zorder=2)
            apart = row.get("told_apart", row.get("separated", False))
            ax.plot(mean, y, "o", ms=6, zorder=3, color="tab:blue", markerfacecolor="tab:blue" if apart else "white")
        ax.axvline(0, color="0.3", ls="--", lw=0.8)
        ax.set_xlabel(_METRICS[metric])
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    seeds = max((r["seeds"] for r in paired), default=0)
    fig.suptitle(f"Paired by seed ({seeds} seeds): 95 % intervals; filled = told apart after Holm; "
                 f"grey = below the detectable difference", fontsize=9)
    fig.tight_layout()
    return fig


def method_gallery_rows(folders: dict[str, Path], class_index: int, n: int = 6
                        ) -> tuple[list[str], list[list[np.ndarray]], list[int]]:
    """``(methods, rows, seeds)``: per method folder, the first ``n`` images of a class on shared seeds."""
    indexes = {m: json.loads((Path(f) / "index.json").read_text())["images"] for m, f in folders.items()}
    by_seed = {m: {im["seed"]: im["file"] for im in images if im["class"] == class_index}
               for m, images in indexes.items()}
    common = sorted(set.intersection(*(set(v) for v in by_seed.values()))) if by_seed else []
    seeds = common[:n]
    rows = [[np.asarray(Image.open(Path(folders[m]) / by_seed[m][s]).convert("RGB")) for s in seeds]
            for m in folders]
    return list(folders), rows, seeds


def plot_method_gallery(methods: Sequence[str], rows: Sequence[Sequence[np.ndarray]], seeds: Sequence[int],
                        title: str = "", labels: dict[str, str] | None = None, cell: float = 1.1):
    """The gallery: one row per method, one column per starting-noise seed."""
    cols = max(len(seeds), 1)
    fig, axes = plt.subplots(len(methods), cols, figsize=(cell * cols + 1.4, cell * len(methods) + 0.5),
                             squeeze=False)
    for r, (method, images) in enumerate(zip(methods, rows)):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c], interpolation="nearest")
            if r == 0 and c < len(seeds):
                ax.set_title(f"seed {seeds[c]}", fontsize=7)
        axes[r][0].set_ylabel((labels or {}).get(method, method), fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
