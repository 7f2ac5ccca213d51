"""``compare``'s classifier trainings: stage 5's ``train()`` one at a time against side by side in
worker processes (:func:`ncis_core.compare.train_side_by_side`, what ``compare`` does). Prints one
JSON line.

Full (default): the demo run folder ``--run`` (stages 1-4 done; default ``outputs/demo``). The 12
trainings ``none, idgen, linear, ncis`` × seeds ``0, 1, 2`` one at a time, then the same 12 side by
side, then (unless ``--skip-50``) the 50 of ``make demo``'s compare (those methods and
``knn_boundary`` × seeds ``0-9``) side by side. ``--with-threads``: also the 12 on worker threads of
one process (``train()`` draws from torch's global generator, which the threads share: timing
only, not the same bytes). Missing renders of the methods' outlier images are made first
(``render_outliers``, not timed). Trainings write into a temporary folder; the run folder only gains
caches (decoded outliers, VAE reconstructions) and renders.

Reported: wall seconds of each block (setup included: processes, datasets, loaders,
initialisation, files), ``speedup_12`` (one at a time ÷ side by side), the workers and intra-op
threads each side used, how many of the 12 classifier files are byte-identical between the two
(all of them when both sides run their kernels on the same number of intra-op threads:
``--sequential-threads 1``), and the 1-minute load average at start and end (the machine is
shared: timings move with the load).

The roofline (``roofline``): what the machine allows at best. ``peak_gflops_per_thread`` is a
measured float32 matrix product (2048², one intra-op thread, best of 5: the fastest arithmetic this
CPU does); each block's ``training_gflop`` counts the classifiers' arithmetic (FLOPs of a training
step per image, :func:`ncis_core.flops.classifier_flops`, × images per step × steps), and
``bound_seconds`` is that arithmetic on every core at that peak with nothing else costing anything
(no BatchNorm, pooling, data or optimizer). ``best_possible_speedup_12`` = one at a time ÷ the
bound of the 12: no engine can beat it on this machine; ``share_of_peak`` = bound ÷ measured.

``--smoke``: the smoke preset and a folder of random PNGs as the outlier source (no run folder
needed): ``none`` and ``folder`` × 2 seeds, one smoke epoch, one at a time and side by side (and on
threads); seconds on 2 CPU cores.

Usage: ``python benchmarks/bench_compare.py [--run outputs/demo] [--epochs N] [--skip-50] [--with-threads]``.
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

import torch  # noqa: E402

from ncis_core import outliers as registry  # noqa: E402
from ncis_core.compare import train_side_by_side  # noqa: E402
from ncis_core.config import load_config, load_run_config  # noqa: E402
from ncis_core.device import intra_op_threads  # noqa: E402
from ncis_core.runs import RunDir  # noqa: E402
from ncis_core.stages import train_classifier as stage5  # noqa: E402

log = logging.getLogger("bench_compare")


def _jobs(make_cfg, run_root: Path, methods: list[str], seeds: list[int], out: Path):
    jobs = []
    for method in methods:
        for seed in seeds:
            cfg = make_cfg(method, seed)
            jobs.append((cfg, RunDir(run_root, cfg), out / method / f"seed{seed}"))
    return jobs


def one_at_a_time(jobs, threads: int) -> dict:
    seconds = []
    with intra_op_threads(threads):
        for cfg, run_dir, folder in jobs:
            t0 = time.perf_counter()
            stage5.train(cfg, run_dir, folder=folder, progress=False)
            seconds.append(time.perf_counter() - t0)
            log.info("one at a time: %s seed %s in %.1f s", cfg.classifier.outliers, cfg.classifier.seed,
                     seconds[-1])
    return {"trainings": len(jobs), "seconds": round(sum(seconds), 2),
            "seconds_per_training": [round(s, 2) for s in seconds], "torch_threads": threads}


def side_by_side(jobs, workers: int, threads: int) -> dict:
    """``compare``'s way: ``workers`` processes of ``threads // workers`` intra-op threads."""
    t0 = time.perf_counter()
    with intra_op_threads(threads):
        train_side_by_side(jobs, progress=False, workers=workers)
    seconds = time.perf_counter() - t0
    log.info("side by side: %d trainings in %.1f s", len(jobs), seconds)
    return {"trainings": len(jobs), "seconds": round(seconds, 2), "workers": min(workers, len(jobs)),
            "threads_per_worker": max(1, threads // min(workers, len(jobs)))}


def on_threads(jobs, workers: int, threads: int) -> dict:
    """The alternative to processes: ``train()`` on ``workers`` threads of one process, each kernel on
    ``threads // workers`` intra-op threads (process-wide). Timing only: the threads share torch's
    global generator, which ``train()`` seeds and draws from."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with intra_op_threads(max(1, threads // workers)), ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: stage5.train(job[0], job[1], folder=job[2], progress=False), jobs))
    seconds = time.perf_counter() - t0
    log.info("on threads: %d trainings in %.1f s", len(jobs), seconds)
    return {"trainings": len(jobs), "seconds": round(seconds, 2), "workers": workers,
            "threads_per_worker": max(1, threads // workers)}


def peak_gflops_per_thread(size: int = 2048, repeats: int = 5) -> float:
    """The float32 matrix product's rate on one intra-op thread, best of ``repeats`` (GFLOP/s)."""
    with intra_op_threads(1):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up: the library's first call sets up its kernels
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def training_gflop(jobs) -> float:
    """The classifiers' arithmetic of ``jobs`` (GFLOP): per training, the FLOPs of a training step
    per image × the images of a step (ID batch, and for a method with outliers the generated ID and
    outlier batches) × its steps (``epochs`` × the ID loader's batches)."""
    from ncis_core.data import get_split
    from ncis_core.flops import classifier_flops

    total, per_config = 0.0, {}  # the split and the network's count once per (data, network)
    for cfg, run_dir, _ in jobs:
        c = cfg.classifier
        key = (repr(cfg.data), c.arch, c.width)
        if key not in per_config:
            split = get_split(cfg.data, "id-train")
            f = classifier_flops(c.arch, len(split.classes), cfg.data.image_size, c.width, training=True)
            per_config[key] = (len(split.dataset), f["forward"] + f["backward"])
        n, per_image = per_config[key]
        steps = c.epochs * (n // c.batch_size if c.drop_last and n > c.batch_size else -(-n // c.batch_size))
        images = c.batch_size
        if stage5._outlier_folder(cfg, run_dir) is not None:
            images += c.outlier_batch_size * (2 if c.id_generated != "none" else 1)
        total += per_image * images * steps / 1e9
    return total


def roofline(blocks: dict, peak: float) -> dict:
    """The bound of each measured block (see the module's docstring)."""
    cores = os.cpu_count() or 1
    out = {"peak_gflops_per_thread": round(peak, 1), "cores": cores}
    for name, (gflop, seconds) in blocks.items():
        bound = gflop / (cores * peak)
        out[name] = {"training_gflop": round(gflop, 1), "bound_seconds": round(bound, 2),
                     "measured_seconds": seconds, "share_of_peak": round(bound / max(seconds, 1e-9), 3)}
    return out


def identical_files(a_jobs, b_jobs) -> int:
    return sum((a / "best.safetensors").read_bytes() == (b / "best.safetensors").read_bytes()
               for (_, _, a), (_, _, b) in zip(a_jobs, b_jobs))


def _render(preset: str, run_root: Path, methods: list[str], overrides: list[str]) -> None:
    from ncis_core.compare import render_outliers

    base = load_run_config(preset, overrides, out=str(run_root))
    run = RunDir.create(base)
    for method in methods:
        produces = registry.get_method(method).produces
        if produces != registry.NOTHING and not (produces == registry.EMBEDDINGS and method == base.sample.method):
            log.info("rendering the outliers of %s (untimed)", method)
            render_outliers(base, run, method, progress=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="outputs/demo", help="the demo run folder (stages 1-4 done)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--methods", default="none,idgen,linear,ncis")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods-50", default="none,idgen,linear,ncis,knn_boundary")
    parser.add_argument("--seeds-50", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--epochs", type=int, help="classifier.epochs (default: the preset's)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="trainings side by side (default: the CPUs, %(default)s)")
    parser.add_argument("--threads", type=int, default=max(torch.get_num_threads(), os.cpu_count() or 1),
                        help="torch threads shared by the side-by-side workers (default: %(default)s)")
    parser.add_argument("--sequential-threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the one-at-a-time trainings (default: torch's, %(default)s)")
    parser.add_argument("--skip-50", action="store_true", help="leave out the 50 trainings")
    parser.add_argument("--skip-12", action="store_true", help="only the 50 trainings (side by side)")
    parser.add_argument("--with-threads", action="store_true",
                        help="also the 12 on worker threads of one process (timing only)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: the smoke preset, random PNGs as outliers, none/folder × 2 seeds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    load = os.getloadavg()[0]
    line = {"benchmark": "compare", "smoke": args.smoke, "preset": "smoke" if args.smoke else args.preset}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = [f"classifier.epochs={args.epochs}"] if args.epochs else []
        if args.smoke:
            from bench_classifier import write_outliers

            images = tmp / "outliers"
            images.mkdir()
            write_outliers(images, 16, 32)
            run_root = tmp / "run"
            methods, seeds = ["none", "folder"], [0, 1]

            def make_cfg(method, seed):
                return load_config("smoke", [*overrides, f"classifier.outliers={method}",
                                             f"classifier.outlier_folder={images}", "classifier.num_outliers=null",
                                             "classifier.outlier_batch_size=8", f"classifier.seed={seed}"],
                                   out=str(run_root))
        else:
            run_root = Path(args.run).resolve()
            methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
            _render(args.preset, run_root, sorted(set(methods) | set(args.methods_50.split(","))), overrides)

            def make_cfg(method, seed):
                return load_run_config(args.preset, [*overrides, f"classifier.outliers={method}",
                                                     f"classifier.seed={seed}"], out=str(run_root))

        twelve = "" if args.smoke else "_12"
        sequential_jobs = _jobs(make_cfg, run_root, methods, seeds, tmp / "one")
        together_jobs = _jobs(make_cfg, run_root, methods, seeds, tmp / "together")
        # caches (decoded outliers, VAE reconstructions) built before either side is timed
        stage5.train(*sequential_jobs[-1][:2], folder=tmp / "warm", progress=False, stop_after_steps=1)
        seq = None
        if args.smoke or not args.skip_12:
            line[f"one_at_a_time{twelve}"] = seq = one_at_a_time(sequential_jobs, args.sequential_threads)
            line[f"side_by_side{twelve}"] = together = side_by_side(together_jobs, args.workers, args.threads)
            line[f"speedup{twelve}"] = round(seq["seconds"] / max(together["seconds"], 1e-9), 2)
            line["identical_classifier_files"] = identical_files(sequential_jobs, together_jobs)
            if args.with_threads:
                threaded_jobs = _jobs(make_cfg, run_root, methods, seeds, tmp / "threads")
                line[f"on_threads{twelve}"] = on_threads(threaded_jobs, args.workers, args.threads)
        if not args.smoke and not args.skip_50:
            jobs50 = _jobs(make_cfg, run_root, args.methods_50.split(","),
                           [int(s) for s in args.seeds_50.split(",")], tmp / "together50")
            line["side_by_side_50"] = side_by_side(jobs50, args.workers, args.threads)
        line["epochs"] = sequential_jobs[0][0].classifier.epochs
        blocks = {}
        if seq is not None:
            gflop = training_gflop(sequential_jobs)
            blocks.update({f"one_at_a_time{twelve}": (gflop, seq["seconds"]),
                           f"side_by_side{twelve}": (gflop, together["seconds"])})
            if args.with_threads:
                blocks[f"on_threads{twelve}"] = (gflop, line[f"on_threads{twelve}"]["seconds"])
        if "side_by_side_50" in line:
            blocks["side_by_side_50"] = (training_gflop(jobs50), line["side_by_side_50"]["seconds"])
        line["roofline"] = roof = roofline(blocks, peak_gflops_per_thread(1024 if args.smoke else 2048))
        if seq is not None:
            line[f"best_possible_speedup{twelve}"] = round(
                seq["seconds"] / max(roof[f"one_at_a_time{twelve}"]["bound_seconds"], 1e-9), 2)

    load_end = os.getloadavg()[0]
    line.update({"machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} CPUs",
                 "cpu_count": os.cpu_count(), "load_avg_1m_at_start": round(load, 2),
                 "load_avg_1m_at_end": round(load_end, 2), "torch": torch.__version__})
    if load > 1.5:
        line["note"] = (f"contended CPU: 1-minute load average {load:.2f} at start ({load_end:.2f} at end) on "
                        f"{os.cpu_count()} CPUs; timings move with the load")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
