"""Stage 3: outlier embeddings by ``sample.method`` (METHOD.md §3, §3b) ↔ ``03_sample_outliers.ipynb``.

Runs one registered outlier method (:mod:`ncis_core.outliers`) on the stage-2 holdout split's training
rows and writes ``outlier_embeddings.safetensors``; other methods' embeddings are computed on the same
rows and cached (:func:`method_outlier_file`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoints import load_cvpn
from ..config import ExperimentConfig
from ..device import resolve_device
from ..embeddings_io import holdout_split, load_embeddings, load_outliers, save_outliers, validate_embeddings
from ..outliers.base import EMBEDDINGS, get_method, method_params
from ..outliers.inputs import SampleInputs
from ..runs import STAGES, RunDir, cache_key, cache_path, content_hash, method_inputs, sampled_by_stage3

__all__ = ["sample_inputs", "sample_method", "method_outlier_file", "method_outlier_embeddings", "run"]

log = logging.getLogger(__name__)


def sample_inputs(cfg: ExperimentConfig, run_dir: RunDir, device: torch.device | str | None = None
                  ) -> SampleInputs:
    """Every sampler's inputs: the stage-2 holdout split's training rows (cVPN, token rows on demand).

    Raises:
        MissingArtefactError / StaleArtefactError: no current embeddings (or cVPN, when asked for).
        ValueError: unusable embeddings, or a checkpoint that does not fit them.
    """
    device = torch.device(device) if device is not None else resolve_device(cfg.run.device)
    data = load_embeddings(run_dir.require("embeddings"))
    x, labels, num_classes = data["embeddings"], data["labels"], data["num_classes"]
    validate_embeddings(x, labels, num_classes)
    train_index, _ = holdout_split(labels, cfg.cvpn.holdout_fraction, cfg.run.seed)
    validate_embeddings(x[train_index], labels[train_index], num_classes)

    def cvpn():
        model, meta, mean = load_cvpn(run_dir.require("cvpn_best"), device, cfg.cvpn.expm)
        if meta["num_classes"] != num_classes:
            raise ValueError(f"the cVPN checkpoint knows {meta['num_classes']} classes but the embeddings "
                             f"have {num_classes}; retrain stage 2 (cvpn) on these embeddings")
        validate_embeddings(x, labels, num_classes, dim=meta.get("dim"))
        return model, meta, mean

    def token_rows():
        # stage 4's pipeline's rows for the embeddings' class names, in float32 (as the original injects)
        from .. import diffusion

        pipe, tokens = diffusion.pipeline_with_class_tokens(cfg, list(data["class_names"]), device,
                                                            dtype=torch.float32)
        return diffusion.class_token_rows(pipe, tokens)

    return SampleInputs(x[train_index].to(device, torch.float32), labels[train_index].to(device), num_classes,
                        list(data["class_names"]), cfg.run.seed, cfg.sample, device, cvpn, token_rows)


def sample_method(cfg: ExperimentConfig, run: RunDir, name: str, progress: bool = True,
                  device: torch.device | str | None = None, inputs: SampleInputs | None = None) -> dict:
    """Run method ``name``'s sampler on the run's training rows (no cache; ``inputs`` if already built):
    ``outliers`` (C × M × D, CPU), ``log_density`` (C × M; NaN without a Gaussian), ``metadata``, ...

    Raises:
        ValueError: the method produces no embeddings, or non-finite ones.
    """
    method = get_method(name)
    if method.produces != EMBEDDINGS:
        raise ValueError(f"outlier method {name!r} produces {method.produces}, not embeddings")
    inputs = inputs if inputs is not None else sample_inputs(cfg, run, device)
    result = method.sample(inputs, method_params(method, cfg.sample.method_args), progress)
    outliers = result["outliers"].to(torch.float32).cpu()
    if not torch.isfinite(outliers).all():
        raise ValueError(f"{name}: sampled outliers contain NaN or Inf; the cVPN or the class covariances "
                         f"are degenerate (try a larger sample.reg_weight)")
    out = {key: value.cpu() for key, value in result.items() if isinstance(value, torch.Tensor)}
    out["outliers"] = outliers
    out.setdefault("log_density", torch.full(outliers.shape[:2], float("nan"), dtype=torch.float64))
    out.update(method=name, metadata={**result.get("metadata", {}), "class_names": inputs.class_names})
    return out


def method_outlier_embeddings(cfg: ExperimentConfig, run: RunDir, name: str, progress: bool = True) -> dict:
    """Method ``name``'s outlier embeddings (:func:`method_outlier_file`, read by ``load_outliers``)."""
    return load_outliers(method_outlier_file(cfg, run, name, progress))


def method_outlier_file(cfg: ExperimentConfig, run: RunDir, name: str, progress: bool = True) -> Path:
    """The file of method ``name``'s outlier embeddings: this stage's when it ran that method, else computed
    once into ``cache/outlier_embeddings/<name>-<key>.safetensors`` (:func:`~ncis_core.runs.cache_key`)."""
    if sampled_by_stage3(cfg, name):
        return run.require("outlier_embeddings")
    artefacts, sections = method_inputs(cfg, name)
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cfg)
    key = cache_key({a: content_hash(run.require(a)) for a in artefacts},
                    {"method": name, "seed": cfg.run.seed,
                     **{s: OmegaConf.to_container(OmegaConf.select(node, s)) if OmegaConf.is_config(
                         OmegaConf.select(node, s)) else OmegaConf.select(node, s) for s in sections}},
                    versions=("torch", "ncis-kit"))
    cached = cache_path(run.root, "outlier_embeddings", f"{name}-{key}", ".safetensors")
    if not cached.exists():
        result = sample_method(cfg, run, name, progress)
        save_outliers(cached, result, {"cache_of": f"outlier embeddings of {name}", **result["metadata"]})
    return cached


# Stage 3 reads what ``sample.method`` needs (embeddings; the cVPN for ncis), writes outlier embeddings.
STAGE = STAGES["sample"]


def run(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True) -> dict:
    """Stage 3: run ``sample.method`` on the embeddings, write ``outlier_embeddings.safetensors``.

    Raises:
        ValueError: unusable embeddings, or ones that do not fit the checkpoint; nothing is written.
    """
    method = get_method(cfg.sample.method)
    inputs = sample_inputs(cfg, run_dir)  # unusable embeddings or checkpoint: refused before the stage starts
    if "cvpn" in method.needs:
        inputs.cvpn()
    with run_dir.stage("sample") as rec:
        if not rec.done:
            result = sample_method(cfg, run_dir, method.name, progress, inputs=inputs)
            s = cfg.sample
            save_outliers(run_dir.path("outlier_embeddings"), result, {
                **result["metadata"], "rounds": s.rounds, "draws_per_round": s.draws_per_round,
                "keep_per_round": s.keep_per_round, "reg_weight": s.reg_weight, "seed": cfg.run.seed,
                "method_args": s.method_args.get(s.method, {})})
            rec.info.update(method=s.method, shape=list(result["outliers"].shape))
            log.info("wrote %s outlier embeddings (%s)", "×".join(map(str, result["outliers"].shape)), s.method)
    return load_outliers(run_dir.require("outlier_embeddings"))
