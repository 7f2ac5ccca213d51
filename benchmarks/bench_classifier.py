"""Stage 5 throughput on CPU: training images/s and the share of step time spent waiting for data.
Prints one JSON line.

Runs the kit's own stage-5 pieces, not a copy: the preset's config (``load_config``, default
``demo``), the real ID training split (``get_split(cfg.data, "id-train")``) with the stage-5
transforms (``train_transforms`` through ``training_loader``), the outlier dataset of
``classifier.outliers=folder`` (``outlier_dataset``; a temporary folder of random PNGs, larger
than the training size so that ``RandomChoiceResize`` does real work) cycled the way training
cycles it (``_cycle``: the outlier loader is restarted, workers and all, each time it runs out),
the network from ``_init_model``, an ``EnergyHead`` and the training SGD. One step = the ID batch
and the outlier batch drawn from their DataLoaders, one forward pass through the joint batch,
CE + ``energy_weight`` · ``energy_loss``, backward, SGD step. Accelerate's wrapper is left out (one
CPU process: it only moves batches to the device it is already on).

Per architecture (``small``, the demo network, and ``resnet34``, 32 × 32) and per DataLoader
``num_workers`` (the configured value, 0 and 2), after ``warmup`` untimed steps, ``steps`` timed
steps split into the time blocked in ``next()`` on the loaders (``data_wait``) and the rest of the
step (``compute``); with the outliers decoded once into the run cache (stage 5's way:
``decoded_images``, ``decode_cache: true``) and, for the ``small`` network, also read from their
PNGs at every access (the kit before; ``--decode-cache on|off|both``, default both). Reported per run: ``images_per_s`` (ID + outlier images per second of step
time), ``ms_per_step``, ``data_wait_share`` (target < 0.2), ``data_wait_ms_per_step``,
``compute_ms_per_step``, batch sizes, ``num_workers``, ``outlier_loader_restarts`` within the timed
steps. ``note`` says when the CPU was busy at start (1-minute load average > 1.5); the load average at
the end is reported too, since other work on the machine can come and go between runs.

Usage: ``python benchmarks/bench_classifier.py [--quick]``. Full: ``small`` at the preset's batch
(demo: 128 + 128) for 2 + 16 steps, ``resnet34`` at 16 + 16 for 1 + 4 steps (at the preset's 128 + 128
one ResNet-34 step takes minutes on 2 cores; ``--resnet-batch 128`` asks for it); a few minutes on
2 cores. ``--quick``: ``small`` for 1 + 2 steps, ``resnet34`` at 4 + 4 for 1 + 2 steps and only with
the configured ``num_workers``; < 60 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ncis_core.config import load_config  # noqa: E402
from ncis_core.data import get_split  # noqa: E402
from ncis_core.models.resnet import EnergyHead  # noqa: E402
from ncis_core.runs import RunDir  # noqa: E402
from ncis_core.stages.train_classifier import (_cycle, _init_model, cosine_lr, energy_loss,  # noqa: E402
                                               outlier_dataset, train_transforms, training_loader)

log = logging.getLogger("bench_classifier")

TARGET_DATA_WAIT_SHARE = 0.2


def write_outliers(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """``count`` random RGB PNGs of ``size × size`` (smooth blobs plus noise, so PNG decoding is not trivial)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = np.kron(low, np.ones((8, 8, 1), np.uint8))
        image = np.clip(image.astype(np.int16) + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"outlier_{i:04d}.png")


def _next(iterator_box: list, loader: DataLoader) -> tuple:
    """The next ID batch; a finished epoch starts a new one (as the next epoch of training would)."""
    try:
        return next(iterator_box[0])
    except StopIteration:
        iterator_box[0] = iter(loader)
        return next(iterator_box[0])


