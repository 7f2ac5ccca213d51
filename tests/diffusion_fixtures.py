"""Shared helpers of the diffusion-stage tests: offline environment, one CPU thread, run folders
with stage-3 outlier embeddings written in stage 3's own format."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in these tests may reach the hub
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent

# Few images and classes, one step: the stage code runs every line in seconds.
SMALL = ["data.max_per_class=2", "embed.steps=2", "embed.noise_batch=2", "embed.images_per_step=3",
         "embed.shard_size=4"]


def subprocess_env() -> dict:
    """Environment for child processes (CLI runs, accelerate launch)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def write_outliers(run, outliers: torch.Tensor, class_names) -> Path:
    """Put ``outliers`` (C × M × D) into ``run`` as stage 3 would: through recorded stages 1–3
    (stand-in embeddings and cVPN files), with stage 3's own writer."""
    from ncis_core.embeddings_io import save_embeddings, synthetic_embeddings
    from ncis_core.runs import atomic_write_json, atomic_write_text
    from ncis_core.embeddings_io import save_outliers

    c, _, d = outliers.shape
    with run.stage("embed") as rec:
        if not rec.done:
            save_embeddings(run.path("embeddings"), **synthetic_embeddings(c, 4, d, class_names=class_names))
    with run.stage("cvpn") as rec:
        if not rec.done:
            atomic_write_text(run.path("cvpn_best"), "stand-in")
            atomic_write_json(run.path("cvpn_history"), {})
    with run.stage("sample") as rec:
        if not rec.done:
            save_outliers(run.path("outlier_embeddings"),
                          {"outliers": outliers, "log_density": torch.zeros(outliers.shape[:2], dtype=torch.float64),
                           "method": "ncis"}, {"class_names": list(class_names), "seed": 0})
    return run.path("outlier_embeddings")


def build_smoke_run(out: Path, overrides=()) -> Path:
    """Run stages 1-4 of the smoke preset into ``out`` (about half a minute on one thread)."""
    from ncis_core.config import load_config
    from ncis_core.runs import RunDir
    from ncis_core.stages import embed, generate, sample, train_cvpn

    cfg = load_config("smoke", list(overrides), out=str(out))
    run = RunDir.create(cfg)
    for stage in (embed, train_cvpn, sample, generate):
        stage.run(cfg, run, progress=False)
    return Path(out)


def copy_run(source: Path, target: Path) -> Path:
    """A copy of the run folder ``source`` at ``target``, for a test that adds to it (artefact hashes
    are of contents, not paths, so the copy is as current as the original)."""
    import shutil

    shutil.copytree(source, target)
    return Path(target)
