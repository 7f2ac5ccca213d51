"""The demo generator's training, on the ID training split only: :func:`train_vae` (then
:func:`measure_scaling_factor`), :func:`train_unet` (UNet + text encoder with empty prompts for
classifier-free guidance, EMA shipped) and :func:`train_generator`, which runs both, seeded and
resumable, and saves the pipeline with ``save_pretrained``.

Example (the ``smoke`` preset's training images; the training run is skipped):
    >>> from ncis_core.config import load_config
    >>> x, labels, classes = training_images(load_config("smoke"))
    >>> x.shape, float(x.min()) >= -1.0, float(x.max()) <= 1.0, np.bincount(labels).tolist()
    (torch.Size([48, 3, 32, 32]), True, True, [8, 8, 8, 8, 8, 8])
    >>> folder = train_generator(load_config("demo"), out="outputs/my-generator")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoints import load_training_state, save_training_state
from ..diffusion import build_pipeline, build_scheduler, build_tokenizer
from ..progress import bar_options
from ..runs import atomic_write_json
from .build import DEMO_WORDS, build_text_encoder, build_unet, build_vae, count_parameters

if TYPE_CHECKING:
    from ..config import ExperimentConfig, GeneratorConfig

__all__ = ["training_images", "train_vae", "measure_scaling_factor", "train_unet", "train_generator"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ data

def training_images(cfg: "ExperimentConfig") -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The ID training split as a float tensor ``N × 3 × H × W`` in [-1, 1], labels and class names."""
    from ..data import get_split

    # Only the ID split: building the OOD sets too (textures, faces …) would cost seconds for nothing.
    split = get_split(dataclasses.replace(cfg.data, ood_sets=[]), "id-train")
    ds = split.dataset
    images = np.stack([ds[i][0] for i in range(len(ds))])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, np.asarray(ds.labels), list(split.classes)



def _step_generator(seed: int, phase: int, step: int) -> torch.Generator:
    # One generator per (phase, step): a resumed run draws exactly the batches and noise of an
    # uninterrupted one without saving any RNG state.
    return torch.Generator().manual_seed((seed * 1_000_003 + phase * 7_919 + step) % 2**63)


def _batch(x: torch.Tensor, size: int, g: torch.Generator, hflip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, len(x), (size,), generator=g)
    xb = x[idx]
    if hflip:  # animals face either way; a mirrored silhouette is the same class
        flip = torch.rand(size, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    return xb, idx


def _lr_factor(step: int, total: int, warmup: int) -> float:
    # Linear warm-up, then cosine to 10 %: small models train fast early and settle late.
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ------------------------------------------------------------------------------------ checkpoints

def _resume(work: Path, name: str, objects: dict, config: dict) -> dict | None:
    """The phase's training state (:func:`~ncis_core.checkpoints.load_training_state`) loaded into
    ``objects``, or None; a checkpoint of another generator config is refused."""
    def same_config(state: dict) -> None:
        saved = state.get("config", {})
        if saved != config:
            changed = sorted(k for k in set(config) | set(saved) if config.get(k) != saved.get(k))
            raise ValueError(f"the checkpoint {work / name}.json was made with a different generator config "
                             f"({', '.join(changed)}); delete it and {name}.safetensors beside it to redo "
                             f"this phase, or pass --fresh to start over")

    state = load_training_state(work, name, objects, same_config)
    if state is not None:
        log.info("resuming %s from step %d (%s)", name, state["step"], work / f"{name}.json")
    return state


def _phase_config(gcfg: "GeneratorConfig", keys: Sequence[str], seed: int) -> dict:
    # What a checkpoint must agree with to be resumed (checkpoint_every may change freely).
    values = dataclasses.asdict(gcfg)
    return {"seed": seed, **{k: values[k] for k in keys}}


_VAE_KEYS = ("image_size", "vae_channels", "vae_layers_per_block", "latent_channels", "norm_groups",
             "vae_steps", "vae_batch_size", "vae_lr", "kl_weight", "hflip")
_UNET_KEYS = _VAE_KEYS + ("unet_channels", "unet_layers_per_block", "attention_head_dim", "text_width",
                          "text_layers", "text_heads", "unet_steps", "unet_batch_size", "unet_lr",
                          "text_lr", "ema_decay", "empty_prompt_prob", "prompts", "warmup_steps")


# -------------------------------------------------------------------------------------- training

def train_vae(vae, x: torch.Tensor, gcfg: "GeneratorConfig", work: Path, seed: int,
              progress: bool = True) -> list[float]:
    """Train ``vae`` on images ``x`` (``N × 3 × H × W`` in [-1, 1]) for ``gcfg.vae_steps`` steps.

    Loss: L1 reconstruction of a posterior sample + ``kl_weight`` · KL. Checkpoints every
    ``gcfg.checkpoint_every`` steps under ``work`` (``vae.safetensors`` + ``vae.json``) and resumes
    from them. Returns the loss history (one value per step, the resumed part included).
    """
    opt = torch.optim.AdamW(vae.parameters(), lr=gcfg.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: _lr_factor(step, gcfg.vae_steps, gcfg.warmup_steps))
    objects = {"vae": vae, "optimizer": opt, "schedule": schedule}
    config = _phase_config(gcfg, _VAE_KEYS, seed)
    meta = _resume(work, "vae", objects, config)
    start, history = (meta["step"], meta["history"]) if meta else (0, [])
    vae.train()
    bar = tqdm(range(start, gcfg.vae_steps), initial=start, total=gcfg.vae_steps, desc="VAE",
               **bar_options(progress))
    for step in bar:
        g = _step_generator(seed, 1, step)
        xb, _ = _batch(x, gcfg.vae_batch_size, g, gcfg.hflip)
        posterior = vae.encode(xb).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = posterior.kl().mean() / z[0].numel()  # per latent element, so the weight is size-free
        loss = F.l1_loss(rec, xb) + gcfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        history.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-20:]):.4f}")
        if (step + 1) % gcfg.checkpoint_every == 0 or step + 1 == gcfg.vae_steps:
            save_training_state(work, "vae", objects, {"step": step + 1, "history": history, "config": config})
    bar.close()
    vae.eval()
    return history


