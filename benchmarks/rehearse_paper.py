"""Rehearse a paper preset on this CPU: every stage of the real code at the preset's real shapes,
with random weights and synthetic data in the official layouts. Prints one JSON line.

    python benchmarks/rehearse_paper.py --preset cifar100      # ~10 min on a 2-core CPU
    python benchmarks/rehearse_paper.py --preset imagenet100   # ~13 min
    python benchmarks/rehearse_paper.py --preset cifar100 --smoke   # seconds: tiny shapes, same code

What runs, each stage in a fresh process (so its peak RSS is its own):

* Stable Diffusion 1.4's components built from ``data/sd14_configs/`` at their real sizes (the
  parameter counts are asserted: UNet ≈ 860 M, text encoder ≈ 123 M, VAE ≈ 84 M), saved with
  ``save_pretrained`` and loaded back through ``diffusion.pipeline``, the path a user takes; the
  tokenizer is the kit's offline stand-in (CLIP's vocabulary cannot be downloaded here);
* synthetic data in the official layouts: CIFAR-100 python pickles or an ImageNet-style tree, SVHN
  ``.mat``, image folders for the other OOD sets (32 × 32 for LSUN-C / iSUN, larger elsewhere);
* stage 1 on 2 images at 512² (1 Adam step, noise batch 2; ``embed.max_images=2``); stage 2 at
  D = 768, C = 100 on synthetic embeddings for a few steps; stage 3 at the paper's counts; stage 4
  on 2 images at 512² with guidance (2 steps); stage 5 for 2 steps at the preset's batch sizes
  (``imagenet100``: 8 + 8, since 80 + 80 at 224² needs ≈ 58 GiB, ``plan``'s estimate, more than
  this machine has); stage 6 on the synthetic sets.

The JSON line: per stage the wall time, peak RSS, artefact shapes and dtypes checked against the
paper's, ``plan``'s FLOPs and peak-memory estimate for the same work, and the CPU rate reached
(``cpu_tflops``: what ``plan --gpu cpu`` uses).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from ncis_core import assets  # noqa: E402

SD14 = assets.path("data/sd14_configs")  # shipped with the package
PAPER_PARAMS = {"unet": 859.5e6, "text_encoder": 123.1e6, "vae": 83.7e6}


# ----------------------------------------------------------------------------- setup (parent process)
def build_sd14(folder: Path, words, smoke: bool) -> dict:
    """SD 1.4's components at their real sizes (random weights), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ncis_core import diffusion

    tokenizer = diffusion.offline_tokenizer(words)
    torch.manual_seed(0)
    if smoke:  # the same structure at tiny widths: the code paths, not the shapes
        configs = diffusion.tiny_configs(32)
        unet, vae = UNet2DConditionModel(**configs["unet"]), AutoencoderKL(**configs["vae"])
        text_cfg = CLIPTextConfig(**{**configs["text_encoder"], "vocab_size": 49408})
    else:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(SD14 / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(SD14 / "vae")))
        text_cfg = CLIPTextConfig.from_json_file(str(SD14 / "text_encoder" / "config.json"))
    text_cfg.bos_token_id, text_cfg.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_cfg.pad_token_id = tokenizer.pad_token_id
    text = CLIPTextModel(text_cfg)
    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in (("unet", unet), ("text_encoder", text), ("vae", vae))}
    if not smoke:
        for name, expected in PAPER_PARAMS.items():
            assert abs(counts[name] - expected) / expected < 0.01, (name, counts[name])
    pipe = diffusion.build_pipeline(vae, text, tokenizer, unet)
    pipe.scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(str(SD14 / "scheduler")))
    pipe.save_pretrained(str(folder))
    return counts


