"""Pictures of stage 6 (``06_evaluate.ipynb``): ID against OOD score histograms, ROC curves.

    >>> raw = {"energy/id-test": np.array([3.0, 2.5, 2.0]), "energy/svhn": np.array([1.0, 2.2])}
    >>> fig = plot_roc(raw, "energy")
    >>> [text.get_text() for text in fig.axes[0].get_legend().get_texts()]  # 5 of 6 pairs ranked right
    ['svhn (AUROC 0.833)']
    >>> [ax.get_title() for ax in plot_score_histograms(raw, "energy", roles={"svhn": "ood-far"}).axes]
    ['svhn (ood-far)']
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_score_histograms", "plot_roc"]


def plot_score_histograms(raw: dict, score: str, id_name: str = "id-test", roles: dict | None = None):
    """One histogram panel per OOD set: ID test scores against its (``raw``: ``<score>/<set>`` → scores)."""
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
