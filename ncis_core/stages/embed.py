"""Stage 1: per-image textual inversion of the class token (METHOD.md §1) ↔ ``01_embed.ipynb``.

For every ID training image of class ``c``: start from the class token's row ``e_c`` (see
:func:`ncis_core.diffusion.class_tokens`), encode the image to the VAE posterior **mode** ×
``scaling_factor``, and take ``embed.steps`` Adam steps (lr ``embed.lr``, default betas) on
``embed.noise_batch`` noised copies of the latent, timesteps drawn uniformly from
``{first, first + stride, …} < T`` with fresh noise each step, loss ``mean ‖ε_θ(z_t, t, ctx) − ε‖²``
with the context of ``"An image of a {class}"`` carrying the image's row. No guidance. The result
is the optimised row: one ``D``-vector per image.

**Batched**: ``embed.images_per_step`` images share one UNet call per step, each with its own row
and its own Adam state. The rows form one ``B × D`` parameter and the loss is the *sum* of the
images' own mean losses, so image ``i``'s gradient is exactly its own loss's gradient; Adam is
element-wise, so one Adam over the ``B × D`` block is ``B`` independent Adams. Each image draws its
timesteps and noise from its own generator (seeded by ``run.seed`` and the image id), so the result
does not depend on which images share a batch, on sharding, or on resuming (up to the float
rounding of batched kernels: ≤ 1e-4, checked by the tests and the benchmark). Only the rows get
gradients: the UNet, VAE and text encoder are frozen (no weight gradients).

**Precision**: the pipeline is loaded in ``embed.precision`` (``fp32``, the original; ``bf16``;
``fp16``), not in ``diffusion.dtype`` (stage 4's; its ``auto`` is fp16 on CUDA). The rows, their
Adam state and the loss are float32 in every case; only the frozen UNet, text encoder and VAE run in
the lower precision. The gradient reaching the UNet output is ~2/M per element for a mean over
M = ``noise_batch`` × C × h × w elements (~1e-6 at SD-1.4 shapes): below fp16's normal range, and
partly below its smallest subnormal. So ``fp16`` scales the loss dynamically (see :func:`invert`):
start at ``embed.loss_scale``, halve it and redo the step (same noise) when the rows' gradient is
not finite, double it after ``embed.loss_scale_window`` clean steps. bf16 has fp32's exponent range
and needs no scale. The images of a batch share the scale, so in fp16 which images share a batch can
change the rounding (the batch cut is fixed by ``shard_size`` and ``images_per_step``, so sharding
and resuming still give the same result).

**Resumable, sharded**: images are cut into shards of ``embed.shard_size`` (the same cut for any
number of processes); each finished shard is written to ``embeddings.parts/`` and skipped on a
rerun. Under ``accelerate launch`` the shards are split between processes; the main process merges
them into ``embeddings.safetensors`` (``N × D`` float32, labels, image ids; via
:mod:`ncis_core.embeddings_io`), the same file a single process writes.

Command line (also under ``accelerate launch``)::

    python -m ncis_core.stages.embed --preset demo --out outputs/demo
    accelerate launch --multi_gpu --num_processes 2 -m ncis_core.stages.embed --preset P --out DIR
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
from ..runs import RunDir, Stage, atomic_path, register_stage

__all__ = [
    "timestep_grid",
    "image_generator",
    "to_model_range",
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

# Below this, an fp16 loss scale cannot be what makes the gradient non-finite (starting from
# 65536 it takes 40 halvings to get here): the step raises instead of being redone forever.
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


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """``N × H × W × 3`` uint8 → ``N × 3 × H × W`` float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x.div(127.5).sub(1.0)


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
    """Textual inversion of a batch of images, each with its own row (METHOD.md §1).

    The rows, their Adam state and the loss are float32; the UNet and text encoder run in the
    pipeline's dtype (:func:`pipeline_dtype` of ``embed.precision`` when it comes from
    :func:`prepare`). When that is float16 the loss is multiplied by a dynamic loss scale before the
    backward pass and the rows' gradient divided by it after: a step whose gradient is not finite
    is redone with the same timesteps and noise at half the scale (so the result is as
    deterministic and resumable as in fp32), and the scale doubles after
    ``cfg.loss_scale_window`` clean steps.

    Args:
        pipe: the pipeline (UNet, text encoder, scheduler's ``alphas_cumprod``); frozen.
        latents: ``B × C × h × w`` scaled posterior modes.
        prompt_ids: ``B × L`` token ids of the images' prompts.
        token_ids: ``B`` class-token ids (the position that carries each image's row).
        init_rows: ``B × D`` starting rows.
        cfg: steps, lr, noise batch, timestep grid, micro batch; for an fp16 pipeline the loss
            scale's start and doubling window.
        generators: ``B`` per-image generators (:func:`image_generator`).
        stats: if given, filled with ``loss_scale`` (the final scale; 1.0 unless fp16) and
            ``redone_steps`` (fp16 steps redone after an overflow).

    Returns:
        ``B × D`` float32 optimised rows (CPU).

    Raises:
        FloatingPointError: fp16 only: a non-finite loss (the forward pass overflowed, which no
            loss scale can fix: use ``embed.precision`` bf16 or fp32), or a gradient still not
            finite at a negligible scale.
    """
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    # Loss scaling where the gradient would otherwise underflow: the fp16 UNet. Its state (scale,
    # clean-step count) lives for this call, i.e. one batch of images_per_step images, and starts
    # afresh at cfg.loss_scale for the next. That is fine: a scale carried across batches would
    # make a batch's result depend on the batches before it (another process's shards, or the
    # ones skipped on a resume), and with the paper's 3 steps per image the doubling window is
    # never reached inside a batch anyway, so only the halving on an overflow matters.
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
        # Drawn once per step, before any retry: a redone fp16 step sees the same timesteps and
        # noise, and the per-image generators advance exactly as in fp32.
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
                # Sum over images of each image's own mean loss: image i's row gets exactly the
                # gradient it would get alone (a batch mean would scale it by 1/B).
                loss = (pred - noise).pow(2).reshape(hi - lo, -1).mean(1).sum()
                if scaled:
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"stage 1, step {step}: the fp16 forward pass gave a non-finite loss; no "
                            f"loss scale helps with that: use embed.precision=bf16 or fp32")
                    # The float32 loss is scaled, so its gradient reaches the fp16 cast at the UNet
                    # output (pred's .float()) already scaled into fp16's normal range.
                    loss = loss * scale
                loss.backward()
            if not scaled:
                break
            grad = rows.grad
            if bool(torch.isfinite(grad).all()):
                grad.div_(scale)  # Adam sees the true gradient (exact for a power-of-two scale)
                break
            # Overflow somewhere in the fp16 backward pass: halve the scale and redo this step
            # rather than skip it (as torch's GradScaler does): a skipped step would leave the rows
            # one Adam step short and make the result depend on where the overflows fell.
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
    """The pipeline in ``embed.precision``'s dtype (:func:`pipeline_dtype`, whatever
    ``diffusion.dtype`` says), the class tokens and the ID training split with stage 1's transform
    (Resize + CenterCrop to ``embed.resolution``).

    Returns:
        ``(pipe, tokens, split, dataset)``.
    """
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
    """The classes' starting rows (``C × D`` float32) and their :class:`~ncis_core.diffusion.ClassTokens`
    (for the notebook's distance-from-class-token plot): read from stage 1's own pipeline
    (:func:`prepare`, in ``embed.precision``), so they are the rows its inversions start from."""
    pipe, tokens, _, _ = prepare(cfg, device)
    return diffusion.class_token_rows(pipe, tokens), tokens


# Stage 1 reads the ID training images and the generator; it writes one embedding per image.
STAGE = register_stage(Stage(1, "embed", ("data", "diffusion", "embed"), (), ("embeddings",)))


def run(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True,
        on_shard_end: Callable[[int], None] | None = None) -> dict:
    """Stage 1: write ``embeddings.safetensors``; skipped when complete and current, resumed shard
    by shard when interrupted, sharded across processes under ``accelerate launch``.

    Args:
        cfg: the experiment config (``data``, ``diffusion``, ``embed``, ``run.seed``/``device``).
        run_dir: the run folder.
        progress: progress bars.
        on_shard_end: called with the shard number after each shard is written (tests use it to
            kill a run part-way).

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
