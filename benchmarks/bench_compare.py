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
