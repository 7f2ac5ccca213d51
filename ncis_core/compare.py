"""The comparison that makes the kit a research tool: one classifier per outlier method and seed on
the same data, evaluated alike, summarised as mean ± std per OOD set.

``python -m ncis_core compare --preset P --out DIR --methods none,idgen,linear,ncis,knn_boundary --seeds 0,1,2``

The methods are those of the registry (:mod:`ncis_core.outliers`). The run folder ``DIR`` holds
stages 1–4 (``compare`` runs whichever of them is missing or stale first, as ``python -m ncis_core
run --stages 1-4`` would; its config is the folder's, see :func:`~ncis_core.config.load_run_config`)
and ``compare`` reuses them: stage
3's method (``sample.method``, ``ncis`` by default) trains on stage 4's ``outliers/``; every other
method with images on the tree ``outliers_<method>/``, which
:func:`render_outliers` makes with the same generator settings and seeds
(so image ``n`` of a class starts from the same noise for every method); a method without outliers
(``none``) is the plain cross-entropy baseline. Each (method, seed) trains into
``DIR/compare/<method>/seed<k>/`` with ``classifier.seed = k`` and is skipped when already complete
for the same config; the one (method, seed) that is the run's own stage 5 (same classifier config and
seed, still current) is copied from ``classifier/`` rather than trained again. Every training is
stage 5's ``train()``; on the CPU they run side by side in worker processes
(``compare.max_parallel``), each the same bytes as alone on as many intra-op threads.
Writes ``DIR/compare/table.md`` and ``table.csv`` (and ``summary.json``; ``times.json``: where the
time went).

Every method trains with the same seeds, and a seed fixes the initialisation and the data order, so
runs with one seed are paired: :func:`paired_differences` compares two methods seed by seed (mean
difference, its 95 % t-interval, wins), which separates methods far better than overlapping
mean ± std columns when the seed moves every method alike.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .checkpoints import delete_training_state, load_classifier
from .config import ExperimentConfig, load_run_config, memo_by_content
from .metrics import METRIC_KEYS
from .outliers import base as registry
from .progress import bar_options
from .runs import (MissingArtefactError, RunDir, StaleArtefactError, atomic_write_json, atomic_write_text,
                   cache_key, content_hash, outlier_image_folder, write_lock)
from .stages import evaluate as stage6
from .stages import generate as stage4
from .stages import sample as stage3
from .stages import train_classifier as stage5

__all__ = ["render_outliers", "pixel_shift", "train_and_evaluate", "side_by_side", "train_side_by_side", "aggregate", "stage5_twin",
           "paired_differences", "detectable_difference", "holm", "format_paired", "format_comparison", "compare"]

log = logging.getLogger(__name__)


@memo_by_content()
def _config_text(cfg: ExperimentConfig) -> str:
    """The config as YAML without its ``compare`` section and ``run.out``: how the trainings run
    (``max_parallel``) and where the folder lies are not what they compute, so changing them (a
    moved or copied run folder) leaves the results current."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    tree.pop("compare", None)
    tree["run"].pop("out", None)
    return OmegaConf.to_yaml(tree)


def _fingerprint(cfg: ExperimentConfig, run: RunDir) -> str:
    """What one (method, seed) result was computed from: the whole config (but ``compare``) and the
    content of the outlier images it trained on (a re-rendered ``outliers_<method>/`` makes the
    result stale)."""
    images = outlier_image_folder(cfg, run)
    return cache_key({"outlier_images": content_hash(images)} if images is not None else {},
                     _config_text(cfg), versions=("torch", "ncis-kit"))


def _complete(folder: Path, fingerprint: str) -> bool:
    """``folder`` holds the evaluated results of the training with ``fingerprint``."""
    config = folder / "config.json"
    return (folder / "results" / "metrics.json").exists() and config.exists() \
        and json.loads(config.read_text())["fingerprint"] == fingerprint