def write_data(preset: str, root: Path, smoke: bool) -> list[str]:
    """Synthetic ID and OOD data in the official layouts; returns the config overrides."""
    from data_fixtures import write_image, write_svhn_mat, write_tiny_cifar100, write_tiny_imagenet
    from ncis_core.data.classes import IMAGENET100_WNIDS

    ood = root / "ood"
    if preset == "cifar100":
        # 512 train images: 2 steps of 256 in one epoch (drop_last off, as the original)
        write_tiny_cifar100(root / "cifar", n_train=32 if smoke else 512, n_test=20)
        write_svhn_mat(ood / "svhn" / "test_32x32.mat", n=12)
        sets = {"svhn": ood / "svhn", "places365": ood / "places", "lsun_crop": ood / "LSUN",
                "isun": ood / "iSUN", "textures": ood / "dtd"}
        for i in range(8):
            write_image(ood / "places" / "a" / f"{i}.jpg", (256, 256), seed=i)
            write_image(ood / "LSUN" / "test" / f"{i}.jpg", (32, 32), seed=10 + i)
            write_image(ood / "iSUN" / "iSUN_patches" / f"{i}.jpeg", (32, 32), seed=20 + i)
            write_image(ood / "dtd" / "banded" / f"{i}.jpg", (300, 300), seed=30 + i)
        data = [f"data.root={root / 'cifar'}"]
    else:
        write_tiny_imagenet(root / "imagenet", IMAGENET100_WNIDS, per_class=1)
        sets = {"inaturalist": ood / "iNaturalist", "places": ood / "Places", "sun": ood / "SUN",
                "textures": ood / "dtd"}
        for name, folder in sets.items():
            for i in range(5):
                write_image(folder / "x" / f"{i}.jpg", (256, 320), seed=hash(name) % 1000 + i)
        # the initialisation in its real layout: Dream-OOD's DataParallel ResNet-34 (module.encoder.*, module.fc.*)
        import torch

        from ncis_core.models.resnet import build_classifier

        net = build_classifier("small" if smoke else "resnet34", 100)
        state = {("module.fc." + k[3:]) if k.startswith("fc.") else "module.encoder." +
                 k.replace(".downsample.", ".shortcut."): v for k, v in net.state_dict().items()}
        torch.save(state, root / "dreamood-in100-resnet34.pt")
        data = [f"data.root={root / 'imagenet'}", f"classifier.pretrained={root / 'dreamood-in100-resnet34.pt'}"]
    return [*data, *(f"data.ood_roots.{k}={v}" for k, v in sets.items()), "data.ood_subset_size=8"]


def synthetic_embeddings(path: Path, class_names, per_class: int, dim: int) -> None:
    """Stage-1-shaped embeddings for stage 2 at the paper's D and C (stage 1 itself embeds 2)."""
    from ncis_core.embeddings_io import save_embeddings, synthetic_embeddings as make

    data = make(num_classes=len(class_names), per_class=per_class, dim=dim, seed=0, rank=3,
                class_names=list(class_names))
    save_embeddings(path, data["embeddings"], data["labels"], data["image_ids"], data["class_names"],
                    extra={"source": "rehearsal"})


