"""Stage 1: per-image textual inversion of the class token (METHOD.md §1) ↔ ``01_embed.ipynb``.

One optimised row of the text encoder's token table per ID training image, ``embed.images_per_step``
images per UNet call, each with its own generator and Adam state; resumable shard by shard and
sharded under ``accelerate launch``. Writes ``embeddings.safetensors``.

    python -m ncis_core.stages.embed --preset demo --out outputs/demo
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..progress import bar_options
from .. import diffusion
from ..device import broadcast, process_state
from ..config import EmbedConfig, ExperimentConfig
from ..embeddings_io import load_embeddings, save_embeddings
from ..data import first_per_class
from ..data.transforms import to_model_range
from ..runs import STAGES, RunDir, atomic_path

__all__ = [
    "timestep_grid",
    "image_generator",
    "encode_latents",
    "draw_noise",
    "PRECISIONS",
    "pipeline_dtype",
    "invert",
    "prepare",
    "embed_indices",
    "shards_dir",
    "class_token_rows",
    "run",
    "main",
]

log = logging.getLogger(__name__)

#: ``embed.precision`` → the dtype stage 1 loads its pipeline in.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# below this an fp16 loss scale cannot be the cause of a non-finite gradient: raise, not redo
_MIN_LOSS_SCALE = 2.0 ** -24


def timestep_grid(cfg: EmbedConfig, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The timesteps a noised copy may get: ``{first, first + stride, …} < T`` (1, 21, …, 981)."""
    grid = torch.arange(cfg.timestep_first, num_train_timesteps, cfg.timestep_stride)
    if len(grid) == 0:
        raise ValueError(f"embed.timestep_first={cfg.timestep_first} leaves no timestep below "
                         f"T={num_train_timesteps}")
    return grid


