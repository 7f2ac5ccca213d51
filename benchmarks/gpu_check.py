"""GPU check of the paper path on SD-1.4-shaped components (random weights, built from the published
configs in ``data/sd14_configs/``), for one lent GPU in one run of a few minutes. Prints one JSON
line (and writes it to ``--json-out``); ``benchmarks/gpu_check.sh`` runs it there.

Sections (each independent: one failing is recorded under ``errors`` and the rest still run):

* ``stage1_fp32`` / ``stage1_bf16``: stage 1 images/s and peak memory at ``images_per_step`` ×
  ``noise_batch`` (the preset's 8 × 32, ``micro_batch`` images per UNet call);
* ``stage1_largest_micro_batch_fp32``: the most images per UNet call that fit;
* ``stage1_rows_by_precision``: fp32 vs bf16 vs fp16-with-loss-scale rows on the same images,
  timesteps and noise (max and mean relative difference of the row updates): the measurement
  ``embed.precision`` waits for before the paper presets leave fp32;
* ``stage4_fp16`` / ``stage4_bf16``: stage 4 images/s at 512², batched, with guidance;
* ``stage5_fp32`` / ``stage5_bf16``: ResNet-34 steps/s at 256 + 256 images of 32²;
* ``fraction_of_peak`` for each, and ``projection``: ``plan``'s cifar100 hours (at its assumed
  fraction) beside the same work at the measured rates.

PyTorch's defaults stay as the kit runs with them (cuDNN TF32 convolutions, full-fp32 matmuls).
FLOP counts come from :mod:`ncis_core.flops` (UNet forward at 64 × 64 ≈ 0.80 TFLOP, input-only
forward + backward ≈ 1.67 TFLOP).
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

from ncis_core import assets  # noqa: E402

CONFIGS = assets.path("data/sd14_configs")  # shipped with the package
def _sd14_tflop() -> tuple[float, float]:
    """(UNet forward + input-only backward, one 50-step guided image) in TFLOP, counted on the meta device."""
    from ncis_core import flops

    unet = json.loads((CONFIGS / "unet" / "config.json").read_text())
    vae = json.loads((CONFIGS / "vae" / "config.json").read_text())
    fb = flops.unet_flops(unet, 64, backward=True)
    image = 100 * flops.unet_flops(unet, 64)["forward"] + flops.vae_flops(vae, 512)["decode"]["forward"]
    return (fb["forward"] + fb["backward"]) / 1e12, image / 1e12


STAGE1_TFLOP_PER_UNET_PASS, STAGE4_TFLOP_PER_IMAGE = _sd14_tflop()
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16/fp16 tensor-core rates


def sd14_components(dtype: torch.dtype, device: str):
    """The pipeline of SD-1.4-shaped random components and the kit's offline tokenizer."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ncis_core.diffusion import build_pipeline, offline_tokenizer

    tokenizer = offline_tokenizer(("bear", "cat", "dog"))
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


