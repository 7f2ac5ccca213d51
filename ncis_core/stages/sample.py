"""Stage 3: outlier embeddings by ``sample.method`` (METHOD.md §3, §3b) ↔ ``03_sample_outliers.ipynb``.

The stage runs one registered outlier method (:mod:`ncis_core.outliers`) on the training rows of
stage 1's embeddings (the stage-2 holdout split's training part): ``ncis`` (the method: tail sampling
in the cVPN's latent space, mapped back), ``linear`` (the same in embedding space) or
``knn_boundary`` (Dream-OOD's sampler), or any method registered beside them.

Writes ``outlier_embeddings.safetensors``: ``outliers`` (C × M × D float32), ``log_density`` (C × M
float64, under the Gaussian the draws came from; NaN for a method that draws from none), the method's
other per-outlier tensors (``knn_distance`` for ``knn_boundary``), ``labels`` (C), metadata
``method``, the tail sampler's counts, ``reg_weight``, ``seed`` and the class names
(:mod:`ncis_core.outliers.files` writes and reads it).
"""

from __future__ import annotations

import logging

from ..config import ExperimentConfig
from ..outliers import get_method
from ..outliers.base import method_inputs
from ..outliers.files import load_outliers, save_outliers
from ..outliers.inputs import sample_inputs
from ..outliers.sources import sample_method
from ..runs import RunDir, Stage, register_stage

__all__ = ["run"]

log = logging.getLogger(__name__)


def _inputs(cfg: ExperimentConfig) -> tuple[str, ...]:
    return method_inputs(cfg, cfg.sample.method)[0]  # the cVPN only for a method that needs it


def _sections(cfg: ExperimentConfig) -> tuple[str, ...]:
    return method_inputs(cfg, cfg.sample.method)[1]  # e.g. the generator for the class tokens' rows


# Stage 3 reads what ``sample.method`` needs (embeddings; the cVPN for ncis) and writes the outlier
# embeddings; its config: ``sample``, the holdout split, and what the method reads.
STAGE = register_stage(Stage(3, "sample", ("sample",), ("embeddings", "cvpn_best"), ("outlier_embeddings",),
                             inputs_for=_inputs, sections_for=_sections))


def run(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True) -> dict:
    """Stage 3: run ``sample.method`` on the embeddings, write ``outlier_embeddings.safetensors``.

    Raises:
        ValueError: unusable embeddings, or embeddings whose width or class count do not match the
            checkpoint; nothing is written.
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
