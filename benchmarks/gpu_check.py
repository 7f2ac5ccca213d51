"""GPU check of the diffusion stages on SD-1.4-shaped components (random weights, built from the
published configs in ``data/sd14_configs/``): stage 1 and stage 4 images/s at 512², peak memory and
the fraction of the card's matrix rate reached. Prints one JSON line. Run it through
``benchmarks/gpu_check.sh`` on a lent GPU.

FLOP counts (METHOD.md §1, issue 5): an SD-1.4 UNet forward at 64 × 64 latents ≈ 0.80 TFLOP;
forward + backward without weight gradients ≈ 1.67 TFLOP, so one stage-1 image (3 steps × 32 noised
copies) ≈ 160 TFLOP; one stage-4 image at 50 steps with guidance ≈ 84.5 TFLOP in all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CONFIGS = ROOT / "data" / "sd14_configs"
STAGE1_TFLOP_PER_UNET_PASS = 1.67  # forward + backward, input gradients only, 64 × 64 latents
STAGE4_TFLOP_PER_IMAGE = 84.5      # 50 steps × 2 (guidance) UNet forwards + text + VAE decode
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core rates


def sd14_components(dtype: torch.dtype, device: str):
    """The pipeline of SD-1.4-shaped random components and the kit's offline tokenizer."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ncis_core.demo_generator import build_pipeline, build_tokenizer
    from ncis_core.diffusion import PROMPT_WORDS

    tokenizer = build_tokenizer((*PROMPT_WORDS, "bear", "cat", "dog"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS / "unet")))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(CONFIGS / "vae")))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(CONFIGS / "text_encoder" / "config.json")))
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(str(CONFIGS / "scheduler")))
    pipe = pipe.to(device=device, dtype=dtype)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stage1(pipe, images: int, images_per_step: int, micro_batch: int, noise_batch: int, latent: int = 64) -> dict:
    from ncis_core import diffusion as D
    from ncis_core.config import EmbedConfig
    from ncis_core.stages.embed import image_generator, invert

    cfg = EmbedConfig(noise_batch=noise_batch, images_per_step=images_per_step, micro_batch=micro_batch)
    tokens = D.class_tokens(pipe, ["bear", "cat", "dog"], "first_piece")
    labels = [i % 3 for i in range(images)]
    ids = D.tokenize(pipe.tokenizer, [cfg.prompt.format(tokens.names[c]) for c in labels])
    token_ids = [tokens.token_ids[c] for c in labels]
    table = D.embedding_table(pipe.text_encoder).weight
    init = table[token_ids].detach().float()
    latents = torch.randn(images, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    # warm-up (kernels, allocator) on one step of one batch
    invert(pipe, latents[:images_per_step], ids[:images_per_step], token_ids[:images_per_step],
           init[:images_per_step], EmbedConfig(**{**cfg.__dict__, "steps": 1}),
           [image_generator(0, i) for i in range(images_per_step)])
    sync()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    for lo in range(0, images, images_per_step):
        hi = min(lo + images_per_step, images)
        invert(pipe, latents[lo:hi], ids[lo:hi], token_ids[lo:hi], init[lo:hi], cfg,
               [image_generator(0, i) for i in range(lo, hi)])
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    tflop = cfg.steps * noise_batch * STAGE1_TFLOP_PER_UNET_PASS
    return {"images_per_s": round(images / seconds, 4), "seconds": round(seconds, 2), "images": images,
            "images_per_step": images_per_step, "micro_batch": micro_batch, "noise_batch": noise_batch,
            "tflop_per_image": round(tflop, 1), "achieved_tflops": round(images / seconds * tflop, 1),
            "peak_memory_gib": None if peak is None else round(peak, 2)}


def stage4(pipe, images: int, batch: int, steps: int, size: int = 512) -> dict:
    from ncis_core import diffusion as D
    from ncis_core.config import GenerateConfig
    from ncis_core.stages.generate import generate_images

    gcfg = GenerateConfig(steps=steps, batch_size=batch, height=size, width=size, output_size=size // 2)
    tokens = D.class_tokens(pipe, ["bear", "cat", "dog"], "first_piece")
    vectors = torch.randn(batch, D.embedding_width(pipe)) * 0.02
    generate_images(pipe, tokens, 0, vectors[:1], [0], GenerateConfig(steps=2, height=size, width=size))  # warm-up
    sync()
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    t0 = time.perf_counter()
    done = 0
    while done < images:
        generate_images(pipe, tokens, done % 3, vectors, list(range(done, done + batch)), gcfg)
        done += batch
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    tflop = STAGE4_TFLOP_PER_IMAGE * steps / 50
    return {"images_per_s": round(done / seconds, 4), "seconds": round(seconds, 2), "images": done,
            "batch": batch, "steps": steps, "tflop_per_image": round(tflop, 1),
            "achieved_tflops": round(done / seconds * tflop, 1),
            "peak_memory_gib": None if peak is None else round(peak, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--stage1-images", type=int, default=16)
    parser.add_argument("--images-per-step", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2, help="images per UNet call in stage 1")
    parser.add_argument("--noise-batch", type=int, default=32)
    parser.add_argument("--stage4-images", type=int, default=16)
    parser.add_argument("--stage4-batch", type=int, default=8)
    parser.add_argument("--stage4-steps", type=int, default=50)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 rate")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of the script: tiny sizes; on a CPU the tiny random components")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if args.quick:
        args.stage1_images, args.images_per_step, args.micro_batch, args.noise_batch = 2, 2, 1, 2
        args.stage4_images, args.stage4_batch, args.stage4_steps = 2, 2, 2
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = {"benchmark": "gpu_check", "device": name, "torch": torch.__version__,
           "peak_tflops_assumed": peak, "results": {}}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        if args.quick and device == "cpu":  # checks the script's code paths, not SD-1.4 speed
            from ncis_core.diffusion import build_tiny_pipeline

            pipe, latent, size = build_tiny_pipeline(["bear", "cat", "dog"]).to(dtype=dtype), 8, 32
            pipe.set_progress_bar_config(disable=True)
            out["components"] = "tiny random (--quick on a CPU)"
        else:
            pipe, latent, size = sd14_components(dtype, device), 64, 512
            out["components"] = "SD 1.4 shapes, random weights"
        entry = {"stage1": stage1(pipe, args.stage1_images, args.images_per_step, args.micro_batch,
                                  args.noise_batch, latent),
                 "stage4": stage4(pipe, args.stage4_images, args.stage4_batch, args.stage4_steps, size)}
        for stage in entry.values():
            if out["components"].startswith("tiny"):  # SD-1.4 FLOP counts do not apply
                stage["tflop_per_image"] = stage["achieved_tflops"] = None
            stage["fraction_of_peak"] = (round(stage["achieved_tflops"] / peak, 3)
                                         if peak and stage["achieved_tflops"] else None)
        out["results"][dtype_name] = entry
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
