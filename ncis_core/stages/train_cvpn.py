"""Stage 2: train the cVPN on the stage-1 embeddings (METHOD.md §2) ↔ ``02_train_cvpn.ipynb``.
Per mini-batch two steps of one Adam optimizer (:func:`train_step`: the invariance loss, then the
reconstruction through the updated inverse), the learning rate decaying linearly per mini-batch
(:func:`lr_factor`); after each epoch the invariant MSE on a subset of training points picks the
best model (``cvpn/best.safetensors``, ``cvpn/history.json``). ``cvpn/last.*`` (a training state)
lets an interrupted run continue with the very same result.

Example (not run by the doctests: it needs a run folder with stage 1's embeddings; the ``smoke``
preset's synthetic stand-in embeddings, D = 32, give these numbers):
    >>> run_dir = RunDir.open("outputs/smoke")     # doctest: +SKIP
    >>> result = run(run_dir.cfg, run_dir)         # doctest: +SKIP
    >>> result.k, result.history["best_epoch"]     # doctest: +SKIP
    (30, 2)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoints import (delete_training_state, load_cvpn, load_training_state, save_cvpn,
                           save_training_state)
from ..config import CVPNConfig, ExperimentConfig
from ..device import resolve_device, seed_everything
from ..embeddings_io import (holdout_split, load_embeddings, save_embeddings, synthetic_embeddings,
                             validate_embeddings)
from ..models.cvpn import CVPN, count_invariants
from ..progress import bar_options
from ..runs import STAGES, MissingArtefactError, RunDir, atomic_write_json

__all__ = [
    "CVPNResult",
    "lr_factor",
    "selection_indices",
    "train_step",
    "selection_score",
    "fit",
    "ensure_smoke_embeddings",
    "load_result",
    "run",
]

log = logging.getLogger(__name__)

# Seconds per epoch, beside history.json rather than in it: history.json is an artefact the manifest
# hashes, and two identical runs must write it byte for byte (timings never repeat).
TIMES = "times.json"
SMOKE_DIM = 32  # width of the synthetic smoke embeddings (stand-in for stage 1)


@dataclass
class CVPNResult:
    """What :func:`run` returns (and :func:`load_result` rebuilds from the run folder).

    Attributes:
        model: the best cVPN (eval mode, on the stage's device).
        meta: the checkpoint's metadata (``k``, ``epoch``, ``selection_mse``, …).
        mean: the input mean subtracted before ``f`` (zeros unless ``cvpn.center``).
        history: the content of ``cvpn/history.json``.
        data: the embeddings file as read by :func:`~ncis_core.embeddings_io.load_embeddings`.
        train_index: rows of ``data`` used for training; ``holdout_index``: rows held out.
    """

    model: CVPN
    meta: dict
    mean: torch.Tensor
    history: dict
    data: dict
    train_index: torch.Tensor
    holdout_index: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.meta["k"])


def lr_factor(step: int, total: int, final: float = 0.1) -> float:
    """``max((1 − final)·(1 − step/(T−1)) + final, final)``: linear from 1 to ``final`` over T steps."""
    return max((1 - final) * (1 - step / max(total - 1, 1)) + final, final)


def selection_indices(n: int, points: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Every ``N // points``-th row, at most ``points`` rows (all rows when ``N ≤ points``).

    With ``labels`` (``cvpn.selection_subset=class_balanced``) the stride runs over the rows grouped
    by class (a stable sort, so each class keeps its order), as over the original's class-grouped
    embeddings: every class gets its share of the subset.

    Example:
        >>> selection_indices(6, 3, torch.tensor([0, 1, 0, 1, 0, 1])).tolist()
        [0, 4, 3]
    """
    stride = max(n // max(points, 1), 1)
    picks = torch.arange(0, n, stride)[:points]
    if labels is None:
        return picks
    return torch.argsort(labels.cpu(), stable=True)[picks]


# ----------------------------------------------------------------------------- one step
def train_step(model: CVPN, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor,
               k: int, autocast_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """The two optimizer steps of one mini-batch ``(x, c)``; returns ``(L_inv, L_rec)`` as floats.

    1. ``z = f(x; c)``, ``L_inv = mean(z[:, -k:]²)``, step;
    2. ``z' = stopgrad(z)`` with its last ``k`` entries set to 0, ``x̂ = f⁻¹(z'; c)`` with the
       parameters after step 1, ``L_rec = mean((x̂ − x)²)``, step.
    """
    device_type = x.device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        z = model(x, labels)
        inv = z[:, -k:].float().pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    inv.backward()
    optimizer.step()
    z_target = z.detach().clone()
    z_target[:, -k:] = 0
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        x_hat = model.inverse(z_target, labels)
        rec = (x_hat.float() - x.float()).pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    rec.backward()
    optimizer.step()
    return float(inv.detach()), float(rec.detach())


@torch.no_grad()
def selection_score(model: CVPN, x: torch.Tensor, labels: torch.Tensor, k: int,
                    batch_size: int = 4096, reduce: str = "sum") -> float:
    """The invariant MSE of model selection (one set of orthogonal matrices for all batches).

    ``reduce="sum"``: ``Σ_k f(x; c)[:, -k:]²`` averaged over the points — the original's number
    (ignite's ``MeanSquaredError`` on the k invariants), ≈ 0.0195 at paper scale; ``"mean"``: the
    element mean, k× smaller. Either picks the same best epoch.
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"cvpn.selection_reduce={reduce!r} is not one of sum, mean")
    total, count = 0.0, 0
    for start in range(0, len(x), batch_size):
        z = model(x[start:start + batch_size], labels[start:start + batch_size])
        total += float(z[:, -k:].double().pow(2).sum())
        count += z[:, -k:].numel() if reduce == "mean" else len(z)
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the loop
def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling generator of one epoch, derived from (seed, epoch) so a resumed run matches."""
    state = np.random.SeedSequence([seed, 2, epoch]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def fit(x: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: CVPNConfig, *, seed: int = 0,
        device: torch.device | str = "cpu", out_dir: str | os.PathLike | None = None,
        resume: bool = True, k: int | None = None, on_epoch_end=None, progress: bool = True
        ) -> tuple[CVPN, dict]:
    """Train a cVPN on ``(x, labels)`` (already validated, uncentred) following ``cfg``.

    Args:
        x: ``N × D`` embeddings (training rows only).
        labels: ``N`` class indices.
        num_classes: ``C``.
        cfg: the stage-2 config.
        seed: seeds the initialisation and each epoch's shuffling.
        device: where to train.
        out_dir: folder for ``best.safetensors``, ``history.json`` and ``last.*`` (the training
            state); None keeps everything in memory.
        resume: continue from ``out_dir/last.*`` when present.
        k: number of invariants; None computes it with :func:`count_invariants`.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's files are written
            (tests use it to interrupt a run).
        progress: show tqdm bars (they also obey ``TQDM_DISABLE=1``).

    Returns:
        ``(best model, history)``; the history dict is what ``history.json`` holds.
    """
    device = torch.device(device)
    out_dir = Path(out_dir) if out_dir is not None else None
    x = x.to(torch.float32)
    mean = x.mean(0) if cfg.center else torch.zeros(x.shape[1])
    k = count_invariants(x, labels, cfg.variance_pct, num_classes) if k is None else k
    seed_everything(seed)
    model = CVPN(x.shape[1], num_classes, cfg.num_layers, cfg.hidden, packed=cfg.packed_orthogonal,
                 expm=cfg.expm).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    autocast = torch.bfloat16 if (cfg.mixed_precision and device.type == "cuda") else None
    xs, ys = (x - mean).to(device), labels.to(device)
    n = len(xs)
    batches = math.ceil(n / cfg.batch_size)
    total_steps = batches * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.final_lr_factor))  # per mini-batch
    select = selection_indices(n, cfg.selection_points,
                               labels if cfg.selection_subset == "class_balanced" else None).to(device)
    history = {"k": k, "dim": x.shape[1], "num_classes": num_classes, "epochs": cfg.epochs,
               "batches_per_epoch": batches, "total_steps": total_steps, "center": cfg.center,
               "parameters": sum(p.numel() for p in model.parameters()),
               "selection_subset": cfg.selection_subset, "selection_reduce": cfg.selection_reduce,
               "best_epoch": None, "best_selection_mse": None, "per_epoch": []}
    best_state = None
    start_epoch = 0
    times: list[float] = []  # seconds per epoch: kept out of history.json (see TIMES)
    objects = {"model": model, "optimizer": optimizer, "schedule": schedule}

    def same_architecture(state: dict) -> None:
        if state["architecture"] != model.architecture():
            raise ValueError(f"{out_dir / 'last.json'} holds a different architecture "
                             f"({state['architecture']}); delete it and last.safetensors to start afresh")

    state = load_training_state(out_dir, "last", objects, same_architecture) \
        if out_dir is not None and resume else None
    if state is not None:
        start_epoch, history = state["epoch"], state["history"]
        log.info("resuming cVPN training from %s after epoch %d", out_dir / "last.json", start_epoch)
        if (out_dir / TIMES).exists():
            times = json.loads((out_dir / TIMES).read_text())["seconds_per_epoch"][:start_epoch]
    if start_epoch and out_dir is not None and (out_dir / "best.safetensors").exists():
        best_state = load_cvpn(out_dir / "best.safetensors")[0].state_dict()
    param_count = history["parameters"]
    log.info("cVPN: D=%d, C=%d, k=%d, %d parameters, %d epochs × %d batches on %s",
             x.shape[1], num_classes, k, param_count, cfg.epochs, batches, device)
    epochs_bar = tqdm(range(start_epoch, cfg.epochs), desc="cVPN epochs", initial=start_epoch,
                      total=cfg.epochs, **bar_options(progress))
    for epoch in epochs_bar:
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=_epoch_generator(seed, epoch)).to(device)
        sums = np.zeros(2)
        bar = tqdm(range(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   **bar_options(progress))
        for b in bar:
            lr = optimizer.param_groups[0]["lr"]
            index = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            losses = train_step(model, optimizer, xs[index], ys[index], k, autocast)
            schedule.step()
            sums += losses
            bar.set_postfix(inv=f"{losses[0]:.4g}", rec=f"{losses[1]:.3g}", refresh=False)
        bar.close()
        model.eval()
        score = selection_score(model, xs[select], ys[select], k, reduce=cfg.selection_reduce)
        is_best = history["best_selection_mse"] is None or score < history["best_selection_mse"]
        record = {"epoch": epoch + 1, "inv_loss": sums[0] / batches, "rec_loss": sums[1] / batches,
                  "lr": lr, "k": k, "selection_mse": score, "best": is_best}
        history["per_epoch"].append(record)
        times.append(round(time.perf_counter() - started, 3))
        if is_best:
            history["best_epoch"], history["best_selection_mse"] = epoch + 1, score
            best_state = {kk: v.detach().clone() for kk, v in model.state_dict().items()}
        epochs_bar.set_postfix(inv=f"{record['inv_loss']:.4g}", sel=f"{score:.4g}", refresh=False)
        log.info("epoch %d: L_inv %.5g, L_rec %.3g, selection MSE %.5g%s", epoch + 1, record["inv_loss"],
                 record["rec_loss"], score, " (best)" if is_best else "")
        if out_dir is not None:
            if is_best:
                save_cvpn(out_dir / "best.safetensors", model,
                          {"k": k, "epoch": epoch + 1, "selection_mse": score, "center": cfg.center},
                          mean)
            atomic_write_json(out_dir / "history.json", history)
            atomic_write_json(out_dir / TIMES, {"seconds_per_epoch": times})
            save_training_state(out_dir, "last", objects, {"epoch": epoch + 1, "history": history,
                                                           "architecture": model.architecture()})
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
    epochs_bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if out_dir is not None and not (out_dir / "best.safetensors").exists():
        # zero epochs: the initial model is the best there is
        save_cvpn(out_dir / "best.safetensors", model, {"k": k, "epoch": 0, "selection_mse": None,
                                                        "center": cfg.center}, mean)
        atomic_write_json(out_dir / "history.json", history)
    return model, history


# ----------------------------------------------------------------------------- the stage
def ensure_smoke_embeddings(cfg: ExperimentConfig, run_dir: RunDir) -> str | None:
    """On the ``smoke`` preset only, stand in for stage 1 when its embeddings are missing.

    Writes synthetic low-rank embeddings (:func:`~ncis_core.embeddings_io.synthetic_embeddings`,
    ``D = 32``, the ID classes and per-class count of ``data/summary.json`` when stage 0 ran) through a
    recorded ``embed`` stage and returns a message saying so (again on later calls while the
    synthetic file is in place). Returns None when real embeddings are there. On every other preset
    a missing file raises the run folder's MissingArtefactError ("run stage 1 (embed) first").
    """
    try:
        path = run_dir.require("embeddings")
        if load_embeddings(path)["metadata"].get("source") == "synthetic":
            message = ("SMOKE PRESET: embeddings.safetensors holds SYNTHETIC stand-in embeddings "
                       "(stage 1 did not run). Numbers from this run say nothing about NCIS.")
            log.warning(message)
            return message
        return None
    except MissingArtefactError:
        if cfg.run.preset != "smoke":
            raise
    names, per_class = [f"class_{i}" for i in range(6)], cfg.data.max_per_class or 8
    summary_path = run_dir.path("data_summary")
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        train = next((row for row in summary if row.get("role") == "id-train"), None)
        if train and train.get("classes"):
            names = list(train["classes"])
            per_class = max(2, min(train["per_class"].values()) if train.get("per_class") else per_class)
    message = (f"SMOKE PRESET: stage 1 (embed) has not produced embeddings.safetensors, so SYNTHETIC "
               f"embeddings ({len(names)} classes × {per_class}, D={SMOKE_DIM}, low-rank class "
               f"manifolds) were written in its place. Numbers from this run say nothing about NCIS.")
    with run_dir.stage("embed") as rec:
        if not rec.done:
            data = synthetic_embeddings(len(names), per_class, SMOKE_DIM, seed=cfg.run.seed, rank=3,
                                        class_names=names)
            save_embeddings(run_dir.path("embeddings"), **data, extra={"source": "synthetic"})
            rec.info.update(synthetic=True, dim=SMOKE_DIM, count=len(data["labels"]))
    log.warning(message)
    return message


def load_result(cfg: ExperimentConfig, run_dir: RunDir, device: torch.device | str | None = None
                ) -> CVPNResult:
    """Rebuild :class:`CVPNResult` from the run folder's stage-2 artefacts."""
    device = resolve_device(cfg.run.device) if device is None else device
    data = load_embeddings(run_dir.require("embeddings"))
    model, meta, mean = load_cvpn(run_dir.require("cvpn_best"), device, cfg.cvpn.expm)
    history = json.loads(run_dir.require("cvpn_history").read_text())
    train_index, holdout_index = holdout_split(data["labels"], cfg.cvpn.holdout_fraction, cfg.run.seed)
    return CVPNResult(model, meta, mean, history, data, train_index, holdout_index)


# Stage 2 reads the embeddings and writes the best cVPN and its history.
STAGE = STAGES["cvpn"]


def run(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True, on_epoch_end=None) -> CVPNResult:
    """Stage 2: read ``embeddings.safetensors``, train, write ``cvpn/best.safetensors`` and
    ``cvpn/history.json``; skipped when complete and current, resumed when interrupted.

    Raises:
        MissingArtefactError: no embeddings (run stage 1 first).
        ValueError: unusable embeddings (see :func:`validate_embeddings`); nothing is written.
    """
    data = load_embeddings(run_dir.require("embeddings"))
    x, labels, num_classes = data["embeddings"], data["labels"], data["num_classes"]
    validate_embeddings(x, labels, num_classes)
    train_index, holdout_index = holdout_split(labels, cfg.cvpn.holdout_fraction, cfg.run.seed)
    validate_embeddings(x[train_index], labels[train_index], num_classes)
    device = resolve_device(cfg.run.device)
    with run_dir.stage("cvpn") as rec:
        if not rec.done:
            out_dir = run_dir.path("cvpn_dir")
            out_dir.mkdir(parents=True, exist_ok=True)
            if not rec.resumable:
                delete_training_state(out_dir, "last")
                for name in ("best.safetensors", "history.json", TIMES):
                    (out_dir / name).unlink(missing_ok=True)
            _, history = fit(x[train_index], labels[train_index], num_classes, cfg.cvpn,
                             seed=cfg.run.seed, device=device, out_dir=out_dir, resume=rec.resumable,
                             on_epoch_end=on_epoch_end, progress=progress)
            delete_training_state(out_dir, "last")
            rec.info.update(k=history["k"], best_epoch=history["best_epoch"],
                            best_selection_mse=history["best_selection_mse"],
                            parameters=history["parameters"], train_rows=len(train_index),
                            holdout_rows=len(holdout_index))
    return load_result(cfg, run_dir, device)
