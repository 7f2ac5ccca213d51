"""Pictures of stages 2 and 3 (``02_train_cvpn.ipynb``, ``03_sample_outliers.ipynb``): cVPN loss
curves, per-class PCA spectra, invariant energies, class maps.

    >>> history = {"k": 30, "dim": 32, "best_epoch": 2, "per_epoch": [
    ...     {"epoch": e, "inv_loss": 0.1 / e, "rec_loss": 0.01 / e, "selection_mse": 0.2 / e, "lr": 1e-3}
    ...     for e in (1, 2)]}
    >>> fig = plot_cvpn_history(history)
    >>> fig.axes[0].get_title(), fig.axes[0].get_yscale()
    ('cVPN losses (k = 30 of D = 32)', 'log')
    >>> [text.get_text() for text in fig.axes[0].get_legend().get_texts()][-1]
    'best epoch 2'
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

__all__ = ["plot_cvpn_history", "plot_pca_spectrum", "plot_invariant_energy", "plot_class_map"]


def plot_cvpn_history(history: dict):
    """Per-epoch invariance and reconstruction losses, the selection MSE (best epoch marked) and lr."""
    rows = history["per_epoch"]
    epochs = [r["epoch"] for r in rows]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax.plot(epochs, [r["inv_loss"] for r in rows], "o-", label="L_inv (train, mean over batches)")
    ax.plot(epochs, [r["rec_loss"] for r in rows], "s-", label="L_rec (train)")
    ax.plot(epochs, [r["selection_mse"] for r in rows], "^-", label="invariant MSE (selection subset)")
    if history.get("best_epoch"):
        ax.axvline(history["best_epoch"], color="grey", ls=":", label=f"best epoch {history['best_epoch']}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_title(f"cVPN losses (k = {history['k']} of D = {history['dim']})")
    ax.legend(fontsize=7)
    ax_lr.plot(epochs, [r["lr"] for r in rows], "o-", color="tab:purple")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_title("learning rate at the end of each epoch")
    fig.tight_layout()
    return fig


def plot_pca_spectrum(spectra: list[np.ndarray], dim: int, k: int, variance_pct: float,
                      class_names: list[str], max_classes: int = 12):
    """Cumulative explained variance per class, with ``1 − p/100`` and ``D − k`` marked."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for ratio, name in list(zip(spectra, class_names))[:max_classes]:
        ax.plot(np.arange(len(ratio)), np.cumsum(ratio), lw=1, label=name)
    ax.axhline(1 - variance_pct / 100, color="k", ls="--", lw=0.8, label=f"1 − {variance_pct:g}%")
    ax.axvline(dim - k, color="tab:red", ls=":", label=f"D − k = {dim - k} (k = {k})")
    ax.set_xlabel("principal component (0-based)")
    ax.set_ylabel("cumulative explained variance")
    shown = min(len(spectra), max_classes)
    ax.set_title(f"per-class PCA spectra ({shown} of {len(spectra)} classes)")
    ax.set_xlim(0, max(max(len(r) for r in spectra), dim - k + 1))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_invariant_energy(groups: dict, class_names: list[str], classes: list[int], bins: int = 20):
    """Histograms of the invariant energy, one panel per class in ``classes``.

    ``groups``: name → ``(energies, labels)``, e.g. training / held-out / outliers.
    """
    fig, axes = plt.subplots(1, len(classes), figsize=(3.4 * len(classes), 3), squeeze=False)
    for ax, c in zip(axes[0], classes):
        values = {name: np.asarray(e)[np.asarray(lab) == c] for name, (e, lab) in groups.items()}
        present = [v for v in values.values() if len(v)]
        if not present:
            continue
        lo = np.log10(max(min(v.min() for v in present), 1e-12))
        hi = np.log10(max(max(v.max() for v in present), 1e-12)) + 1e-6
        edges = np.logspace(lo, hi, bins + 1)
        for name, v in values.items():
            if len(v):
                ax.hist(v, bins=edges, alpha=0.55, label=f"{name} ({len(v)})")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(class_names[c], fontsize=9)
        ax.set_xlabel("mean of squared last k outputs")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("invariant energy", fontsize=10)
    fig.tight_layout()
    return fig


def plot_class_map(embeddings: np.ndarray, others: dict, title: str):
    """A 2-D PCA map of one class's embeddings and of other point sets (``name → N × D``)."""
    x = np.asarray(embeddings, dtype=np.float64)
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    axes2 = vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 4.3))
    p = (x - mean) @ axes2
    ax.scatter(p[:, 0], p[:, 1], s=10, c="tab:blue", label=f"class embeddings ({len(x)})")
    styles = [("x", "tab:red"), ("+", "tab:orange"), ("^", "tab:green"), ("s", "tab:purple")]
    for i, (name, pts) in enumerate(others.items()):
        q = (np.asarray(pts, dtype=np.float64) - mean) @ axes2
        marker, color = styles[i % len(styles)]
        ax.scatter(q[:, 0], q[:, 1], s=28, marker=marker, c=color, label=f"{name} ({len(q)})")
    ax.set_xlabel("PC 1 of the class")
    ax.set_ylabel("PC 2 of the class")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
