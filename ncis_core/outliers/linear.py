"""``linear``, the paper's ablation (METHOD.md §3b): §3's tail sampling done directly in embedding
space, no cVPN."""

from __future__ import annotations

import torch

from .spec import EMBEDDINGS, OutlierMethod
from .inputs import SampleInputs
from .tail import tail_sample

__all__ = ["sample_linear", "METHOD"]


@torch.no_grad()
def sample_linear(inputs: SampleInputs, params=None, progress: bool = True) -> dict:
    """``C × M × D`` outlier embeddings (M = rounds × keep) and their log-density."""
    samples, log_density = tail_sample(inputs.embeddings, inputs.labels, inputs.num_classes, inputs.tail,
                                       inputs.seed, progress)
    return {"outliers": samples, "log_density": log_density}


METHOD = OutlierMethod(
    name="linear", label="linear", produces=EMBEDDINGS, needs=("embeddings",), sample=sample_linear,
    summary="the same tail sampling directly in embedding space, no cVPN (the paper's ablation)")
