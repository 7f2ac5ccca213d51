"""What a sampler reads: :class:`SampleInputs`, built once per run by :func:`sample_inputs`.

The training rows are the stage-2 holdout split's training part (the rows the cVPN was fitted on),
for every method alike, so the methods of one comparison sample from the same data. The cVPN and the
class tokens' rows are loaded only when a method asks for them (``inputs.cvpn()``,
``inputs.class_token_rows()``): a ``linear`` run never reads a checkpoint, and only
``knn_boundary`` loads the generator's text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ExperimentConfig, SampleConfig

__all__ = ["SampleInputs", "sample_inputs"]


@dataclass
class SampleInputs:
    """The data a sampler works on.

    Attributes:
        embeddings: ``N × D`` float32 training rows (on ``device``).
        labels: ``N`` class indices.
        num_classes: C.
        class_names: the C class names.
        seed: the run's seed (every method derives its random streams from it).
        tail: the tail sampler's settings (``cfg.sample``: rounds, draws, keep, reg_weight).
        device: where to compute.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: list[str]
    seed: int
    tail: SampleConfig
    device: torch.device
    _load_cvpn: Callable[[], tuple] | None = field(default=None, repr=False)
    _load_token_rows: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def cvpn(self) -> tuple:
        """``(model, meta, input_mean)`` of the run's best cVPN (stage 2), loaded once."""
        if "cvpn" not in self._cache:
            if self._load_cvpn is None:
                raise ValueError("this sampler needs the trained cVPN, and none was given")
            self._cache["cvpn"] = self._load_cvpn()
        return self._cache["cvpn"]

    def class_token_rows(self) -> torch.Tensor:
        """``C × D`` float32: the class tokens' rows of the generator's embedding table (the rows
        stage 1's inversions start from), loaded once."""
        if "rows" not in self._cache:
            if self._load_token_rows is None:
                raise ValueError("this sampler needs the class tokens' rows, and no pipeline was given")
            rows = self._load_token_rows().to(self.device, torch.float32)
            if rows.shape[0] != self.num_classes:
                raise ValueError(f"the generator has class tokens for {rows.shape[0]} classes but the "
                                 f"embeddings have {self.num_classes}")
            self._cache["rows"] = rows
        return self._cache["rows"]


def sample_inputs(cfg: ExperimentConfig, run_dir, device: torch.device | str | None = None) -> SampleInputs:
    """The inputs of every sampler for the run folder ``run_dir`` under ``cfg``.

    Raises:
        MissingArtefactError / StaleArtefactError: no (current) embeddings; the cVPN likewise, when
            a sampler asks for it.
        ValueError: unusable embeddings, or a checkpoint that does not fit them.
    """
    from ..device import resolve_device
    from ..embeddings_io import load_embeddings
    from ..stages.train_cvpn import holdout_split, load_cvpn, validate_embeddings

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
        # the class tokens' rows of the pipeline stage 4 renders with, for the embeddings' own class
        # names, read in float32 whatever generate.precision rounds them to later (the table's own
        # values: SD 1.4's weights are float32, and the original injects its rows in float32)
        from .. import diffusion

        pipe, tokens = diffusion.pipeline_with_class_tokens(cfg, list(data["class_names"]), device,
                                                            dtype=torch.float32)
        return diffusion.class_token_rows(pipe, tokens)

    return SampleInputs(x[train_index].to(device, torch.float32), labels[train_index].to(device), num_classes,
                        list(data["class_names"]), cfg.run.seed, cfg.sample, device, cvpn, token_rows)
