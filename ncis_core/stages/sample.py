"""Stage 3: sample outlier embeddings from the tails of per-class Gaussians (METHOD.md §3)
↔ ``03_sample_outliers.ipynb``.

``ncis`` (the method): ``Z_c = f(x_i; c)`` over the class's training embeddings (all ``D`` outputs,
invariants included), ``μ_c`` = mean, ``Σ_c`` = unbiased covariance + ``λ I``; ``rounds`` times draw
``draws_per_round`` samples of ``N(μ_c, Σ_c)``, keep the ``keep_per_round`` with the lowest
log-density, and map them back with ``f⁻¹(·; c)``. ``linear`` (the ablation's baseline): the same
tail sampling directly in embedding space, no cVPN.

A draw is ``μ + L ε`` with ``L`` the Cholesky factor of ``Σ`` and ``ε ~ N(0, I)``, so its
log-density is ``−½‖ε‖² − Σ log L_ii − (D/2) log 2π``: the lowest-density draws are those with the
largest ``‖ε‖²``, and only the kept ones are multiplied by ``L``. Everything but the per-(class, round)
random streams is vectorised across classes (in chunks that bound memory); Gaussians are fitted in
float64. Each class and round has its own generator derived from the seed, so the result does not
depend on the chunking.

Writes ``outlier_embeddings.safetensors``: ``outliers`` (C × M × D float32, M = rounds × keep),
``log_density`` (C × M float64, under the Gaussian the draws came from), ``labels`` (C), metadata
``method``, the counts, ``reg_weight``, ``seed`` and the class names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..progress import bar_options
from ..config import ExperimentConfig, SampleConfig
from ..device import resolve_device
from ..embeddings_io import load_embeddings
from ..runs import RunDir, atomic_path, content_hash
from .train_cvpn import holdout_split, load_cvpn, validate_embeddings

__all__ = [
    "OUTLIERS_FORMAT",
    "class_generator",
    "draw_standard_normal",
    "class_gaussians",
    "tail_sample",
    "sample_outliers",
    "save_outliers",
    "load_outliers",
    "linear_outlier_embeddings",
    "run",
]

log = logging.getLogger(__name__)

OUTLIERS_FORMAT = "ncis-outliers/1"
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
    """Mean and unbiased covariance + ``reg_weight·I`` of the rows of each class in ``classes``
    (float64, no loop over classes: rows are gathered into a padded ``len(classes) × n_max × D`` block).
    """
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


@torch.no_grad()
def sample_outliers(x: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: SampleConfig,
                    seed: int, model=None, input_mean: torch.Tensor | None = None,
                    device: torch.device | str = "cpu", progress: bool = True) -> dict:
    """Outlier embeddings by ``cfg.method``: ``ncis`` needs ``model`` (a trained cVPN), ``linear`` not.

    Returns:
        ``{"outliers": C×M×D float32 (CPU), "log_density": C×M float64, "method": str}``.
    """
    device = torch.device(device)
    x, labels = x.to(device, torch.float32), labels.to(device)
    if cfg.method == "ncis":
        if model is None:
            raise ValueError("sample.method=ncis needs the trained cVPN")
        mean = input_mean.to(device) if input_mean is not None else torch.zeros(x.shape[1], device=device)
        z = torch.cat([model(x[i:i + 4096] - mean, labels[i:i + 4096]) for i in range(0, len(x), 4096)])
    elif cfg.method == "linear":
        z = x
    else:
        raise ValueError(f"unknown sample.method {cfg.method!r}; use ncis or linear")
    samples, log_density = tail_sample(z, labels, num_classes, cfg, seed, progress)
    if cfg.method == "ncis":
        flat = samples.reshape(-1, samples.shape[-1]).to(torch.float32)
        cls = torch.arange(num_classes, device=device).repeat_interleave(samples.shape[1])
        flat = torch.cat([model.inverse(flat[i:i + 4096], cls[i:i + 4096]) for i in range(0, len(flat), 4096)])
        outliers = (flat + mean).reshape(samples.shape)
    else:
        outliers = samples
    outliers = outliers.to(torch.float32).cpu()
    if not torch.isfinite(outliers).all():
        raise ValueError("sampled outliers contain NaN or Inf; the cVPN or the class covariances are "
                         "degenerate (try a larger sample.reg_weight)")
    return {"outliers": outliers, "log_density": log_density.cpu(), "method": cfg.method}


def save_outliers(path: str | os.PathLike, result: dict, metadata: dict) -> Path:
    """Write the outlier embeddings file atomically."""
    outliers = result["outliers"].contiguous()
    tensors = {"outliers": outliers, "log_density": result["log_density"].contiguous(),
               "labels": torch.arange(outliers.shape[0])}
    meta = {"format": OUTLIERS_FORMAT, "method": result["method"]}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_outliers(path: str | os.PathLike) -> dict:
    """Read ``outlier_embeddings.safetensors``: the tensors plus ``method`` and ``metadata``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        result = {k: f.get_tensor(k) for k in f.keys()}
    result["method"] = meta.get("method")
    result["metadata"] = meta
    return result


