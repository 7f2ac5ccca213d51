"""Pictures: dataset counts, example grids, stage-5 training curves, score histograms, ROC curves.

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

__all__ = ["save_figure", "plot_counts", "image_grid", "split_examples", "plot_classifier_history",
           "plot_score_histograms", "plot_roc", "plot_loss_curves"]


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


# ----------------------------------------------------------------------------- stages 5 and 6
def plot_classifier_history(history: dict):
    """Stage 5's curves per epoch: losses, training accuracy, the energy head's slope, and the
    ID vs outlier energy-score distributions (median and 5–95 % band) during training."""
    epochs = [e["epoch"] for e in history["epochs"]]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    axes[0].plot(epochs, [e["ce"] for e in history["epochs"]], "o-", ms=3, label="cross-entropy (ID)")
    with_outliers = history["epochs"][0].get("energy_loss") is not None
    if with_outliers:
        axes[0].plot(epochs, [e["energy_loss"] for e in history["epochs"]], "o-", ms=3, label="energy loss")
    axes[0].set_title("losses"), axes[0].legend(fontsize=8)
    axes[1].plot(epochs, [e["train_acc"] for e in history["epochs"]], "o-", ms=3)
    axes[1].set_title("training accuracy (augmented ID)")
    if with_outliers:
        axes[2].plot(epochs, [e["slope"] for e in history["epochs"]], "o-", ms=3)
        axes[2].axhline(0, color="grey", lw=0.8)
    else:
        axes[2].text(0.5, 0.5, "no energy loss\n(outliers: none)", ha="center", va="center",
                     transform=axes[2].transAxes)
    axes[2].set_title("energy head slope a (< 0: ranks backwards)")
    for key, color, label in [("score_quantiles_id", "tab:blue", "ID"),
                              ("score_quantiles_outlier", "tab:red", "outliers")]:
        q = [e.get(key) for e in history["epochs"]]
        if q[0] is None:
            continue
        q = np.array(q)
        axes[3].fill_between(epochs, q[:, 0], q[:, 4], color=color, alpha=0.2)
        axes[3].plot(epochs, q[:, 2], "o-", ms=3, color=color, label=f"{label} (median, 5–95 %)")
    axes[3].set_title("energy score logsumexp during training"), axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    return fig


def plot_score_histograms(raw: dict, score: str, id_name: str = "id-test", roles: dict | None = None):
    """One histogram panel per OOD set: the ID test scores against that set's (``raw`` from
    ``results/scores.npz``: ``<score>/<set>`` → scores)."""
    sets = [k.split("/", 1)[1] for k in raw if k.startswith(f"{score}/") and not k.endswith(f"/{id_name}")]
    cols = min(len(sets), 4) or 1
    rows_n = math.ceil(len(sets) / cols) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False)
    id_scores = np.asarray(raw[f"{score}/{id_name}"])
    for ax, name in zip(axes.flat, sets):
        ood = np.asarray(raw[f"{score}/{name}"])
        bins = np.histogram_bin_edges(np.concatenate([id_scores, ood]), bins=40)
        ax.hist(id_scores, bins=bins, alpha=0.6, density=True, label="ID test", color="tab:blue")
        ax.hist(ood, bins=bins, alpha=0.6, density=True, label=name, color="tab:red")
        role = f" ({roles[name]})" if roles and name in roles else ""
        ax.set_title(f"{name}{role}", fontsize=9), ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(sets):]:
        ax.axis("off")
    fig.suptitle(f"{score} score (higher = more ID)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_roc(raw: dict, score: str, id_name: str = "id-test"):
    """ROC curves (ID positive) of every OOD set for one score."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    id_scores = np.asarray(raw[f"{score}/{id_name}"])
    for key in raw:
        if key.startswith(f"{score}/") and key != f"{score}/{id_name}":
            ood = np.asarray(raw[key])
            y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood))]
            s = np.r_[id_scores, ood]
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{key.split('/', 1)[1]} (AUROC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.axhline(0.95, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("OOD accepted (FPR)"), ax.set_ylabel("ID kept (TPR)")
    ax.set_title(f"ROC, ID positive — {score}", fontsize=10), ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_loss_curves(history: dict[str, list[float]], smooth: int = 25, log_scale: bool = True):
    """One panel per named loss curve (per step), raw and as a running mean over ``smooth`` steps."""
    fig, axes = plt.subplots(1, len(history), figsize=(5 * len(history), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], history.items()):
        values = np.asarray(values, dtype=float)
        k = max(1, min(smooth, len(values)))
        ax.plot(values, alpha=0.3, lw=0.8)
        ax.plot(np.arange(len(values) - k + 1) + (k - 1) / 2, np.convolve(values, np.ones(k) / k, "valid"))
        ax.set_title(f"{name} loss"), ax.set_xlabel("step")
        if log_scale:
            ax.set_yscale("log")
    fig.tight_layout()
    return fig