# ----------------------------------------------------------------------------- one stage (child process)
def _reset_peak_rss() -> None:
    """Start this process's peak-RSS count afresh: a spawned child inherits the parent's high-water
    mark across exec (ru_maxrss is preserved), which would hide the stage's own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_gib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _stage_child(preset: str, overrides: list[str], out: str, stage: str, queue) -> None:
    _reset_peak_rss()
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from ncis_core.config import load_config
    from ncis_core.runs import RunDir

    started = time.perf_counter()
    cfg = load_config(preset, overrides, out=out)
    run = RunDir.create(cfg) if not (Path(out) / "manifest.json").exists() else RunDir(out, cfg)
    shapes: dict = {}
    if stage == "embed":
        from ncis_core.embeddings_io import load_embeddings
        from ncis_core.stages import embed

        embed.run(cfg, run, progress=False)
        e = load_embeddings(run.path("embeddings"))
        shapes = {"embeddings": [list(e["embeddings"].shape), str(e["embeddings"].dtype)]}
    elif stage == "cvpn":
        from ncis_core.stages import train_cvpn

        result = train_cvpn.run(cfg, run, progress=False)
        shapes = {"k": result.k, "parameters": result.history["parameters"],
                  "steps": result.history["total_steps"],
                  "best_selection_mse": result.history["best_selection_mse"]}
    elif stage == "sample":
        from ncis_core.stages import generate, sample

        sample.run(cfg, run, progress=False)
        o = generate.load_outlier_embeddings(run.path("outlier_embeddings"))["outliers"]
        shapes = {"outlier_embeddings": [list(o.shape), str(o.dtype)]}
    elif stage == "generate":
        import numpy as np
        from PIL import Image

        from ncis_core.stages import generate

        generate.run(cfg, run, progress=False)
        files = sorted(run.path("outliers_dir").rglob("*.png"))
        first = np.asarray(Image.open(files[0]))
        shapes = {"pngs": len(files), "png": [list(first.shape), str(first.dtype)]}
    elif stage == "classifier":
        from ncis_core.stages import train_classifier

        steps = 2
        train_classifier.train(cfg, run, progress=False, stop_after_steps=steps)
        shapes = {"steps": steps, "batch": [cfg.classifier.batch_size, cfg.classifier.outlier_batch_size],
                  "arch": cfg.classifier.arch, "image": cfg.data.image_size}
    elif stage == "evaluate":
        from ncis_core.models.resnet import EnergyHead, build_classifier
        from ncis_core.stages import evaluate
        from ncis_core.checkpoints import save_classifier

        # stage 5 stopped after 2 steps without a checkpoint: score a fresh network of its shape
        c = cfg.classifier
        num_classes = len(evaluate.get_split(cfg.data, "id-test").classes)
        net = build_classifier(c.arch, num_classes, c.width)
        path = Path(out) / "rehearsal_classifier.safetensors"
        save_classifier(path, net, EnergyHead(c.energy_head, c.head_hidden),
                        {"arch": c.arch, "width": c.width, "num_classes": num_classes, "head": c.energy_head,
                         "head_hidden": c.head_hidden, "slope": 1.0, "outliers": "ncis"})
        results = evaluate.run(cfg, run, checkpoint=path, progress=False)
        shapes = {"sets": {k: v["count"] for k, v in results["sets"].items()},
                  "rows": len(results["rows"])}
    queue.put({"seconds": round(time.perf_counter() - started, 2),
               "peak_rss_gib": round(_peak_rss_gib(), 2),
               "artefacts": shapes})


def run_stage(preset, overrides, out, stage) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_stage_child, args=(preset, overrides, str(out), stage, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"rehearsal: stage {stage} failed (exit {proc.exitcode})")
    return queue.get()


# ----------------------------------------------------------------------------- checks and rates
def check(preset: str, stages: dict, smoke: bool) -> list[str]:
    """The artefacts against the paper's shapes (METHOD.md); returns what does not match."""
    bad = []
    d = 32 if smoke else 768
    if stages["embed"]["artefacts"]["embeddings"] != [[2, d], "torch.float32"]:
        bad.append(f"embeddings {stages['embed']['artefacts']['embeddings']} != 2 × {d} float32")
    out = stages["sample"]["artefacts"]["outlier_embeddings"]
    if out[0][0] != 100 or out[0][2] != d or out[1] != "torch.float32":
        bad.append(f"outlier embeddings {out} != 100 × M × {d} float32")
    side = 32 if smoke else 256
    if stages["generate"]["artefacts"]["png"] != [[side, side, 3], "uint8"]:
        bad.append(f"PNG {stages['generate']['artefacts']['png']} != {side} × {side} × 3 uint8")
    if not smoke and stages["cvpn"]["artefacts"]["parameters"] < 30e6:
        bad.append(f"cVPN has {stages['cvpn']['artefacts']['parameters']} parameters (paper ≈ 36.2 M)")
    return bad