@torch.no_grad()
def _encode_all(vae, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(x), batch):
        post = vae.encode(x[i:i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def measure_scaling_factor(vae, x: torch.Tensor, seed: int = 0) -> float:
    """1 / std of posterior samples of the images ``x``: the factor that gives the UNet unit-variance
    latents, as SD's 0.18215 did for SD's own VAE."""
    mean, std = _encode_all(vae, x)
    g = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=g)
    return float(1.0 / z.std())


def train_unet(unet, text_encoder, tokenizer, latents: tuple[torch.Tensor, torch.Tensor],
               labels: np.ndarray, classes: Sequence[str], gcfg: "GeneratorConfig", work: Path,
               seed: int, progress: bool = True) -> tuple[list[float], dict, dict]:
    """Train the UNet and the text encoder jointly on scaled VAE latents (ε-prediction, SD's DDPM
    schedule, uniform timesteps).

    Args:
        latents: ``(mean, std)`` of the VAE posterior of every training image, already multiplied
            by the scaling factor; each step draws a fresh posterior sample.
        labels, classes: the images' labels and the class names for the prompts.
        gcfg: the generator config (steps, batch, learning rates, prompts, empty-prompt rate, EMA).
        work: checkpoint folder (``unet.safetensors`` + ``unet.json``); resumed when present.

    Returns:
        ``(loss history, EMA of the UNet, EMA of the text encoder)``, diffusers ``EMAModel`` objects.
    """
    from diffusers.training_utils import EMAModel  # not at module level: seconds to import

    noise_sched = build_scheduler("ddpm")
    alphas = noise_sched.alphas_cumprod
    # All prompts are known up front: tokenise them once; the text encoder runs on the distinct
    # prompts of a batch only, and the rows are gathered per image.
    prompts = [t.format(c) for t in gcfg.prompts for c in classes] + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    n_cls, n_tpl, empty = len(classes), len(gcfg.prompts), len(prompts) - 1
    labels_t = torch.as_tensor(labels)
    params = [{"params": unet.parameters(), "lr": gcfg.unet_lr},
              {"params": text_encoder.parameters(), "lr": gcfg.text_lr}]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    # one factor for both groups, each on its own base rate (unet_lr, text_lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: _lr_factor(step, gcfg.unet_steps, gcfg.warmup_steps))
    # decay min(ema_decay, (1 + s) / (10 + s)) from the second update on; the first copies the weights
    ema_u = EMAModel(unet.parameters(), decay=gcfg.ema_decay)
    ema_t = EMAModel(text_encoder.parameters(), decay=gcfg.ema_decay)
    objects = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_u, "ema_text_encoder": ema_t,
               "optimizer": opt, "schedule": schedule}
    config = _phase_config(gcfg, _UNET_KEYS, seed)
    meta = _resume(work, "unet", objects, config)
    start, history = (meta["step"], meta["history"]) if meta else (0, [])
    mean, std = latents
    unet.train(), text_encoder.train()
    bar = tqdm(range(start, gcfg.unet_steps), initial=start, total=gcfg.unet_steps, desc="UNet",
               **bar_options(progress))
    for step in bar:
        g = _step_generator(seed, 2, step)
        idx = torch.randint(0, len(mean), (gcfg.unet_batch_size,), generator=g)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        tpl = torch.randint(0, n_tpl, (len(idx),), generator=g)
        which = tpl * n_cls + labels_t[idx]
        which = torch.where(torch.rand(len(idx), generator=g) < gcfg.empty_prompt_prob,
                            torch.full_like(which, empty), which)
        used, inverse = torch.unique(which, return_inverse=True)
        context = text_encoder(ids[used])[0][inverse]
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        schedule.step()
        ema_u.step(unet.parameters())
        ema_t.step(text_encoder.parameters())
        history.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(history[-50:]):.4f}")
        if (step + 1) % gcfg.checkpoint_every == 0 or step + 1 == gcfg.unet_steps:
            save_training_state(work, "unet", objects, {"step": step + 1, "history": history, "config": config})
    bar.close()
    unet.eval(), text_encoder.eval()
    return history, ema_u, ema_t


