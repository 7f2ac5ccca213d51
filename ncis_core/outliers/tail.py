"""Tail sampling of per-class Gaussians (METHOD.md §3), shared by ``ncis`` and ``linear``: per class,
``rounds`` times draw ``draws_per_round`` samples of ``N(μ_c, Σ_c + λI)``, keep the ``keep_per_round``
of lowest density."""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..progress import bar_options

if TYPE_CHECKING:
    from ..config import SampleConfig  # any object with rounds, draws_per_round, keep_per_round, reg_weight

__all__ = ["class_generator", "draw_standard_normal", "class_gaussians", "tail_sample"]

_CHUNK_BYTES = 256 * 2**20  # memory budget of one chunk of classes' draws


def class_generator(seed: int, cls: int, rnd: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of class ``cls``'s draws in round ``rnd``."""
    state = np.random.SeedSequence([seed, 3, cls, rnd]).generate_state(2)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_standard_normal(seed: int, cls: int, rnd: int, draws: int, dim: int,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``draws × dim`` float64 standard-normal draws ``ε`` of class ``cls`` in round ``rnd``."""
    return torch.randn(draws, dim, generator=class_generator(seed, cls, rnd, device), device=device,
                       dtype=torch.float64)


def class_gaussians(z: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, reg_weight: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance + ``reg_weight·I`` (float64) of each class in ``classes``, batched."""
    z = z.to(torch.float64)
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=int(classes.max()) + 1)
    starts = torch.cumsum(counts, 0) - counts
    n = counts[classes]
    j = torch.arange(int(n.max()), device=z.device)
    mask = j[None, :] < n[:, None]
    pos = (starts[classes][:, None] + j[None, :]).clamp(max=len(order) - 1)
    block = z[order[pos]] * mask[..., None]
    mean = block.sum(1) / n[:, None]
    centred = (block - mean[:, None, :]) * mask[..., None]
    cov = centred.transpose(1, 2) @ centred / (n - 1)[:, None, None]
    cov = cov + reg_weight * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    return mean, cov


def tail_sample(z: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: SampleConfig, seed: int,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class, ``rounds × keep_per_round`` lowest-density draws of ``N(μ_c, Σ_c)``.

    Returns:
        ``(samples, log_density)``: ``C × M × D`` and ``C × M`` float64 (M = rounds × keep), round by
        round, lowest density first within a round.
    """
    if cfg.keep_per_round > cfg.draws_per_round:
        raise ValueError(f"sample.keep_per_round={cfg.keep_per_round} exceeds "
                         f"sample.draws_per_round={cfg.draws_per_round}")
    device, dim = z.device, z.shape[1]
    per_class = 8 * (dim * dim * 3 + cfg.draws_per_round * dim * 2)
    chunk = max(1, min(num_classes, _CHUNK_BYTES // per_class))
    samples = torch.empty(num_classes, cfg.rounds * cfg.keep_per_round, dim, dtype=torch.float64,
                          device=device)
    log_density = torch.empty(num_classes, cfg.rounds * cfg.keep_per_round, dtype=torch.float64,
                              device=device)
    bar = tqdm(total=num_classes, desc="tail sampling", unit="class", **bar_options(progress))
    for first in range(0, num_classes, chunk):
        classes = torch.arange(first, min(first + chunk, num_classes), device=device)
        mean, cov = class_gaussians(z, labels, classes, cfg.reg_weight)
        chol, info = torch.linalg.cholesky_ex(cov)
        if info.any():
            bad = int(classes[info.nonzero()[0]])
            raise ValueError(f"the covariance of class {bad} is not positive definite; "
                             f"raise sample.reg_weight (now {cfg.reg_weight})")
        const = -torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) - dim / 2 * math.log(2 * math.pi)
        eps = torch.empty(len(classes), cfg.draws_per_round, dim, dtype=torch.float64, device=device)
        for r in range(cfg.rounds):
            for i, c in enumerate(classes.tolist()):
                eps[i] = draw_standard_normal(seed, c, r, cfg.draws_per_round, dim, device)
            sq = eps.pow(2).sum(-1)
            top = torch.topk(sq, cfg.keep_per_round, dim=1, largest=True, sorted=True).indices
            kept = torch.gather(eps, 1, top[..., None].expand(-1, -1, dim))
            out = slice(r * cfg.keep_per_round, (r + 1) * cfg.keep_per_round)
            samples[classes, out] = mean[:, None, :] + kept @ chol.transpose(1, 2)
            log_density[classes, out] = -0.5 * torch.gather(sq, 1, top) + const[:, None]
        bar.update(len(classes))
    bar.close()
    return samples, log_density
