"""Stage 1 throughput: the kit's batched textual inversion vs the seed's way vs the kit one image at
a time. Prints one JSON line.

The three ways optimise the same images with the same per-image noise and timesteps:

* ``batched``: :func:`ncis_core.stages.embed.invert` on ``images_per_step`` images at once (each
  image its own row and Adam state; frozen weights, gradients for the rows only);
* ``sequential``: the same function one image at a time;
* ``seed``: the original's way — per image a fresh trainable copy of the *whole* input-embedding
  table, a new Adam over it, gradients masked to the class row.

Measured on (a) a text encoder of SD 1.4's shapes (vocab 49408, width 768, 12 layers; random
weights) with a small UNet of cross-attention width 768, and (b) the demo generator
(``data/demo/generator``) when it is there. ``max_abs_diff`` compares batched with sequential
embeddings (must be ≤ 1e-4), ``max_abs_diff_vs_seed`` batched with the seed's way.

    python benchmarks/bench_embed.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ncis_core import assets  # noqa: E402
from ncis_core import diffusion as D  # noqa: E402
from ncis_core.config import DiffusionConfig, EmbedConfig  # noqa: E402
from ncis_core.stages.embed import draw_noise, image_generator, invert, timestep_grid  # noqa: E402

WORDS = ["bear", "bird", "cat", "dog", "elephant", "giraffe"]


def sd14_shaped_pipeline(latent: int = 8):
    """SD 1.4's text encoder shapes (random weights) + a small UNet/VAE with cross-attention 768."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ncis_core.diffusion import build_pipeline, build_tokenizer

    tokenizer = build_tokenizer((*D.PROMPT_WORDS, *WORDS))
    torch.manual_seed(0)
    # SD 1.4's published text-encoder config (vocab 49408, width 768, 12 layers), random weights
    config = CLIPTextConfig.from_json_file(str(assets.path("data/sd14_configs/text_encoder/config.json")))
    text_encoder = CLIPTextModel(config)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4)
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    return pipe


def seed_way(pipe, latents, prompt_ids, token_ids, cfg: EmbedConfig, generators):
    """The original's per-image loop: a trainable copy of the whole table, Adam over all of it,
    gradients zeroed outside the class row."""
    te, unet = pipe.text_encoder, pipe.unet
    table = D.embedding_table(te)
    alphas = pipe.scheduler.alphas_cumprod.float()
    grid = timestep_grid(cfg, len(alphas))
    out = []
    for i in range(len(latents)):
        weight = torch.nn.Parameter(table.weight.detach().clone())
        opt = torch.optim.Adam([weight], lr=cfg.lr)
        keep = torch.zeros(weight.shape[0], 1)
        keep[token_ids[i]] = 1
        hook = table.register_forward_hook(lambda m, a, o, w=weight: torch.nn.functional.embedding(a[0], w))
        try:
            for _ in range(cfg.steps):
                t, eps = draw_noise([generators[i]], grid, cfg.noise_batch, latents.shape[1:])
                ctx = te(prompt_ids[i:i + 1])[0].repeat_interleave(cfg.noise_batch, 0)
                a = alphas[t[0]].view(-1, 1, 1, 1)
                zt = a.sqrt() * latents[i:i + 1] + (1 - a).sqrt() * eps[0]
                loss = (unet(zt, t[0], encoder_hidden_states=ctx).sample - eps[0]).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                weight.grad.mul_(keep)
                opt.step()
        finally:
            hook.remove()
        out.append(weight[token_ids[i]].detach().clone())
    return torch.stack(out)


def measure(pipe, names, n_images: int, cfg: EmbedConfig, latent: int, seed: int = 0) -> dict:
    tokens = D.class_tokens(pipe, names, "first_piece")
    labels = [i % len(names) for i in range(n_images)]
    prompt_ids = D.tokenize(pipe.tokenizer, [cfg.prompt.format(names[c]) for c in labels])
    token_ids = [tokens.token_ids[c] for c in labels]
    table = D.embedding_table(pipe.text_encoder).weight
    init = table[token_ids].detach().float()
    latents = torch.randn(n_images, 4, latent, latent, generator=torch.Generator().manual_seed(seed))

    def gens():
        return [image_generator(seed, i) for i in range(n_images)]

    invert(pipe, latents[:1], prompt_ids[:1], token_ids[:1], init[:1], replace(cfg, steps=1), gens()[:1])
    times, results = {}, {}
    t0 = time.perf_counter()
    g = gens()
    results["batched"] = torch.cat([
        invert(pipe, latents[i:i + cfg.images_per_step], prompt_ids[i:i + cfg.images_per_step],
               token_ids[i:i + cfg.images_per_step], init[i:i + cfg.images_per_step], cfg,
               g[i:i + cfg.images_per_step]) for i in range(0, n_images, cfg.images_per_step)])
    times["batched"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    g = gens()
    results["sequential"] = torch.cat([invert(pipe, latents[i:i + 1], prompt_ids[i:i + 1], token_ids[i:i + 1],
                                              init[i:i + 1], cfg, g[i:i + 1]) for i in range(n_images)])
    times["sequential"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["seed"] = seed_way(pipe, latents, prompt_ids, token_ids, cfg, gens())
    times["seed"] = time.perf_counter() - t0
    ips = {k: n_images / v for k, v in times.items()}
    return {
        "speedup_vs_seed": round(ips["batched"] / ips["seed"], 2),
        "speedup_vs_sequential": round(ips["batched"] / ips["sequential"], 2),
        "max_abs_diff": float((results["batched"] - results["sequential"]).abs().max()),
        "max_abs_diff_vs_seed": float((results["batched"] - results["seed"]).abs().max()),
        "images_per_s": {k: round(v, 3) for k, v in ips.items()},
        "images": n_images, "vocab": table.shape[0], "width": table.shape[1],
        "text_layers": pipe.text_encoder.config.num_hidden_layers, "latent": latent,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images, small noise batch (< 3 min)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--noise-batch", type=int, default=None)
    parser.add_argument("--images-per-step", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="seconds: 2 images, noise batch 2, 1 step (the test suite)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.quick, args.images, args.noise_batch, args.images_per_step = True, 2, 2, 2
    images = args.images or (6 if args.quick else 32)
    noise = args.noise_batch or (8 if args.quick else 32)
    cfg = EmbedConfig(noise_batch=noise, images_per_step=args.images_per_step or (6 if args.quick else 8),
                      steps=1 if args.smoke else EmbedConfig.steps)
    result = {"benchmark": "embed", "quick": args.quick, "steps": cfg.steps, "noise_batch": noise,
              "images_per_step": cfg.images_per_step, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__}
    sd = measure(sd14_shaped_pipeline(), WORDS, images, cfg, latent=8)
    result.update({k: sd[k] for k in ("speedup_vs_seed", "speedup_vs_sequential", "max_abs_diff",
                                      "max_abs_diff_vs_seed", "images_per_s")})
    result["sd14_shaped"] = sd
    demo = assets.path("data/demo/generator")
    if (demo / "model_index.json").exists():
        pipe = D.load_pipeline(DiffusionConfig(pipeline=str(demo), dtype="float32"))
        latent = pipe.unet.config.sample_size
        result["demo_generator"] = measure(pipe, WORDS, images, cfg, latent=latent)
    else:
        result["demo_generator"] = f"skipped: {demo} not there (train it first)"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