def bench(cfg, split, num_workers: int, steps: int, warmup: int, seed: int = 0,
          cache_root: Path | None = None) -> dict:
    """Time ``warmup`` + ``steps`` training steps of ``cfg.classifier`` with ``num_workers`` workers;
    with ``cache_root`` the outliers come decoded from the run cache there (``decoded_images``), else
    from their PNG files at every access."""
    c = cfg.classifier
    torch.manual_seed(seed)
    id_tf, out_tf = train_transforms(cfg)
    run_dir = RunDir(cache_root, cfg) if cache_root is not None else None  # outliers=folder: no run needed
    outliers = outlier_dataset(cfg, run_dir)
    id_gen, out_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    id_loader = training_loader(split.dataset, id_tf, c.batch_size, id_gen, num_workers, drop_last=True)
    out_loader = training_loader(outliers, out_tf, c.outlier_batch_size, out_gen, num_workers, drop_last=True)
    model = _init_model(cfg, len(split.classes))
    head = EnergyHead(c.energy_head, c.head_hidden)
    opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=c.lr, momentum=c.momentum,
                          nesterov=c.nesterov, weight_decay=c.weight_decay)
    model.train(), head.train()
    total = len(id_loader) * c.epochs
    out_batches_per_cycle = len(out_loader)

    id_iter = [iter(id_loader)]
    out_iter = _cycle(out_loader, out_gen, 0, seed)
    wait = compute = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            wait = compute = 0.0
        t0 = time.perf_counter()
        x_in, y_in = _next(id_iter, id_loader)
        x_out, _ = next(out_iter)
        t1 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total, c.lr, c.final_lr)
        x = torch.cat([x_in, x_out])
        logits = model(x)
        ce = F.cross_entropy(logits[: len(x_in)], y_in)
        is_id = torch.zeros(len(x))
        is_id[: len(x_in)] = 1
        loss = ce + c.energy_weight * energy_loss(logits.float(), is_id, head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()
        t2 = time.perf_counter()
        wait += t1 - t0
        compute += t2 - t1
        log.info("%s w=%d step %d%s: wait %.0f ms, compute %.0f ms, loss %.3f", c.arch, num_workers, step,
                 " (warm-up)" if step < warmup else "", 1000 * (t1 - t0), 1000 * (t2 - t1), loss_value)
    del id_iter, out_iter  # shuts the workers down
    elapsed = wait + compute
    images = steps * (c.batch_size + c.outlier_batch_size)
    # _cycle restarts the outlier loader at batch k·n, k ≥ 1: count those among the timed batches
    n = out_batches_per_cycle
    restarts = (warmup + steps - 1) // n - (max(warmup, 1) - 1) // n
    return {
        "arch": c.arch, "num_workers": num_workers, "decode_cache": type(outliers).__name__ == "ArrayDataset",
        "batch_size": c.batch_size,
        "outlier_batch_size": c.outlier_batch_size, "steps": steps, "warmup": warmup,
        "images_per_s": round(images / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / steps, 1),
        "data_wait_share": round(wait / elapsed, 4),
        "data_wait_ms_per_step": round(1000 * wait / steps, 1),
        "compute_ms_per_step": round(1000 * compute / steps, 1),
        "outlier_loader_restarts": restarts,
        "meets_target": wait / elapsed < TARGET_DATA_WAIT_SHARE,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="demo", help="a 32 x 32 preset: demo (default) or smoke")
    parser.add_argument("--archs", default="small,resnet34")
    parser.add_argument("--workers", default=None,
                        help="comma-separated num_workers to try (default: the configured value, 0 and 2)")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: small 16, resnet 4; --quick: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per run (default: small 2, resnet 1; --quick: 1)")
    parser.add_argument("--resnet-batch", type=int,
                        help="ID and outlier batch for resnet* (default 16; --quick: 4; 0: the preset's)")
    parser.add_argument("--outliers", type=int, default=256, help="random PNGs in the outlier folder")
    parser.add_argument("--outlier-size", type=int, default=64, help="side of the outlier PNGs")
    parser.add_argument("--decode-cache", choices=("on", "off", "both"), default="both",
                        help="outliers decoded once into the run cache (stage 5's default: on), read from "
                             "their PNGs at every access (off, the kit before), or both runs (default)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: the smoke preset, the small network, 1 + 1 steps, 16 outliers (the test suite)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.quick, args.preset, args.archs, args.steps, args.warmup = True, "smoke", "small", 1, 1
        args.workers, args.outliers, args.outlier_size = args.workers or "0", 16, 32
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    load = os.getloadavg()[0]
    steps = {"small": args.steps or (2 if args.quick else 16), "resnet": args.steps or (2 if args.quick else 4)}
    warmups = {"small": 1 if args.quick else 2, "resnet": 1}
    if args.warmup is not None:
        warmups = {"small": args.warmup, "resnet": args.warmup}
    resnet_batch = args.resnet_batch if args.resnet_batch is not None else (4 if args.quick else 16)

    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "outliers"  # beside the run cache (tmp/run), not holding it
        images.mkdir()
        write_outliers(images, args.outliers, args.outlier_size)
        base = ["run.device=cpu", "classifier.outliers=folder", f"classifier.outlier_folder={images}",
                "classifier.num_outliers=null"]
        configured = load_config(args.preset, base).classifier.num_workers
        workers = ([int(w) for w in args.workers.split(",")] if args.workers
                   else sorted({configured, 0, 2}))
        split = None
        runs = []
        for arch in args.archs.split(","):
            overrides = [*base, f"classifier.arch={arch}"]
            resnet = arch.startswith("resnet")
            batch = resnet_batch if resnet else 0
            if batch:
                overrides += [f"classifier.batch_size={batch}", f"classifier.outlier_batch_size={batch}"]
            cfg = load_config(args.preset, overrides)
            if cfg.data.image_size > 64:
                raise SystemExit(f"preset {args.preset} trains at {cfg.data.image_size} px; use a 32 x 32 one")
            if split is None:
                split = get_split(cfg.data, "id-train")
                log.info("id-train: %d images, %d classes", len(split.dataset), len(split.classes))
            # --quick: ResNet-34 waits ~0 % for data whatever the workers; one setting keeps it < 60 s
            for w in ([configured] if args.quick and resnet and not args.workers else workers):
                kind = "resnet" if resnet else "small"
                for cached in {"on": [True], "off": [False], "both": [False, True]}[args.decode_cache]:
                    if resnet and args.decode_cache == "both" and not cached:
                        continue  # ResNet-34 steps are compute-bound: the cache changes nothing worth a run
                    runs.append(bench(cfg, split, w, steps[kind], warmups[kind],
                                      cache_root=Path(tmp) / "run" if cached else None))
                    log.info("%s", runs[-1])

    load_end = os.getloadavg()[0]
    line = {
        "benchmark": "classifier", "quick": args.quick, "preset": args.preset, "device": "cpu",
        "torch_threads": torch.get_num_threads(), "configured_num_workers": configured,
        "image_size": 32, "id_train_images": len(split.dataset),
        "outlier_images": args.outliers, "outlier_png_size": args.outlier_size,
        "target_data_wait_share": TARGET_DATA_WAIT_SHARE, "runs": runs,
        "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} CPUs",
        "cpu_count": os.cpu_count(), "load_avg_1m_at_start": round(load, 2),
        "load_avg_1m_at_end": round(load_end, 2), "torch": torch.__version__,
    }
    if load > 1.5:
        line["note"] = (f"contended CPU: 1-minute load average {load:.2f} at start ({load_end:.2f} at end) on "
                        f"{os.cpu_count()} CPUs; absolute numbers are low and runs can differ by the "
                        f"contention that changed between them")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
