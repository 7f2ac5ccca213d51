"""``ncis``, the method (METHOD.md §3): tail sampling of per-class Gaussians in the cVPN's output
space ``Z_c = f(x_i; c)`` (all D outputs, invariants included), mapped back with ``f⁻¹(·; c)``."""

from __future__ import annotations

import torch

from .spec import EMBEDDINGS, OutlierMethod
from .inputs import SampleInputs
from .tail import tail_sample

__all__ = ["sample_ncis", "METHOD"]

_ROWS = 4096  # rows per cVPN call: bounds memory at the paper's 50 000 embeddings


@torch.no_grad()
def sample_ncis(inputs: SampleInputs, params=None, progress: bool = True) -> dict:
    """``C × M × D`` outlier embeddings (M = rounds × keep) and their log-density in Z."""
    model, meta, mean = inputs.cvpn()
    mean = mean.to(inputs.device) if mean is not None else torch.zeros(inputs.embeddings.shape[1],
                                                                       device=inputs.device)
    x, labels = inputs.embeddings, inputs.labels
    z = torch.cat([model(x[i:i + _ROWS] - mean, labels[i:i + _ROWS]) for i in range(0, len(x), _ROWS)])
    samples, log_density = tail_sample(z, labels, inputs.num_classes, inputs.tail, inputs.seed, progress)
    flat = samples.reshape(-1, samples.shape[-1]).to(torch.float32)
    cls = torch.arange(inputs.num_classes, device=inputs.device).repeat_interleave(samples.shape[1])
    flat = torch.cat([model.inverse(flat[i:i + _ROWS], cls[i:i + _ROWS]) for i in range(0, len(flat), _ROWS)])
    return {"outliers": (flat + mean).reshape(samples.shape), "log_density": log_density,
            "metadata": {"k": meta.get("k")}}


METHOD = OutlierMethod(
    name="ncis", label="NCIS", produces=EMBEDDINGS, needs=("embeddings", "cvpn"), sample=sample_ncis,
    summary="tail sampling of per-class Gaussians in the cVPN's latent space, mapped back (the paper)")
