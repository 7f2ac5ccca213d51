"""Pictures of stage 5 (``05_train_classifier.ipynb``): the classifier's training curves per epoch.

    >>> q = [1.0, 2.0, 3.0, 4.0, 5.0]  # the energy score's 5, 25, 50, 75 and 95 % quantiles
    >>> history = {"epochs": [{"epoch": e, "ce": 2.0 / e, "energy_loss": 0.5 / e, "train_acc": 0.4 * e,
    ...                        "slope": 0.1 * e, "score_quantiles_id": q, "score_quantiles_outlier": q}
    ...                       for e in (1, 2)]}
    >>> fig = plot_classifier_history(history)
    >>> [ax.get_title() for ax in fig.axes][:2], [line.get_label() for line in fig.axes[0].lines]
    (['losses', 'training accuracy (augmented ID)'], ['cross-entropy (ID)', 'energy loss'])
    >>> fig.axes[1].lines[0].get_ydata().tolist()
    [0.4, 0.8]
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_classifier_history"]


def plot_classifier_history(history: dict):
    """Losses, training accuracy, the energy head's slope and the ID vs outlier score bands per epoch."""
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
