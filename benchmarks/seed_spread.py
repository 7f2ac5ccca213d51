"""How the seed-to-seed spread of ``compare``'s numbers depends on the classifier's training length,
and what that does to the comparison's power per second of training. Prints one JSON line.

For each ``classifier.epochs`` of ``--epochs`` it runs ``compare`` (``--methods`` × ``--seeds``) on
its own copy of the run folder ``--run`` (stages 1-4 done; only them are copied, so ``--run`` is
left untouched) under ``--work`` (a copy already there is resumed: ``compare`` skips its finished
trainings, and their time is then the one given by ``--seconds``; ``--read-only`` reads the
results a finished study left there without running anything). Per training length it reports:

* per method and set (``mean (near)``, ``mean (far)``, ``mean (all)``): the AUROC's mean and its
  standard deviation over seeds (%), and the ID accuracy's;
* per method against the first of ``--methods`` (the reference), seed by seed: the mean and the
  standard deviation of the paired AUROC differences, and the smallest difference a paired t-test
  at level 0.05 detects with 80 % power from ``--plan-seeds`` seeds with that spread
  (``detectable_at_plan_seeds``, :func:`ncis_core.compare.detectable_difference`);
* ``seconds_per_training``: ``compare``'s wall time divided by its trainings (the trainings run side by
  side; evaluation included, rendering excluded — the copies share it);
* ``efficiency``: ``std of the paired difference × √(seconds per training)``. At a fixed budget of
  training time the seeds one can afford go as 1/seconds, so the detectable difference goes as this
  product: the training length with the smallest one gives the best-powered comparison per second.

A spread from 5 seeds is itself uncertain (its 95 % interval spans about 0.6× to 2.9× the estimate),
so nearby values do not rank the lengths; the script says so in ``note``.

Usage: ``python benchmarks/seed_spread.py --run outputs/demo --work /tmp/spread --epochs 4,8,16
--methods none,ncis --seeds 0,1,2,3,4``. ``--smoke``: the smoke preset on a smoke run folder
(``--run``, or built here in half a minute), epochs 1 and 2, ``none`` and ``ncis`` × 2 seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from ncis_core.compare import compare, detectable_difference, paired_differences  # noqa: E402
from ncis_core.config import load_run_config  # noqa: E402

log = logging.getLogger("seed_spread")

SETS = ("mean (near)", "mean (far)", "mean (all)")
# what a copy needs: stages 0-4 and the run's bookkeeping (classifier/, compare/, results/ and the
# executed notebooks are what the copies compute or do not need)
SKIP = {"classifier", "compare", "results", "notebooks", "figures", "logs"}


def copy_stages_1_to_4(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=lambda folder, names: [n for n in names if Path(folder) == source
                                                                   and n in SKIP])


def auroc(results: dict, name: str, score: str) -> float:
    return next(r["auroc"] for r in results["rows"] if r["set"] == name and r["score"] == score)


def spread(per_run: dict[str, list[dict]], methods: list[str], score: str, plan_seeds: int) -> dict:
    """The AUROC (of ``score``) spread per method and the paired spread against ``methods[0]``, in %."""
    out = {"methods": {}, "paired": {}}
    for method in methods:
        out["methods"][method] = {}
        for name in SETS:
            values = 100 * np.array([auroc(res, name, score) for res in per_run[method]])
            out["methods"][method][name] = {"auroc_mean": round(float(values.mean()), 2),
                                            "auroc_std": round(float(values.std(ddof=1)), 2)}
        accuracy = 100 * np.array([res["id_accuracy"] for res in per_run[method]])
        out["methods"][method]["id_accuracy"] = {"mean": round(float(accuracy.mean()), 2),
                                                 "std": round(float(accuracy.std(ddof=1)), 2)}
    # the seed-by-seed differences of compare's own paired table; only the detectable difference is
    # given for --plan-seeds rather than for the seeds run
    for row in paired_differences(per_run, score, methods[0], sets=SETS, metrics=("auroc",)):
        std = 100 * row["std"]
        out["paired"].setdefault(f"{row['method']} - {methods[0]}", {})[row["set"]] = {
            "mean": round(100 * row["mean"], 2), "std": round(std, 2),
            "detectable_at_plan_seeds": round(detectable_difference(std, plan_seeds, 0.05), 2)}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run folder with stages 1-4 done (default: outputs/<preset>)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--work", help="where the copies go (default: a temporary folder, removed)")
    parser.add_argument("--epochs", default="4,8,16")
    parser.add_argument("--methods", default="none,ncis", help="the first is the paired reference")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--plan-seeds", type=int, default=10,
                        help="the seeds the detectable difference is given for (default: make demo's 10)")
    parser.add_argument("--seconds", type=lambda text: {int(k): float(v) for k, v in
                                                       (item.split("=") for item in text.split(","))},
                        default={}, help="for resumed copies: the wall seconds their compare took, as "
                                         "EPOCHS=SECONDS,... (e.g. 4=144,8=297)")
    parser.add_argument("--read-only", action="store_true",
                        help="read the results a finished study left in --work instead of running compare")
    parser.add_argument("--smoke", action="store_true", help="smoke preset, epochs 1,2, none/ncis x 2 seeds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.smoke:
        args.preset, args.epochs, args.seeds = "smoke", "1,2", "0,1"
    methods = args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(methods) < 2 or len(seeds) < 2:
        parser.error("the spread needs at least two methods and two seeds")
    load = os.getloadavg()[0]
    line = {"benchmark": "seed_spread", "smoke": args.smoke, "preset": args.preset, "methods": methods,
            "seeds": seeds, "plan_seeds": args.plan_seeds, "by_epochs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        source = Path(args.run) if args.run else None
        if source is None and args.smoke:
            sys.path.insert(0, str(ROOT / "tests"))
            from diffusion_fixtures import build_smoke_run

            source = build_smoke_run(Path(tmp) / "source")
        source = (source or Path("outputs") / args.preset).resolve()
        for epochs in [int(e) for e in args.epochs.split(",")]:
            folder = work / f"epochs{epochs}"
            if not folder.exists():
                copy_stages_1_to_4(source, folder)
            resumed = sum((folder / "compare" / m / f"seed{seed}" / "results" / "metrics.json").exists()
                          for m in methods for seed in seeds)
            t0 = time.perf_counter()
            if args.read_only:
                per_run = {m: [json.loads((folder / "compare" / m / f"seed{seed}" / "results" / "metrics.json")
                                          .read_text()) for seed in seeds] for m in methods}
            else:
                per_run = compare(args.preset, folder, methods, seeds, [f"classifier.epochs={epochs}"],
                                  progress=False)["per_run"]
            seconds = time.perf_counter() - t0
            score = load_run_config(args.preset, out=str(folder)).evaluate.score
            entry = spread(per_run, methods, score, args.plan_seeds)
            if resumed or args.read_only:  # results of an earlier run: their time is not in this one
                entry["resumed_trainings"] = resumed
                seconds = args.seconds.get(epochs)
            entry["seconds"] = round(seconds, 1) if seconds is not None else None
            per_training = seconds / (len(methods) * len(seeds)) if seconds is not None else None
            entry["seconds_per_training"] = round(per_training, 2) if per_training is not None else None
            for rows in entry["paired"].values():
                for row in rows.values():
                    row["efficiency"] = round(row["std"] * per_training ** 0.5, 2) if per_training else None
            line["by_epochs"][str(epochs)] = entry
            log.info("epochs %d: %s s, paired std %s", epochs, entry["seconds"],
                     {k: {s: r["std"] for s, r in v.items()} for k, v in entry["paired"].items()})
    line.update({"note": "a standard deviation from n seeds has a 95 % interval of about "
                         f"{_chi_interval(len(seeds))} times itself: only clear differences rank the lengths",
                 "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} CPUs",
                 "load_avg_1m_at_start": round(load, 2), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)})
    print(json.dumps(line))


def _chi_interval(n: int) -> str:
    """The 95 % interval of σ/s from n samples (chi-square with n − 1 degrees of freedom)."""
    from scipy import stats

    low, high = (np.sqrt((n - 1) / stats.chi2.ppf(q, n - 1)) for q in (0.975, 0.025))
    return f"{low:.2f}-{high:.2f}"


if __name__ == "__main__":
    main()
