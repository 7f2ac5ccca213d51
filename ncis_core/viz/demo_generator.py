"""Pictures of the demo generator's training (``extras/train_demo_generator.ipynb``): loss curves.

    >>> fig = plot_loss_curves({"vae": [0.9, 0.5, 0.4, 0.3], "unet": [1.0, 0.8, 0.9, 0.6]}, smooth=2)
    >>> [ax.get_title() for ax in fig.axes]
    ['vae loss', 'unet loss']
    >>> fig.axes[0].lines[1].get_ydata().round(2).tolist()  # the running mean over 2 steps
    [0.7, 0.45, 0.35]
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_loss_curves"]


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