def image_generator(seed: int, image_id: int) -> torch.Generator:
    """The CPU generator of one image's timesteps and noise (independent of batching/sharding)."""
    state = np.random.SeedSequence([seed, 1, int(image_id)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """VAE posterior **mode** × the VAE's ``scaling_factor`` (float32, on the pipeline's device)."""
    vae = pipe.vae
    x = images.to(vae.device, vae.dtype)
    return vae.encode(x).latent_dist.mode().float() * vae.config.scaling_factor


def draw_noise(generators: Sequence[torch.Generator], grid: torch.Tensor, copies: int,
               latent_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, ``copies`` timesteps from ``grid`` and ``copies`` noise tensors, from its own
    generator (timesteps first, then noise): ``(B × copies, B × copies × C × h × w)`` on the CPU."""
    t = torch.stack([grid[torch.randint(len(grid), (copies,), generator=g)] for g in generators])
    eps = torch.stack([torch.randn((copies, *latent_shape), generator=g) for g in generators])
    return t, eps


def pipeline_dtype(cfg: EmbedConfig) -> torch.dtype:
    """The dtype of stage 1's pipeline: ``embed.precision`` (``diffusion.dtype`` is stage 4's)."""
    try:
        return PRECISIONS[cfg.precision]
    except KeyError:
        raise ValueError(f"unknown embed.precision {cfg.precision!r}; use {', '.join(PRECISIONS)}") from None


def invert(pipe, latents: torch.Tensor, prompt_ids: torch.Tensor, token_ids: Sequence[int],
           init_rows: torch.Tensor, cfg: EmbedConfig, generators: Sequence[torch.Generator],
           stats: dict | None = None) -> torch.Tensor:
    """Textual inversion of a batch of images, each with its own float32 row (METHOD.md §1).

    An fp16 pipeline scales the loss dynamically; a step that overflows is redone at half the scale.

    Args:
        latents: ``B × C × h × w`` scaled posterior modes.
        prompt_ids: ``B × L`` token ids of the images' prompts.
        token_ids: ``B`` class-token ids (the position that carries each image's row).
        init_rows: ``B × D`` starting rows.
        generators: ``B`` per-image generators (:func:`image_generator`).
        stats: if given, filled with ``loss_scale`` and ``redone_steps``.

    Returns:
        ``B × D`` float32 optimised rows (CPU).

    Raises:
        FloatingPointError: fp16 only: a non-finite loss, or a gradient not finite at any scale.
    """
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    # the loss scale lives for this batch only, so a batch's result does not depend on earlier ones
    scaled = dtype == torch.float16
    scale = float(cfg.loss_scale) if scaled else 1.0
    if scaled and not (math.isfinite(scale) and scale > 0 and cfg.loss_scale_window >= 1):
        raise ValueError(f"embed.loss_scale must be a positive finite number and "
                         f"embed.loss_scale_window ≥ 1, got {cfg.loss_scale} and {cfg.loss_scale_window}")
    clean_steps = redone = 0
    alphas = pipe.scheduler.alphas_cumprod.to(torch.float32)
    grid = timestep_grid(cfg, len(alphas))
    b = len(latents)
    rows = init_rows.detach().to(device, torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([rows], lr=cfg.lr)
    chunk = cfg.micro_batch if cfg.micro_batch > 0 else b
    n = cfg.noise_batch
    z0 = latents.to(device, torch.float32)
    for step in range(cfg.steps):
        # drawn before any retry: a redone fp16 step sees the same timesteps and noise
        t, eps = draw_noise(generators, grid, n, latents.shape[1:])
        while True:
            opt.zero_grad(set_to_none=True)
            for lo in range(0, b, chunk):
                hi = min(lo + chunk, b)
                ctx = diffusion.encode_prompts(pipe, prompt_ids[lo:hi], token_ids[lo:hi], rows[lo:hi])
                ctx = ctx.repeat_interleave(n, dim=0)
                tt = t[lo:hi].reshape(-1)
                noise = eps[lo:hi].reshape(-1, *latents.shape[1:]).to(device)
                a = alphas[tt].to(device).view(-1, 1, 1, 1)
                zt = a.sqrt() * z0[lo:hi].repeat_interleave(n, dim=0) + (1 - a).sqrt() * noise
                pred = unet(zt.to(dtype), tt.to(device), encoder_hidden_states=ctx).sample.float()
                # a sum of per-image means: each row gets the gradient it would get alone
                loss = (pred - noise).pow(2).reshape(hi - lo, -1).mean(1).sum()
                if scaled:
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"stage 1, step {step}: the fp16 forward pass gave a non-finite loss; no "
                            f"loss scale helps with that: use embed.precision=bf16 or fp32")
                    # scaled before the fp16 cast's backward, into fp16's normal range
                    loss = loss * scale
                loss.backward()
            if not scaled:
                break
            grad = rows.grad
            if bool(torch.isfinite(grad).all()):
                grad.div_(scale)  # Adam sees the true gradient (exact for a power-of-two scale)
                break
            # fp16 overflow: halve and redo the step (GradScaler would skip it, losing a step)
            scale /= 2
            clean_steps = 0
            redone += 1
            log.debug("stage 1, step %d: fp16 gradient overflow; loss scale → %g, step redone", step, scale)
            if scale < _MIN_LOSS_SCALE:
                raise FloatingPointError(
                    f"stage 1, step {step}: the rows' gradient is not finite even at loss scale "
                    f"{scale * 2:g}: not an fp16 overflow; use embed.precision=bf16 or fp32")
        opt.step()
        if scaled:
            clean_steps += 1
            if clean_steps >= cfg.loss_scale_window:
                scale *= 2  # probe upwards again: the gradient may have shrunk since the last halving
                clean_steps = 0
    if stats is not None:
        stats.update(loss_scale=scale, redone_steps=redone)
    return rows.detach().cpu()


def prepare(cfg: ExperimentConfig, device: torch.device | str = "cpu", progress: bool = False):
    """``(pipe, tokens, split, dataset)``: the pipeline in ``embed.precision``, the class tokens and
    the ID training split with stage 1's transform (Resize + CenterCrop to ``embed.resolution``)."""
    from ..data import CenterCrop, Compose, Resize, get_split, with_transform

    split = get_split(cfg.data, "id-train")
    names = list(split.classes)
    if not names:
        raise ValueError("the ID training split has no class names")
    pipe, tokens = diffusion.pipeline_with_class_tokens(cfg, names, device, progress, pipeline_dtype(cfg.embed))
    res = cfg.embed.resolution
    dataset = with_transform(split.dataset, Compose([Resize(res), CenterCrop(res)]))
    return pipe, tokens, split, dataset


def _prompt_ids(pipe, tokens, template: str) -> torch.Tensor:
    """Token ids of each class's embedding prompt, checked to contain the class token."""
    if "{}" not in template:
        raise ValueError(f"embed.prompt {template!r} has no '{{}}' for the class name")
    ids = diffusion.tokenize(pipe.tokenizer, [template.format(w) for w in tokens.prompt_words])
    for c, t in enumerate(tokens.token_ids):
        if not bool((ids[c] == t).any()):
            raise ValueError(f"the embedding prompt of class {tokens.names[c]!r} does not contain its "
                             f"class token {tokens.tokens[c]!r} (truncated?)")
    return ids


def embed_indices(pipe, tokens, dataset, indices: Sequence[int], cfg: ExperimentConfig,
                  bar=None) -> torch.Tensor:
    """Rows for the images ``indices`` of ``dataset``, ``embed.images_per_step`` at a time."""
    ecfg = cfg.embed
    prompt_ids = _prompt_ids(pipe, tokens, ecfg.prompt)
    table = diffusion.embedding_table(pipe.text_encoder).weight
    out = []
    for lo in range(0, len(indices), ecfg.images_per_step):
        batch = [int(i) for i in indices[lo:lo + ecfg.images_per_step]]
        items = [dataset[i] for i in batch]
        labels = [label for _, label in items]
        latents = encode_latents(pipe, to_model_range(np.stack([im for im, _ in items])))
        token_ids = [tokens.token_ids[c] for c in labels]
        init = table[torch.as_tensor(token_ids, device=table.device)].detach().float()
        gens = [image_generator(cfg.run.seed, i) for i in batch]
        out.append(invert(pipe, latents, prompt_ids[labels], token_ids, init, ecfg, gens))
        if bar is not None:
            bar.update(len(batch))
    dim = table.shape[1]
    return torch.cat(out) if out else torch.empty(0, dim)


def shards_dir(run_dir: RunDir) -> Path:
    """Where finished shards wait for the merge: ``embeddings.parts/`` beside the final file."""
    return run_dir.path("embeddings").with_suffix(".parts")


def _shard_file(run_dir: RunDir, k: int) -> Path:
    return shards_dir(run_dir) / f"shard-{k:05d}.safetensors"


def _read_shard(path: Path, expected_ids: np.ndarray) -> dict | None:
    """A finished shard, or None when absent or not the expected images (then it is redone)."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            shard = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - an unreadable shard is simply recomputed
        return None
    if shard.get("image_ids") is None or not np.array_equal(shard["image_ids"].numpy(), expected_ids):
        return None
    return shard


def class_token_rows(cfg: ExperimentConfig, device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, object]:
    """The classes' starting rows (``C × D`` float32, from stage 1's own pipeline) and their tokens."""
    pipe, tokens, _, _ = prepare(cfg, device)
    return diffusion.class_token_rows(pipe, tokens), tokens


# Stage 1 reads the ID training images and the generator; it writes one embedding per image.
STAGE = STAGES["embed"]


def run(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True,
        on_shard_end: Callable[[int], None] | None = None) -> dict:
    """Stage 1: write ``embeddings.safetensors`` (skipped when current, resumed shard by shard).

    Args:
        on_shard_end: called with the shard number after each shard is written.

    Returns:
        The embeddings file as read by :func:`~ncis_core.embeddings_io.load_embeddings`.
    """
    state, device = process_state(cfg.run.device)
    main_process = state.is_main_process
    ecfg = cfg.embed
    if ecfg.images_per_step < 1 or ecfg.shard_size < 1 or ecfg.noise_batch < 1 or ecfg.steps < 0:
        raise ValueError("embed.images_per_step, embed.shard_size and embed.noise_batch must be ≥ 1 "
                         "and embed.steps ≥ 0")
    parts = shards_dir(run_dir)
    finished = False
    with contextlib.ExitStack() as stack:
        rec = stack.enter_context(run_dir.stage("embed")) if main_process else None
        done, resumable = broadcast(state, [rec.done, rec.resumable] if rec else [None, None])
        if not done:
            if main_process and not resumable and parts.exists():
                log.info("inputs changed since the partial run: discarding %s", parts)
                shutil.rmtree(parts)
            state.wait_for_everyone()
            pipe, tokens, split, dataset = prepare(cfg, device, progress=False)
            # the images to embed, as indices of the ID training split (all, or the first
            # embed.max_per_class of each class): image ids stay those of the split
            selected = first_per_class(split.dataset.labels, ecfg.max_per_class)
            if ecfg.max_images is not None:
                selected = selected[:ecfg.max_images]
            n = len(selected)
            if n == 0:
                raise ValueError("the ID training split is empty: nothing to embed")
            shards = list(range(math.ceil(n / ecfg.shard_size)))
            with state.split_between_processes(shards) as mine:
                mine = list(mine)
            started = time.time()
            todo = []
            for k in mine:
                ids = selected[k * ecfg.shard_size:(k + 1) * ecfg.shard_size]
                if _read_shard(_shard_file(run_dir, k), ids) is None:
                    todo.append((k, ids))
            if len(todo) < len(mine):
                log.info("resuming: %d of %d shards already done", len(mine) - len(todo), len(mine))
            total = sum(len(ids) for _, ids in todo)
            bar = tqdm(total=total, desc="stage 1: textual inversion", unit="img",
                       **bar_options(progress and main_process))
            for k, ids in todo:
                rows = embed_indices(pipe, tokens, dataset, ids, cfg, bar)
                labels = torch.as_tensor(np.asarray(split.dataset.labels)[ids], dtype=torch.int64)
                with atomic_path(_shard_file(run_dir, k)) as tmp:
                    save_file({"embeddings": rows.contiguous(), "labels": labels,
                               "image_ids": torch.as_tensor(ids, dtype=torch.int64)}, str(tmp))
                if on_shard_end is not None:
                    on_shard_end(k)
            bar.close()
            elapsed = time.time() - started
            state.wait_for_everyone()
            if main_process:
                merged = {key: [] for key in ("embeddings", "labels", "image_ids")}
                for k in shards:
                    ids = selected[k * ecfg.shard_size:(k + 1) * ecfg.shard_size]
                    shard = _read_shard(_shard_file(run_dir, k), ids)
                    if shard is None:
                        raise RuntimeError(f"shard {k} of stage 1 is missing after all processes finished")
                    for key in merged:
                        merged[key].append(shard[key])
                summary = tokens.summary()
                save_embeddings(
                    run_dir.path("embeddings"), torch.cat(merged["embeddings"]),
                    torch.cat(merged["labels"]), torch.cat(merged["image_ids"]), tokens.names,
                    extra={"source": "stage1", "pipeline": cfg.diffusion.pipeline,
                           "class_token": summary["strategy"], "tokens": json.dumps(summary["tokens"]),
                           "token_ids": json.dumps(summary["token_ids"]),
                           "multi_piece": json.dumps(summary["multi_piece"]), "prompt": ecfg.prompt,
                           "precision": ecfg.precision})
                rec.info.update(count=n, dim=diffusion.embedding_width(pipe), processes=state.num_processes,
                                class_token=summary["strategy"], multi_piece=summary["multi_piece"],
                                precision=ecfg.precision, seconds_main_process=round(elapsed, 2))
                log.info("stage 1: %d embeddings of width %d (%d processes)", n,
                         diffusion.embedding_width(pipe), state.num_processes)
        finished = True
    if finished and main_process and parts.exists():
        shutil.rmtree(parts)  # only after the manifest says complete: a kill before keeps the shards
    state.wait_for_everyone()
    return load_embeddings(run_dir.require("embeddings"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ncis_core.stages.embed --preset P --out DIR [--set k=v …]``."""
    from .command import stage_main

    return stage_main(argv, "embed", run)


if __name__ == "__main__":
    raise SystemExit(main())