def _claim(folder: Path, fingerprint: str) -> None:
    """Make ``folder`` the place of the training with ``fingerprint``: a partial training of another
    config (its per-epoch checkpoint) is removed, so it is not resumed; one of the same is kept."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.json"
    if config.exists() and json.loads(config.read_text()).get("fingerprint") != fingerprint:
        delete_training_state(folder, "last")
    atomic_write_json(config, {"fingerprint": fingerprint})


def render_outliers(cfg: ExperimentConfig, run: RunDir, name: str, progress: bool = True) -> Path:
    """Method ``name``'s images in ``outliers_<name>/`` (a method other than stage 3's): its outlier
    embeddings by stage 3's sampler (:func:`~ncis_core.stages.sample.method_outlier_embeddings`), the
    images by stage 4 (:func:`~ncis_core.stages.generate.render_method`: skipped when current,
    damaged images redrawn). Returns the folder."""
    embeddings = None
    if registry.get_method(name).produces == registry.EMBEDDINGS:
        def embeddings():
            return stage3.method_outlier_embeddings(cfg, run, name, progress)["outliers"]
    return stage4.render_method(cfg, run, name, embeddings, progress)


def pixel_shift(cfg: ExperimentConfig, run: RunDir, method: str, plain_method: str) -> dict:
    """How far a method's outlier embeddings moved the images: mean squared pixel distance (images in
    [0, 1]) between each outlier image and the plain-prompt image with the same seed
    (``plain_method``'s, e.g. ``outliers_idgen/``), beside the distance between two plain-prompt
    images of one class."""
    from PIL import Image

    folder = outlier_image_folder(cfg, run, method)
    plain = run.path("method_outliers_dir", method=plain_method)
    index = json.loads((plain / "index.json").read_text())["images"]

    def load(path):
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255

    moved = [np.mean((load(folder / im["file"]) - load(plain / im["file"])) ** 2) for im in index]
    by_class: dict[int, list[str]] = {}
    for im in index:
        by_class.setdefault(im["class"], []).append(im["file"])
    between = [np.mean((load(plain / a) - load(plain / b)) ** 2)
               for files in by_class.values() for a, b in zip(files[::2], files[1::2])]
    return {"method": method, "mse_to_plain_same_seed": float(np.mean(moved)),
            "mse_between_plain_images": float(np.mean(between)) if between else None, "images": len(moved)}


def stage5_twin(base: ExperimentConfig, run: RunDir, method: str, seed: int) -> Path | None:
    """The run's own stage-5 folder when it already is the training of (``method``, ``seed``): the
    run's classifier config with that outlier method and seed, its inputs still current
    (``RunDir.require``). ``compare`` copies it instead of training the same network again."""
    c = base.classifier
    if c.outliers != method or (c.seed if c.seed is not None else base.run.seed) != seed:
        return None
    try:
        run.require("classifier_best")
        run.require("classifier_history")
    except (MissingArtefactError, StaleArtefactError):
        return None
    return run.path("classifier_dir")


def train_and_evaluate(cfg: ExperimentConfig, run: RunDir, folder: Path, progress: bool = True,
                       reuse: Path | None = None) -> dict:
    """Train the classifier of ``cfg`` into ``folder`` and evaluate it; skipped when ``folder``
    already holds the results of the same config (resumable: an interrupted training of the same
    config continues; one of another config is discarded).
    ``reuse``: a folder holding this very training (:func:`stage5_twin`), copied instead of trained."""
    done = _prepare(folder, _fingerprint(cfg, run), reuse)
    if done is not None:
        return done
    if reuse is None:
        stage5.train(cfg, run, folder=folder, progress=progress)
    return _evaluate(cfg, folder, progress)


def _prepare(folder: Path, fingerprint: str, reuse: Path | None) -> dict | None:
    """The results when ``folder`` is complete; otherwise None, ``folder`` claimed for the training
    with ``fingerprint`` and, with ``reuse``, that training's classifier copied into it."""
    if _complete(folder, fingerprint):
        return json.loads((folder / "results" / "metrics.json").read_text())
    _claim(folder, fingerprint)
    if reuse is not None:
        log.info("compare: reusing the run's stage-5 classifier (%s): the same training", reuse)
        for name in ("best.safetensors", "history.json"):
            shutil.copy2(reuse / name, folder / name)
    return None


def side_by_side(cfg: ExperimentConfig, count: int) -> int:
    """How many of ``count`` trainings of ``cfg`` :func:`train_side_by_side` runs at once:
    ``compare.max_parallel``, else torch's intra-op thread count on the CPU (by default the cores)
    and 1 on CUDA or MPS; 1 under several ``accelerate`` processes (they train together)."""
    import torch

    from .device import process_state, resolve_device

    state, device = process_state(cfg.run.device)
    if state.num_processes > 1:
        return 1
    limit = cfg.compare.max_parallel
    if limit is None:
        limit = torch.get_num_threads() if device.type == "cpu" else 1
    return max(1, min(limit, count))


def _start_worker(threads: int) -> None:
    """A training process's setup: its intra-op threads; warnings logged (the parent logs progress)."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def train_side_by_side(jobs: list[tuple[ExperimentConfig, RunDir, Path]], progress: bool = True,
                       workers: int | None = None) -> None:
    """Stage 5's :func:`~ncis_core.stages.train_classifier.train` for every ``(cfg, run_dir,
    folder)`` of ``jobs``: one at a time in this process when ``workers`` (default
    :func:`side_by_side`) is 1, else in that many worker processes (spawned) of
    ``torch.get_num_threads() // workers`` intra-op threads each. A training is the same arithmetic
    whichever process runs it, so its files are the bytes ``train()`` writes alone on that many
    threads (``tests/test_compare.py``). Processes, not threads: ``train()`` seeds and draws from
    torch's global generator, which threads would share (README, "The demo's results", has the
    timings). A script that calls this guards its entry point (``if __name__ == "__main__":``), as
    any script that spawns processes must."""
    import torch

    if not jobs:
        return
    workers = min(workers or side_by_side(jobs[0][0], len(jobs)), len(jobs))
    if workers == 1:
        for cfg, run_dir, folder in jobs:
            stage5.train(cfg, run_dir, folder=folder, progress=progress)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, torch.get_num_threads() // workers)
    # the caches the trainings read (decoded outliers, VAE reconstructions), built once here
    sources = {outlier_image_folder(c, r): (c, r) for c, r, _ in jobs}
    for c, r in (job for folder, job in sources.items() if folder is not None):
        stage5.outlier_dataset(c, r)
    if any(folder is not None for folder in sources):
        stage5.id_generated_dataset(*jobs[0][:2], progress)
    log.info("compare: %d trainings, %d side by side in worker processes of %d intra-op thread(s)", len(jobs),
             workers, threads)
    bar = tqdm(total=len(jobs), desc="training classifiers", **bar_options(progress))
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads,))
    try:
        futures = {pool.submit(stage5.train, c, r, folder=f, progress=False): f for c, r, f in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            history = future.result()
            log.info("compare: trained %s (%d of %d): ce %.4f, acc %.3f", futures[future], done, len(jobs),
                     history["epochs"][-1]["ce"], history["epochs"][-1]["train_acc"])
            bar.update()
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()


def _evaluate(cfg: ExperimentConfig, folder: Path, progress: bool, splits=None) -> dict:
    """Stage 6 on ``folder``'s classifier into ``folder/results`` (``splits``: the datasets, when
    the caller built them once for many classifiers)."""
    bundle = load_classifier(folder / "best.safetensors")
    results, raw = stage6.evaluate(cfg, bundle, progress=progress, splits=splits)
    stage6.write_results(folder / "results", results, raw)
    return results


def _evaluate_many(jobs: list[tuple[ExperimentConfig, Path]], progress: bool) -> list[dict]:
    """:func:`_evaluate` for every ``(cfg, folder)`` (one data config), the datasets built once.
    On the CPU the evaluations run side by side on worker threads of one intra-op thread each (a
    small network's kernels do not keep two cores busy; each evaluation is the same arithmetic
    whatever thread runs it; unlike training, evaluation draws no random numbers)."""
    if not jobs:
        return []
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from .data import build_splits
    from .device import intra_op_threads, resolve_device

    splits = stage6.normalised_splits(build_splits(jobs[0][0].data), jobs[0][0])  # normalised once for all
    workers = min(torch.get_num_threads(), len(jobs))
    if workers < 2 or resolve_device(jobs[0][0].run.device).type != "cpu":
        return [_evaluate(cfg, folder, progress, splits) for cfg, folder in jobs]
    log.info("compare: evaluating %d classifiers on %d threads", len(jobs), workers)
    bar = tqdm(total=len(jobs), desc="evaluating classifiers", **bar_options(progress))

    def one(job):
        result = _evaluate(*job, progress=False, splits=splits)
        bar.update()
        return result

    try:
        with intra_op_threads(1), ThreadPoolExecutor(workers, thread_name_prefix="compare-evaluate") as pool:
            return list(pool.map(one, jobs))
    finally:
        bar.close()


def aggregate(per_run: dict[str, list[dict]], score: str) -> list[dict]:
    """Mean ± std (over seeds) of every metric, per method and OOD set (mean rows included).

    Args:
        per_run: method → list of stage-6 results (one per seed).
        score: which score's rows to aggregate.
    """
    rows = []
    for method, results in per_run.items():
        sets = [r["set"] for r in results[0]["rows"] if r["score"] == score]
        roles = {r["set"]: r["role"] for r in results[0]["rows"] if r["score"] == score}
        for name in sets:
            values = {k: [next(r[k] for r in res["rows"] if r["score"] == score and r["set"] == name)
                          for res in results] for k in METRIC_KEYS}
            rows.append({"method": method, "set": name, "role": roles[name], "seeds": len(results),
                         **{f"{k}_mean": float(np.mean(v)) for k, v in values.items()},
                         **{f"{k}_std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
                            for k, v in values.items()}})
        accuracy = [res["id_accuracy"] for res in results]
        rows.append({"method": method, "set": "ID accuracy", "role": "id", "seeds": len(results),
                     "accuracy_mean": float(np.mean(accuracy)),
                     "accuracy_std": float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else 0.0})
    return rows


def paired_differences(per_run: dict[str, list[dict]], score: str, reference: str,
                       sets: tuple[str, ...] = ("mean (near)", "mean (far)", "mean (all)"),
                       metrics: tuple[str, ...] = ("auroc", "fpr95"),
                       methods: tuple[str, ...] | None = None, power: float = 0.8) -> list[dict]:
    """Each method (of ``methods``, default all) minus ``reference``, seed by seed (the i-th result of
    every method has seed i).

    Returns one row per (method, set, metric): ``mean`` and ``std`` of the per-seed differences, the
    95 % two-sided t-interval of the mean (``low``, ``high``; None for one seed), ``p`` (the paired
    two-sided t-test's p-value; None for one seed or no spread), ``better`` (seeds where the method
    beat the reference: higher AUROC/AUPR, lower FPR95) and ``seeds``. ``separated`` is True when the
    interval excludes 0. ``detectable``: the smallest true difference this many seeds with this
    spread would detect with probability ``power`` in a two-sided paired t-test at level 0.05
    (``(t_{0.975} + t_{power}) · std / √n``); :func:`holm` replaces it by the level the table's
    correction demands.
    """
    from scipy import stats

    if reference not in per_run:
        return []

    def value(result, name, key):
        return next((r[key] for r in result["rows"] if r["score"] == score and r["set"] == name), None)

    out = []
    for method, results in per_run.items():
        if method == reference or (methods is not None and method not in methods):
            continue
        pairs = list(zip(results, per_run[reference]))
        for name in sets:
            for key in metrics:
                both = [(value(a, name, key), value(b, name, key)) for a, b in pairs]
                both = np.asarray([ab for ab in both if None not in ab], dtype=float).reshape(-1, 2)
                if not len(both):
                    continue
                d = both[:, 0] - both[:, 1]
                mean, n = float(d.mean()), len(d)
                std = float(d.std(ddof=1)) if n > 1 else 0.0
                low = high = p = None
                if n > 1 and std > 0:
                    test = stats.ttest_rel(both[:, 0], both[:, 1])
                    p, (low, high) = float(test.pvalue), map(float, test.confidence_interval(0.95))
                elif n > 1:  # no spread: the interval is the mean
                    low = high = mean
                better = int(np.sum(d < 0) if key == "fpr95" else np.sum(d > 0))
                out.append({"method": method, "reference": reference, "set": name, "metric": key,
                            "mean": mean, "std": std, "low": low, "high": high, "better": better,
                            "seeds": n, "separated": bool(low is not None and (low > 0 or high < 0)),
                            "p": p, "detectable": detectable_difference(std, n, 0.05, power)})
    return out


def detectable_difference(std: float, seeds: int, alpha: float, power: float = 0.8) -> float | None:
    """The smallest true mean difference a two-sided paired t-test at level ``alpha`` detects with
    probability ``power`` from ``seeds`` pairs whose differences spread by ``std``
    (the usual approximation ``(t_{1-alpha/2} + t_{power}) · std / √seeds``, df = seeds − 1).

    Example (t₀.₉₇₅ = 2.262 and t₀.₈ = 0.883 at df = 9):
        >>> round(detectable_difference(0.02, 10, 0.05), 4)
        0.0199
    """
    from scipy import stats

    if seeds < 2:
        return None
    return float((stats.t.ppf(1 - alpha / 2, seeds - 1) + stats.t.ppf(power, seeds - 1)) * std / np.sqrt(seeds))


def holm(rows: list[dict], alpha: float = 0.05, power: float = 0.8) -> list[dict]:
    """Holm's step-down correction over every row's p-value (the whole table is one family).

    Sets ``holm_p`` (the adjusted p-value, None without one), ``told_apart`` (``holm_p < alpha``) and
    ``detectable`` at the strictest level the correction applies, ``alpha / m`` (m = rows with a
    p-value): a difference smaller than that could pass unnoticed even in the best case.

    Example:
        >>> [r["holm_p"] for r in holm([{"p": 0.01}, {"p": 0.04}, {"p": 0.03}])]
        [0.03, 0.06, 0.06]
    """
    tested = sorted((i for i, r in enumerate(rows) if r.get("p") is not None), key=lambda i: rows[i]["p"])
    m = len(tested)
    out = [dict(r, holm_p=None, told_apart=False) for r in rows]
    running = 0.0
    for rank, i in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * rows[i]["p"]))
        out[i]["holm_p"] = running
        out[i]["told_apart"] = running < alpha
    for r in out:
        if m and r.get("seeds", 0) > 1:
            r["detectable"] = detectable_difference(r["std"], r["seeds"], alpha / m, power)
    return out


_METRIC_LABELS = {"fpr95": "FPR95 ↓", "auroc": "AUROC ↑", "aupr_in": "AUPR-In ↑", "aupr_out": "AUPR-Out ↑"}


def format_paired(paired: list[dict]) -> str:
    """Markdown for :func:`paired_differences` rows (after :func:`holm` when they carry ``holm_p``):
    difference in points, 95 % interval, wins, the Holm-adjusted verdict and the detectable difference."""
    if not paired:
        return ""
    corrected = "holm_p" in paired[0]
    m = sum(1 for r in paired if r.get("p") is not None)
    out = []
    for reference in dict.fromkeys(r["reference"] for r in paired):
        rows = [r for r in paired if r["reference"] == reference]
        out += [f"### Paired by seed: method − {reference}", ""]
        if corrected:
            out += [f"Per seed, the method's metric minus {reference}'s (same seed: same initialisation and "
                    "data order), in points; the 95 % t-interval of the mean difference (not adjusted); "
                    "seeds where the method did better; **told apart** = the paired t-test's p-value after "
                    f"Holm's correction over all {m} tests of this table is below 0.05; **detectable** = the "
                    f"smallest true difference these seeds would detect with 80 % power at Holm's strictest "
                    f"level (0.05 / {m}), from the observed spread.", "",
                    "| set | metric | method | difference | 95 % interval | better in | Holm p | told apart "
                    "| detectable |", "|---|---|---|---:|---:|---:|---:|:---:|---:|"]
        else:
            out += [f"Per seed, the method's metric minus {reference}'s (same seed: same initialisation and "
                    "data order), in points; the 95 % t-interval of the mean difference; seeds where the "
                    f"method did better. **yes** = the interval excludes 0. These are {len(rows)} intervals: "
                    f"at 95 % about {0.05 * len(rows):.1f} of them exclude 0 by chance alone, so read a lone "
                    "**yes** as a lead to test with more seeds, not as a result.", "",
                    "| set | metric | method | difference | 95 % interval | better in | told apart |",
                    "|---|---|---|---:|---:|---:|:---:|"]
        for row in rows:
            interval = (f"[{100 * row['low']:+.1f}, {100 * row['high']:+.1f}]" if row["low"] is not None else "—")
            line = (f"| {row['set']} | {_METRIC_LABELS.get(row['metric'], row['metric'])} | "
                    f"{row['method']} | {100 * row['mean']:+.1f} ± {100 * row['std']:.1f} | {interval} | "
                    f"{row['better']}/{row['seeds']} |")
            if corrected:
                p = f"{row['holm_p']:.3f}" if row["holm_p"] is not None else "—"
                detect = f"{100 * row['detectable']:.1f}" if row.get("detectable") is not None else "—"
                line += f" {p} | {'**yes**' if row['told_apart'] else 'no'} | {detect} |"
            else:
                line += f" {'yes' if row['separated'] else 'no'} |"
            out.append(line)
        out.append("")
    return "\n".join(out)


def format_comparison(rows: list[dict], convention: str, score: str, extra: str = "") -> str:
    """Markdown: near-OOD, far-OOD and the overall mean in separate blocks, mean ± std in percent."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    seeds = max(r["seeds"] for r in rows)
    out = [f"Score: **{score}**. Positive class: {convention}. Mean ± std over {seeds} seed(s), in %.", ""]

    def cell(row, key):
        return f"{100 * row[f'{key}_mean']:.1f} ± {100 * row[f'{key}_std']:.1f}"

    for title, keep in [("Near-OOD", lambda r: r["role"] == "ood-near" or r["set"] == "mean (near)"),
                        ("Far-OOD", lambda r: r["role"] == "ood-far" or r["set"] == "mean (far)"),
                        ("All OOD sets", lambda r: r["set"] == "mean (all)")]:
        chosen = [r for r in rows if keep(r)]
        if not chosen:
            continue
        out += [f"### {title}", "", "| OOD set | method | FPR95 ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |",
                "|---|---|---:|---:|---:|---:|"]
        for name in dict.fromkeys(r["set"] for r in chosen):
            for method in methods:
                row = next((r for r in chosen if r["set"] == name and r["method"] == method), None)
                if row:
                    label = f"**{name}**" if name.startswith("mean") else name
                    out.append(f"| {label} | {method} | " + " | ".join(cell(row, k) for k in METRIC_KEYS) + " |")
        out.append("")
    out += ["### ID accuracy", "", "| method | accuracy |", "|---|---:|"]
    out += [f"| {r['method']} | {100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} |"
            for r in rows if r["set"] == "ID accuracy"]
    return "\n".join(out) + "\n" + (f"\n{extra}\n" if extra else "")


