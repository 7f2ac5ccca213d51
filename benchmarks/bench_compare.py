"""``compare``'s classifier trainings: one at a time (``train()``, as ``compare`` ran them) against
vectorised passes (:func:`ncis_core.stages.train_many.train_many`). Prints one JSON line.

Full (default): the demo run folder ``--run`` (stages 1-4 done; default ``outputs/demo``). The 12
trainings of ``make demo``'s compare (``none, idgen, linear, ncis`` × seeds ``0, 1, 2``) one at a
time, then the same 12 vectorised, then 50 (those methods and ``knn_boundary`` × seeds ``0-9``)
vectorised. Missing renders of the methods' outlier images are made first (compare's
``render_outliers``, not timed). Trainings write into a temporary folder; the run folder only gains
caches (decoded outliers, VAE reconstructions) and renders.

Reported: wall seconds of each block (setup included: datasets, loaders, initialisation, files),
``speedup_12`` (one at a time ÷ vectorised), ``ratio_50_vectorised_to_12_one_at_a_time``, per pass
the models, steps, seconds and the share of the pass spent waiting for batches
(``data_wait_share``), the torch threads each side used, how many of the 12 classifier files are
byte-identical between the two (all of them when both sides run their kernels on the same number
of intra-op threads: ``--sequential-threads 1``), and the 1-minute load average at start and end
(the machine is shared: timings move with the load).

The roofline (``roofline``): what the machine allows at best. ``peak_gflops_per_thread`` is a
measured float32 matrix product (2048², one intra-op thread, best of 5: the fastest arithmetic this
CPU does); each block's ``training_gflop`` counts the classifiers' arithmetic (FLOPs of a training
step per image, :func:`ncis_core.flops.classifier_flops`, × images per step × steps), and
``bound_seconds`` is that arithmetic on every core at that peak with nothing else costing anything
(no BatchNorm, pooling, data or optimizer). ``best_possible_speedup_12`` = one at a time ÷ the
bound of the 12: no engine can beat it on this machine; ``share_of_peak`` = bound ÷ measured.

``--smoke``: the smoke preset and a folder of random PNGs as the outlier source (no run folder
needed): ``none`` and ``folder`` × 2 seeds, one smoke epoch, both ways; seconds on 2 CPU cores.

Usage: ``python benchmarks/bench_compare.py [--run outputs/demo] [--epochs N] [--skip-50]``.
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
from ncis_core.config import load_config, load_run_config  # noqa: E402
from ncis_core.device import intra_op_threads  # noqa: E402
from ncis_core.runs import RunDir  # noqa: E402
from ncis_core.stages import train_classifier as stage5  # noqa: E402
from ncis_core.stages import train_many as many  # noqa: E402

log = logging.getLogger("bench_compare")


def _jobs(make_cfg, run_root: Path, methods: list[str], seeds: list[int], out: Path):
    jobs = []
    for method in methods:
        for seed in seeds:
            cfg = make_cfg(method, seed)
            jobs.append((cfg, RunDir(run_root, cfg), out / method / f"seed{seed}"))
    return jobs


def one_at_a_time(jobs, threads: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = []
        for cfg, run_dir, folder in jobs:
            t0 = time.perf_counter()
            stage5.train(cfg, run_dir, folder=folder, progress=False)
            seconds.append(time.perf_counter() - t0)
            log.info("one at a time: %s seed %s in %.1f s", cfg.classifier.outliers, cfg.classifier.seed,
                     seconds[-1])
    finally:
        torch.set_num_threads(previous)
    return {"trainings": len(jobs), "seconds": round(sum(seconds), 2),
            "seconds_per_training": [round(s, 2) for s in seconds], "torch_threads": threads}


def vectorised(jobs, threads: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        size = many.models_per_pass(jobs[0][0], len(jobs))
        t0 = time.perf_counter()
        many.train_many(jobs, progress=False, max_parallel=size)
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)
    passes = [{**p, "wall_s": round(p["wall_s"], 2), "data_wait_s": round(p["data_wait_s"], 2),
               "data_wait_share": round(p["data_wait_s"] / max(p["wall_s"], 1e-9), 4)} for p in many.PASS_STATS]
    wall = sum(p["wall_s"] for p in many.PASS_STATS)
    wait = sum(p["data_wait_s"] for p in many.PASS_STATS)
    log.info("vectorised: %d trainings in %.1f s (%d passes)", len(jobs), seconds, len(passes))
    return {"trainings": len(jobs), "seconds": round(seconds, 2), "max_parallel": size, "torch_threads": threads,
            "passes": passes, "data_wait_share": round(wait / max(wall, 1e-9), 4)}


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
    from ncis_core.outliers.sources import render_outliers

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
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the vectorised passes (default: torch's, %(default)s)")
    parser.add_argument("--sequential-threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the one-at-a-time trainings (default: torch's, as compare "
                             "ran them, %(default)s)")
    parser.add_argument("--skip-50", action="store_true", help="leave out the 50 trainings")
    parser.add_argument("--skip-12", action="store_true", help="only the 50 trainings (vectorised)")
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

        sequential_jobs = _jobs(make_cfg, run_root, methods, seeds, tmp / "one")
        vectorised_jobs = _jobs(make_cfg, run_root, methods, seeds, tmp / "many")
        # caches (decoded outliers, VAE reconstructions) built before either side is timed
        stage5.train(*sequential_jobs[-1][:2], folder=tmp / "warm", progress=False, stop_after_steps=1)
        seq = None
        if args.smoke or not args.skip_12:
            line["one_at_a_time_12" if not args.smoke else "one_at_a_time"] = seq = one_at_a_time(
                sequential_jobs, args.sequential_threads)
            line["vectorised_12" if not args.smoke else "vectorised"] = vec = vectorised(vectorised_jobs,
                                                                                          args.threads)
            line["speedup_12" if not args.smoke else "speedup"] = round(seq["seconds"] / max(vec["seconds"], 1e-9),
                                                                        2)
            line["identical_classifier_files"] = identical_files(sequential_jobs, vectorised_jobs)
        if not args.smoke and not args.skip_50:
            jobs50 = _jobs(make_cfg, run_root, args.methods_50.split(","),
                           [int(s) for s in args.seeds_50.split(",")], tmp / "many50")
            line["vectorised_50"] = v50 = vectorised(jobs50, args.threads)
            if seq is not None:
                line["ratio_50_vectorised_to_12_one_at_a_time"] = round(v50["seconds"] / seq["seconds"], 3)
        line["epochs"] = sequential_jobs[0][0].classifier.epochs
        blocks, twelve = {}, "" if args.smoke else "_12"
        if seq is not None:
            gflop = training_gflop(sequential_jobs)
            blocks.update({f"one_at_a_time{twelve}": (gflop, seq["seconds"]),
                           f"vectorised{twelve}": (gflop, vec["seconds"])})
        if "vectorised_50" in line:
            blocks["vectorised_50"] = (training_gflop(jobs50), line["vectorised_50"]["seconds"])
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
