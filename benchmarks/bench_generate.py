"""Stage 4 throughput: images/s of outlier generation with one outlier embedding per image vs one
per batch (they should cost the same: the per-image vectors only change what the text encoder's
lookup returns). Prints one JSON line.

Runs on the demo generator (``data/demo/generator``, the demo preset's settings: 32 × 32, 25 PNDM
steps, guidance 5) when it is there, else on the tiny random components (said in the output).

    python benchmarks/bench_generate.py --quick
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
from ncis_core.config import load_config  # noqa: E402
from ncis_core.stages import generate  # noqa: E402

NAMES = ["bear", "bird", "cat", "dog", "elephant", "giraffe"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two batches per mode (< 1 min on the demo)")
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="seconds: one batch per mode at 2 steps (the test suite)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.batches = True, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    demo = assets.path("data/demo/generator")
    if (demo / "model_index.json").exists():
        cfg, pipeline = load_config("demo", ["run.device=cpu"]), "demo generator"
    else:
        cfg, pipeline = load_config("smoke"), "tiny random (demo generator not there)"
    batches = args.batches or (2 if args.quick else 8)
    if args.smoke:
        cfg = replace(cfg, generate=replace(cfg.generate, steps=2))
    pipe, tokens = generate.prepare(cfg, NAMES)
    dim = D.embedding_width(pipe)
    outliers = torch.randn(len(NAMES), 100, dim, generator=torch.Generator().manual_seed(0))
    out = {"benchmark": "generate", "quick": args.quick, "pipeline": pipeline,
           "size": cfg.generate.height, "steps": cfg.generate.steps, "guidance": cfg.generate.guidance_scale,
           "batch_size": cfg.generate.batch_size, "batches": batches, "threads": torch.get_num_threads(),
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__}
    generate.generate_images(pipe, tokens, 0, outliers[0, :1], [0], replace(cfg.generate, steps=2))  # warm-up
    for mode in ("image", "batch"):
        gcfg = replace(cfg.generate, embedding_per=mode, num_batches=batches)
        plan = generate.plan(len(NAMES), outliers.shape[1], gcfg, NAMES)
        t0 = time.perf_counter()
        for batch in plan:
            c = batch[0].class_index
            generate.generate_images(pipe, tokens, c, outliers[c, [im.embedding_index for im in batch]],
                                     [im.seed for im in batch], gcfg)
        out[f"images_per_s_{mode}"] = round(sum(len(b) for b in plan) / (time.perf_counter() - t0), 3)
    out["ratio_image_vs_batch"] = round(out["images_per_s_image"] / out["images_per_s_batch"], 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