def train_generator(cfg: "ExperimentConfig", out: str | Path | None = None, work: str | Path | None = None,
                    fresh: bool = False, progress: bool = True) -> Path:
    """Train the demo generator from ``cfg.generator`` on ``cfg.data``'s ID training split and save
    the pipeline with ``save_pretrained`` under ``out`` (default ``cfg.generator.out``).

    Both phases checkpoint under ``work`` (default ``cfg.generator.work_dir``) and a rerun resumes
    them; ``fresh=True`` deletes the checkpoints first. ``out`` also receives ``training.json``
    (config, seed, parameter counts, wall times, loss histories, the measured scaling factor).
    """
    import shutil

    from ..device import seed_everything

    gcfg = cfg.generator
    out = Path(out or gcfg.out)
    work = Path(work or gcfg.work_dir)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    seed = cfg.run.seed
    if gcfg.threads > 0:
        # on a shared CPU, more intra-op threads than free cores make every op spin-wait
        torch.set_num_threads(gcfg.threads)
    seed_everything(seed)  # module initialisation below draws from the global generator
    x, labels, classes = training_images(cfg)
    log.info("training the demo generator on %d images of %d classes: %s", len(x), len(classes),
             ", ".join(classes))
    tokenizer = build_tokenizer(tuple(DEMO_WORDS) + tuple(c.lower() for c in classes
                                                          if c.lower() not in DEMO_WORDS))
    vae, text_encoder, unet = build_vae(gcfg), build_text_encoder(gcfg, tokenizer), build_unet(gcfg)
    log.info("parameters: VAE %d, text encoder %d, UNet %d", count_parameters(vae),
             count_parameters(text_encoder), count_parameters(unet))

    t0 = time.time()
    vae_history = train_vae(vae, x, gcfg, work, seed, progress)
    t_vae = time.time() - t0
    for p in vae.parameters():
        p.requires_grad_(False)
    scale = measure_scaling_factor(vae, x, seed)
    vae.register_to_config(scaling_factor=scale)
    log.info("VAE done (%.0f s); measured scaling_factor %.4f", t_vae, scale)

    # Mirrored images are encoded rather than their latents flipped: the VAE's learned kernels are
    # not mirror-symmetric, so a flipped latent need not decode to the flipped image.
    x_all = torch.cat([x, x.flip(-1)]) if gcfg.hflip else x
    labels_all = np.concatenate([labels, labels]) if gcfg.hflip else labels
    mean, std = _encode_all(vae, x_all)
    t0 = time.time()
    unet_history, ema_u, ema_t = train_unet(unet, text_encoder, tokenizer, (mean * scale, std * scale),
                                            labels_all, classes, gcfg, work, seed, progress)
    t_unet = time.time() - t0
    ema_u.copy_to(unet.parameters())
    ema_t.copy_to(text_encoder.parameters())

    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    if gcfg.save_dtype == "float16":
        pipe.to(torch.float16)  # halves the shipped folder; load_pipeline upcasts to float32
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    previous = json.loads((work / "times.json").read_text()) if (work / "times.json").exists() else {}
    record = {"config": dataclasses.asdict(gcfg), "seed": seed, "classes": classes,
              "scaling_factor": scale,
              "parameters": {"vae": count_parameters(vae), "text_encoder": count_parameters(text_encoder),
                             "unet": count_parameters(unet)},
              # wall time of this invocation (a resumed run only counts what it did itself)
              "wall_seconds": {"vae": round(t_vae, 1), "unet": round(t_unet, 1)},
              "previous_invocations": previous.get("invocations", []),
              "history": {"vae": vae_history, "unet": unet_history}}
    atomic_write_json(tmp / "training.json", record)
    atomic_write_json(work / "times.json",
                      {"invocations": previous.get("invocations", []) + [record["wall_seconds"]]})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the shipped folder changes in one step: never half old, half new
    log.info("saved the generator to %s", out)
    return out