def stage1(pipe, images: int, images_per_step: int, micro_batch: int, noise_batch: int, latent: int = 64,
           warmup: bool = True) -> dict:
    from ncis_core import diffusion as D
    from ncis_core.config import EmbedConfig
    from ncis_core.stages.embed import image_generator, invert

    cfg = EmbedConfig(noise_batch=noise_batch, images_per_step=images_per_step, micro_batch=micro_batch,
                      steps=3 if warmup else 1)
    tokens = D.class_tokens(pipe, ["bear", "cat", "dog"], "first_piece")
    labels = [i % 3 for i in range(images)]
    ids = D.tokenize(pipe.tokenizer, [cfg.prompt.format(tokens.names[c]) for c in labels])
    token_ids = [tokens.token_ids[c] for c in labels]
    table = D.embedding_table(pipe.text_encoder).weight
    init = table[token_ids].detach().float()
    latents = torch.randn(images, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    if warmup:  # kernels, allocator: one step of one batch
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


def rows_by_precision(pipe32, images: int, noise_batch: int, steps: int, latent: int) -> dict:
    """Stage 1's rows on the same images, timesteps and noise in fp32, bf16 and fp16 with the loss
    scale: relative difference of each precision's row update (rows − start) to fp32's."""
    import copy

    from ncis_core import diffusion as D
    from ncis_core.config import EmbedConfig
    from ncis_core.stages.embed import image_generator, invert

    tokens = D.class_tokens(pipe32, ["bear", "cat", "dog"], "first_piece")
    labels = [i % 3 for i in range(images)]
    cfg = EmbedConfig(steps=steps, noise_batch=noise_batch, images_per_step=images)
    ids = D.tokenize(pipe32.tokenizer, [cfg.prompt.format(tokens.names[c]) for c in labels])
    token_ids = [tokens.token_ids[c] for c in labels]
    init = D.embedding_table(pipe32.text_encoder).weight[token_ids].detach().float().cpu()
    latents = torch.randn(images, 4, latent, latent, generator=torch.Generator().manual_seed(1))
    updates, stats = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        pipe = pipe32 if dtype == torch.float32 else copy.deepcopy(pipe32).to(dtype=dtype)
        info: dict = {}
        rows = invert(pipe, latents, ids, token_ids, init, cfg, [image_generator(0, i) for i in range(images)],
                      stats=info)
        updates[name], stats[name] = rows - init, info
        if pipe is not pipe32:
            del pipe
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    out = {}
    for name in ("bf16", "fp16"):
        rel = (updates[name] - updates["fp32"]).norm(dim=1) / updates["fp32"].norm(dim=1)
        out[name] = {"max_rel_diff": round(float(rel.max()), 5), "mean_rel_diff": round(float(rel.mean()), 5),
                     **{k: v for k, v in stats[name].items()}}
    return {"images": images, "noise_batch": noise_batch, "steps": steps, **out}


def largest_stage1_batch(pipe, noise_batch: int, latent: int, limit: int = 32) -> int | None:
    """The most images per UNet call (``embed.micro_batch``) of one stage-1 step that fit in memory."""
    best = None
    n = 1
    while n <= limit:
        try:
            stage1(pipe, n, n, n, noise_batch, latent, warmup=False)
            best = n
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        n *= 2
    return best


def stage5(arch: str, batch: int, image: int, steps: int, precision: str, device: str) -> dict:
    """Classifier training steps per second at ``batch`` images (ID + outliers), fp32 or bf16 autocast."""
    from ncis_core.flops import classifier_flops
    from ncis_core.models.resnet import build_classifier

    net = build_classifier(arch, 100).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    tflop = batch * (lambda f: f["forward"] + f["backward"])(classifier_flops(arch, 100, image, training=True)) / 1e12
    return {"steps_per_s": round(steps / seconds, 3), "batch": batch, "image": image, "precision": precision,
            "tflop_per_step": round(tflop, 2), "achieved_tflops": round(steps / seconds * tflop, 1)}


def projection(measured: dict, card: str) -> dict:
    """``plan``'s cifar100 hours beside the same work at the measured rates."""
    from ncis_core.config import load_config
    from ncis_core.plan import plan

    report = plan(load_config("cifar100", ["embed.micro_batch=1"]), card=card)
    st = report["stages"]
    out = {"assumed_fraction": report["fraction"], "plan_hours": {k: round(v["gpu_hours"], 3) for k, v in st.items()}}
    measured_hours = {}
    if measured.get("stage1_fp32"):
        measured_hours["embed"] = st["embed"]["work"]["images"] / measured["stage1_fp32"]["images_per_s"] / 3600
    if measured.get("stage4_fp16"):
        measured_hours["generate"] = st["generate"]["work"]["images"] / measured["stage4_fp16"]["images_per_s"] / 3600
    if measured.get("stage5_fp32"):
        measured_hours["classifier"] = st["classifier"]["work"]["steps"] / measured["stage5_fp32"]["steps_per_s"] / 3600
    out["measured_hours"] = {k: round(v, 3) for k, v in measured_hours.items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage1-images", type=int, default=16)
    parser.add_argument("--images-per-step", type=int, default=8, help="the preset's embed.images_per_step")
    parser.add_argument("--micro-batch", type=int, default=2, help="images per UNet call in stage 1")
    parser.add_argument("--noise-batch", type=int, default=32)
    parser.add_argument("--stage4-images", type=int, default=16)
    parser.add_argument("--stage4-batch", type=int, default=8)
    parser.add_argument("--stage4-steps", type=int, default=50)
    parser.add_argument("--stage5-steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 rate")
    parser.add_argument("--json-out", default=None, help="also write the JSON here ($OUT/gpu_check.json)")
    parser.add_argument("--quick", "--smoke", dest="quick", action="store_true",
                        help="a smoke run of the script: tiny sizes; on a CPU the tiny random components")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    tiny = args.quick and device == "cpu"
    if args.quick:
        args.stage1_images, args.images_per_step, args.micro_batch, args.noise_batch = 2, 2, 1, 2
        args.stage4_images, args.stage4_batch, args.stage4_steps, args.stage5_steps = 2, 2, 2, 1
    # the kit's own settings: PyTorch's defaults (cuDNN TF32 convolutions, full-fp32 matmuls)
    out = {"benchmark": "gpu_check", "device": name, "torch": torch.__version__,
           "peak_tflops_assumed": peak, "components": "tiny random (--quick on a CPU)" if tiny
           else "SD 1.4 shapes, random weights", "results": {}, "errors": {}}

    def save():
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(out) + "\n")

    def section(key, fn):
        started = time.perf_counter()
        try:
            out["results"][key] = fn()
            if isinstance(out["results"][key], dict):
                out["results"][key]["wall_s"] = round(time.perf_counter() - started, 1)
                achieved = out["results"][key].get("achieved_tflops")
                if peak and achieved and not tiny:
                    out["results"][key]["fraction_of_peak"] = round(achieved / peak, 3)
        except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others
            out["errors"][key] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        save()

    if tiny:
        from ncis_core.diffusion import build_tiny_pipeline

        pipe32, latent, size = build_tiny_pipeline(["bear", "cat", "dog"]), 8, 32
        pipe32.set_progress_bar_config(disable=True)
    else:
        pipe32, latent, size = sd14_components(torch.float32, device), 64, 512
    section("stage1_fp32", lambda: stage1(pipe32, args.stage1_images, args.images_per_step, args.micro_batch,
                                          args.noise_batch, latent))
    section("stage1_rows_by_precision", lambda: rows_by_precision(pipe32, 4 if not args.quick else 2,
                                                                  8 if not args.quick else 2, 3, latent))
    if device == "cuda":
        section("stage1_largest_micro_batch_fp32", lambda: {"images": largest_stage1_batch(pipe32, args.noise_batch, latent)})
    del pipe32
    torch.cuda.empty_cache() if device == "cuda" else None
    for dtype_name, short in (("float16", "fp16"), ("bfloat16", "bf16")):
        dtype = getattr(torch, dtype_name)
        if tiny:
            pipe = build_tiny_pipeline(["bear", "cat", "dog"]).to(dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
        else:
            pipe = sd14_components(dtype, device)
        if short == "bf16":
            section("stage1_bf16", lambda: stage1(pipe, args.stage1_images, args.images_per_step,
                                                  args.micro_batch, args.noise_batch, latent))
        section(f"stage4_{short}", lambda: stage4(pipe, args.stage4_images, args.stage4_batch, args.stage4_steps, size))
        del pipe
        torch.cuda.empty_cache() if device == "cuda" else None
    arch, image, batch = ("small", 32, 8) if args.quick else ("resnet34", 32, 512)
    for precision in ("fp32", "bf16"):
        section(f"stage5_{precision}", lambda: stage5(arch, batch, image, args.stage5_steps, precision, device))
    if tiny:  # SD-1.4 FLOP counts do not apply to the tiny components
        for key in ("stage1_fp32", "stage1_bf16", "stage4_fp16", "stage4_bf16"):
            if isinstance(out["results"].get(key), dict):
                out["results"][key]["tflop_per_image"] = out["results"][key]["achieved_tflops"] = None
    section("projection", lambda: projection(out["results"], "h200" if "H200" in name else "h100"))
    save()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