def linear_outlier_embeddings(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True) -> dict:
    """The linear baseline's outlier embeddings for a run (not an artefact of any stage).

    Stage 3's tail sampling done directly in embedding space (``sample.method=linear``, the rest of
    ``cfg.sample`` as it is) on the same training rows as stage 3 (the stage-2 holdout split), so the
    result is a deterministic function of the embeddings file and the config. The comparison renders
    images from it; the UMAP maps, notebook 03 and the explorer place it beside NCIS's outliers —
    several callers, several processes, and minutes of sampling at the paper's counts, so the result
    is kept in ``RUN/cache/linear_outliers/<key>.safetensors``, keyed by the embeddings' content and
    everything else it depends on.

    Returns:
        :func:`sample_outliers`'s dict: ``outliers`` (C × M × D float32), ``log_density`` (C × M),
        ``method`` (``"linear"``).

    Raises:
        MissingArtefactError: no embeddings (run stage 1 first).
    """
    embeddings_file = run_dir.require("embeddings")
    linear_cfg = replace(cfg.sample, method="linear")
    key = hashlib.sha256(json.dumps(
        [content_hash(embeddings_file), asdict(linear_cfg), cfg.cvpn.holdout_fraction, cfg.run.seed],
        sort_keys=True).encode()).hexdigest()[:24]
    cached = run_dir.root / "cache" / "linear_outliers" / f"{key}.safetensors"
    if cached.exists():
        result = load_outliers(cached)
        return {"outliers": result["outliers"], "log_density": result["log_density"], "method": "linear"}
    data = load_embeddings(embeddings_file)
    train_index, _ = holdout_split(data["labels"], cfg.cvpn.holdout_fraction, cfg.run.seed)
    result = sample_outliers(data["embeddings"][train_index], data["labels"][train_index],
                             data["num_classes"], linear_cfg, cfg.run.seed, progress=progress)
    cached.parent.mkdir(parents=True, exist_ok=True)
    save_outliers(cached, result, {"cache_of": "linear_outlier_embeddings"})
    return result


def run(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True) -> dict:
    """Stage 3: read the embeddings and the best cVPN, sample, write ``outlier_embeddings.safetensors``.

    Raises:
        ValueError: unusable embeddings, or embeddings whose width or class count do not match the
            checkpoint; nothing is written.
    """
    data = load_embeddings(run_dir.require("embeddings"))
    x, labels, num_classes = data["embeddings"], data["labels"], data["num_classes"]
    device = resolve_device(cfg.run.device)
    model, meta, mean = (None, {}, None)
    if cfg.sample.method == "ncis":
        model, meta, mean = load_cvpn(run_dir.require("cvpn_best"), device, cfg.cvpn.expm)
        if meta["num_classes"] != num_classes:
            raise ValueError(f"the cVPN checkpoint knows {meta['num_classes']} classes but the embeddings "
                             f"have {num_classes}; retrain stage 2 (cvpn) on these embeddings")
    validate_embeddings(x, labels, num_classes, dim=meta.get("dim"))
    train_index, _ = holdout_split(labels, cfg.cvpn.holdout_fraction, cfg.run.seed)
    validate_embeddings(x[train_index], labels[train_index], num_classes, dim=meta.get("dim"))
    with run_dir.stage("sample") as rec:
        if not rec.done:
            result = sample_outliers(x[train_index], labels[train_index], num_classes, cfg.sample,
                                     cfg.run.seed, model, mean, device, progress)
            save_outliers(run_dir.path("outlier_embeddings"), result, {
                "rounds": cfg.sample.rounds, "draws_per_round": cfg.sample.draws_per_round,
                "keep_per_round": cfg.sample.keep_per_round, "reg_weight": cfg.sample.reg_weight,
                "seed": cfg.run.seed, "k": meta.get("k"), "class_names": data["class_names"]})
            rec.info.update(method=cfg.sample.method, shape=list(result["outliers"].shape))
            log.info("wrote %s outlier embeddings (%s)", "×".join(map(str, result["outliers"].shape)),
                     cfg.sample.method)
    return load_outliers(run_dir.require("outlier_embeddings"))