def _csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def compare(preset: str, out: str | Path, methods: list[str], seeds: list[int],
            overrides: list[str] | tuple[str, ...] = (), progress: bool = True) -> dict:
    """Train and evaluate every (method, seed); write ``compare/table.md`` and ``table.csv``.

    Returns:
        ``{"rows": aggregated rows, "per_run": method → results per seed}``.
    """
    known = registry.method_names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; use some of {', '.join(known)}")
    if not seeds:
        raise ValueError("compare needs at least one seed")
    base = load_run_config(preset, list(overrides), out=str(out))
    with write_lock(base.run.out, f"compare --methods {','.join(methods)} --seeds {','.join(map(str, seeds))}"):
        return _compare(base, preset, out, methods, seeds, overrides, progress)


def _compare(base: ExperimentConfig, preset: str, out, methods: list[str], seeds: list[int], overrides,
             progress: bool) -> dict:
    run = RunDir.create(base)
    with_outliers = any(registry.get_method(m).produces != registry.NOTHING for m in methods)
    behind = [name for name in ("embed", "cvpn", "sample", "generate")
              if with_outliers and run.stage_state(name).state != "current"]
    if behind:
        from .runner import run_series

        log.info("compare: stage(s) %s of %s are missing or stale: running stages 1-4 first (as `python -m "
                 "ncis_core run --stages 1-4`; resumable)", ", ".join(behind), run.root)
        run_series(preset, out, list(overrides), stages="1-4", progress=progress)
        run = RunDir.open(run.root)
    folder = run.path("compare_dir")
    jobs = []
    clock = time.perf_counter()
    for method in methods:
        produces = registry.get_method(method).produces
        if produces != registry.NOTHING and not (produces == registry.EMBEDDINGS
                                                 and method == base.sample.method):
            render_outliers(base, run, method, progress=progress)
    seconds = {"render": time.perf_counter() - clock}
    for method in methods:
        for seed in seeds:
            cfg = load_run_config(preset, [*overrides, f"classifier.outliers={method}", f"classifier.seed={seed}"],
                                  out=str(out))
            jobs.append((method, seed, cfg, RunDir(run.root, cfg), folder / method / f"seed{seed}",
                         stage5_twin(base, run, method, seed)))
    # what each result is computed from, once per job (it hashes the config and the outlier images)
    fingerprint_of = {job_folder: _fingerprint(cfg, run_dir) for _, _, cfg, run_dir, job_folder, _ in jobs}
    started = time.perf_counter()
    results_of: dict[Path, dict] = {}
    to_train = []
    for method, seed, cfg, run_dir, job_folder, reuse in jobs:
        done = _prepare(job_folder, fingerprint_of[job_folder], reuse)
        if done is not None:
            results_of[job_folder] = done
        elif reuse is None:
            to_train.append((cfg, run_dir, job_folder))
    train_side_by_side(to_train, progress)
    pending = [(cfg, job_folder) for _, _, cfg, _, job_folder, _ in jobs if job_folder not in results_of]
    seconds["train"] = time.perf_counter() - started
    trained_now = len(to_train)
    started = time.perf_counter()
    results_of.update(zip([f for _, f in pending], _evaluate_many(pending, progress)))
    seconds["evaluate"] = time.perf_counter() - started
    per_run: dict[str, list[dict]] = {}
    for method, seed, cfg, run_dir, job_folder, reuse in jobs:
        per_run.setdefault(method, []).append(results_of[job_folder])
    score = base.evaluate.score
    rows = aggregate(per_run, score)
    convention = next(iter(per_run.values()))[0]["convention"]
    shifts = []
    plain = registry.method_names(registry.PROMPT_IMAGES)
    if plain and (run.path("method_outliers_dir", method=plain[0]) / "index.json").exists():
        shifts = [pixel_shift(base, run, m, plain[0]) for m in methods
                  if registry.get_method(m).produces == registry.EMBEDDINGS]
    extra = ""
    if shifts:
        extra = "### How far the outlier embeddings moved the images\n\n" + \
                "Mean squared pixel distance (images in [0, 1]) to the plain-prompt image with the same seed, " \
                "beside the distance between two plain-prompt images of one class.\n\n" + \
                "| method | to plain, same seed | between two plain images |\n|---|---:|---:|\n" + \
                "".join(f"| {s['method']} | {s['mse_to_plain_same_seed']:.4f} | "
                        f"{s['mse_between_plain_images']:.4f} |\n" for s in shifts)
    # the null NCIS must beat: plain-prompt images as outliers (idgen: generated images, no boundary
    # sampling); without one, a method without outliers (the plain energy baseline)
    reference = next((m for kind in (registry.PROMPT_IMAGES, registry.NOTHING) for m in per_run
                      if registry.get_method(m).produces == kind), methods[0])
    paired = []
    if len(per_run) > 1:
        # every method against the null, and stage 3's method against the other samplers of
        # embeddings (the ablations the paper is about: ncis − linear, ncis − knn_boundary)
        paired = paired_differences(per_run, score, reference)
        own = base.sample.method
        if own in per_run:
            for other in registry.method_names(registry.EMBEDDINGS):
                if other != own and other in per_run and other != reference:
                    paired += paired_differences(per_run, score, other, methods=(own,))
        paired = holm(paired)
    if paired:
        extra = format_paired(paired) + ("\n" + extra if extra else "")
    atomic_write_text(folder / "table.md", format_comparison(rows, convention, score, extra))
    atomic_write_text(folder / "table.csv", _csv(rows))
    # the per-seed numbers behind every mean and difference (the score's mean rows and ID accuracy)
    per_seed = {method: [{"seed": seed, "id_accuracy": res["id_accuracy"],
                          **{f"{r['set']}/{k}": r[k] for r in res["rows"]
                             if r["score"] == score and r["set"].startswith("mean") for k in METRIC_KEYS}}
                         for seed, res in zip(seeds, results)] for method, results in per_run.items()}
    atomic_write_json(folder / "summary.json", {"methods": methods, "seeds": seeds, "score": score, "rows": rows,
                                                "paired": paired, "per_seed": per_seed, "pixel_shift": shifts})
    # where the time went, apart from the results (which are the same bytes on every run)
    seconds["total"] = time.perf_counter() - clock
    atomic_write_json(folder / "times.json", {**{k: round(v, 1) for k, v in seconds.items()},
                                              "trainings": trained_now, "evaluations": len(pending)})
    log.info("compare: %.0f s (rendering the methods' images %.0f s, training %d classifiers %.0f s, "
             "evaluating %d %.0f s): %s", seconds["total"], seconds["render"], trained_now, seconds["train"],
             len(pending), seconds["evaluate"], folder / "table.md")
    return {"rows": rows, "per_run": per_run, "paired": paired, "pixel_shift": shifts}