def planned(preset: str, overrides: list[str], out: Path) -> dict:
    """``plan``'s FLOPs and peak memory for exactly the rehearsed work (fp32 on a CPU)."""
    from ncis_core.config import load_config
    from ncis_core.plan import dataset_counts, stage_work

    cfg = load_config(preset, [*overrides, "diffusion.dtype=float32", "generate.precision=fp32"], out=str(out))
    counts, classes, _ = dataset_counts(cfg)
    return stage_work(cfg, counts, classes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["cifar100", "imagenet100"], default="cifar100")
    parser.add_argument("--smoke", action="store_true", help="tiny components, seconds: the code paths only")
    parser.add_argument("--keep", default=None, help="keep the rehearsal folder here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ncis-rehearsal-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        from ncis_core import diffusion
        from ncis_core.config import load_config
        from ncis_core.data.classes import CIFAR100_SHORT, IMAGENET100_NAMES

        names = CIFAR100_SHORT if args.preset == "cifar100" else IMAGENET100_NAMES
        words = [*names, *diffusion.generation_names(args.preset, names)]
        t0 = time.perf_counter()
        params = build_sd14(tmp / "sd14", words, args.smoke)
        setup_seconds = round(time.perf_counter() - t0, 1)
        data = write_data(args.preset, tmp / "data", args.smoke)
        is_cifar = args.preset == "cifar100"
        common = [*data, f"diffusion.pipeline={tmp / 'sd14'}", "run.device=cpu",
                  "classifier.num_workers=0", "evaluate.extra_scores=[]"]
        # stage 1 in its own run folder: 2 images of the real loader at 512²
        embed_set = [*common, "embed.max_images=2", "embed.steps=1", "embed.noise_batch=2",
                     "embed.images_per_step=2"] + (["embed.resolution=32"] if args.smoke else [])
        # stages 2-6 on synthetic stage-1 embeddings of the paper's D and C
        rest = [*common, "cvpn.epochs=1", "generate.num_batches=1", "generate.batch_size=2",
                "generate.steps=2", "classifier.epochs=1", "classifier.outliers_with_replacement=true",
                "classifier.num_outliers=256"]
        if not is_cifar:
            rest += ["classifier.batch_size=8", "classifier.outlier_batch_size=8"]
        if args.smoke:
            rest += ["generate.height=32", "generate.width=32", "generate.output_size=32",
                     "classifier.batch_size=16", "classifier.outlier_batch_size=16", "classifier.arch=small",
                     "sample.draws_per_round=50"]
        stages = {}
        stages["embed"] = run_stage(args.preset, embed_set, tmp / "run-embed", "embed")
        run_b = tmp / "run"
        cfg_b = load_config(args.preset, rest, out=str(run_b))
        from ncis_core.runs import RunDir

        run = RunDir.create(cfg_b)
        with run.stage("embed") as rec:  # recorded as stage 1's output, as the stages expect
            if not rec.done:
                synthetic_embeddings(run.path("embeddings"), names, 4, 32 if args.smoke else 768)
        for name in ("cvpn", "sample", "generate", "classifier", "evaluate"):
            stages[name] = run_stage(args.preset, rest, run_b, name)
        problems = check(args.preset, stages, args.smoke)
        plan_embed = planned(args.preset, embed_set, tmp / "plan-embed")
        plan_rest = planned(args.preset, rest, tmp / "plan-rest")
        for name, st in stages.items():
            work = (plan_embed if name == "embed" else plan_rest)[name]
            flops = work["conv"] + work["matmul"]
            if name == "classifier":  # 2 steps rehearsed, not the epoch plan counts
                flops = flops / max(work["work"]["steps"], 1) * 2
            if name == "cvpn":  # trained on the synthetic embeddings, not on the dataset's count
                flops = flops / max(work["work"]["steps"], 1) * st["artefacts"]["steps"]
            st["plan_flops"] = flops
            st["plan_peak_memory_gib"] = round(work["peak_memory_gib"], 2)
            st["cpu_tflops"] = round(flops / st["seconds"] / 1e12, 4) if st["seconds"] else None
        out = {"benchmark": "rehearse_paper", "preset": args.preset, "smoke": args.smoke,
               "machine": f"{os.cpu_count()} CPUs", "parameters": params, "setup_seconds": setup_seconds,
               "stages": stages, "total_seconds": round(time.perf_counter() - started, 1),
               "shapes_ok": not problems, "problems": problems}
        print(json.dumps(out))
        return 0 if not problems else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
