"""Stage 0: what data does this preset see? Counts per split, role and class (``data/summary.json``)."""

from __future__ import annotations

import logging

import numpy as np

from ..config import ExperimentConfig
from ..data import build_splits
from ..data.base import Split
from ..runs import STAGES, RunDir, atomic_write_json

__all__ = ["summarize", "run"]

log = logging.getLogger(__name__)


def summarize(splits: list[Split]) -> list[dict]:
    """Per split: :meth:`Split.describe` plus ``per_class`` (class name → count)."""
    rows = []
    for split in splits:
        row = split.describe()
        labels = np.asarray(split.dataset.labels)
        row["per_class"] = {name: int((labels == i).sum()) for i, name in enumerate(split.classes)}
        rows.append(row)
    return rows


# Stage 0 reads the datasets (config ``data``) and writes the counts.
STAGE = STAGES["data"]


def run(cfg: ExperimentConfig, run_dir: RunDir) -> tuple[list[Split], list[dict]]:
    """Build the preset's splits and record their summary in the run folder; ``(splits, summary)``."""
    splits = build_splits(cfg.data)
    summary = summarize(splits)
    with run_dir.stage("data") as rec:
        if not rec.done:
            atomic_write_json(run_dir.path("data_summary"), summary)
            rec.info["splits"] = {row["name"]: row["count"] for row in summary}
    for row in summary:
        log.info("%-14s %-8s %6d images, %d classes, %s", row["name"], row["role"], row["count"],
                 len(row["classes"]), "×".join(map(str, row["image_shape"])))
    return splits, summary
