"""The comparison that makes the kit a research tool: one classifier per outlier method and seed on
the same data, evaluated alike, summarised as mean ± std per OOD set.

``python -m ncis_core compare --preset P --out DIR --methods none,idgen,linear,ncis,knn_boundary --seeds 0,1,2``

The methods are those of the registry (:mod:`ncis_core.outliers`). The run folder ``DIR`` holds
stages 1–4 (``compare`` runs whichever of them is missing or stale first, as ``python -m ncis_core
run --stages 1-4`` would; its config is the folder's, see :func:`~ncis_core.config.load_run_config`)
and ``compare`` reuses them: stage
3's method (``sample.method``, ``ncis`` by default) trains on stage 4's ``outliers/``; every other
method with images on the tree ``outliers_<method>/``, which
:func:`~ncis_core.outliers.sources.render_outliers` makes with the same generator settings and seeds
(so image ``n`` of a class starts from the same noise for every method); a method without outliers
(``none``) is the plain cross-entropy baseline. Each (method, seed) trains into
``DIR/compare/<method>/seed<k>/`` with ``classifier.seed = k`` and is skipped when already complete
for the same config; the one (method, seed) that is the run's own stage 5 (same classifier config and
seed, still current) is copied from ``classifier/`` rather than trained again. The trainings of one
architecture run together in vectorised passes (:mod:`ncis_core.stages.train_many`: each model
trains exactly as it would alone; ``compare.max_parallel`` models per pass, 1 for one at a time).
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

from .config import ExperimentConfig, load_run_config, memo_by_content
from .metrics import METRIC_KEYS
from . import outliers as registry
from .outliers.sources import outlier_image_folder, render_outliers
from .progress import bar_options
from .runs import (MissingArtefactError, RunDir, StaleArtefactError, atomic_write_json, atomic_write_text,
                   cache_key, content_hash, write_lock)
from .stages import evaluate as stage6
from .stages import train_classifier as stage5

__all__ = ["pixel_shift", "train_and_evaluate", "aggregate", "stage5_twin", "paired_differences",
           "detectable_difference", "holm", "format_paired", "format_comparison", "compare"]

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
        for name in ("last.json", "last.safetensors"):
            (folder / name).unlink(missing_ok=True)
    atomic_write_json(config, {"fingerprint": fingerprint})


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
                       reuse: Path | None = None, trained: bool = False) -> dict:
    """Train the classifier of ``cfg`` into ``folder`` and evaluate it; skipped when ``folder``
    already holds the results of the same config (resumable: an interrupted training of the same
    config continues; one of another config is discarded).
    ``reuse``: a folder holding this very training (:func:`stage5_twin`), copied instead of trained.
    ``trained``: ``folder`` already holds this training (``compare``'s vectorised pass)."""
    done = _train(cfg, run, folder, progress, reuse, trained, _fingerprint(cfg, run))
    return done if done is not None else _evaluate(cfg, folder, progress)


def _train(cfg: ExperimentConfig, run: RunDir, folder: Path, progress: bool, reuse: Path | None,
           trained: bool, fingerprint: str) -> dict | None:
    """The results when ``folder`` is complete; otherwise its classifier (copied, trained or left
    by a vectorised pass) is made ready for :func:`_evaluate` and None returned."""
    if _complete(folder, fingerprint):
        return json.loads((folder / "results" / "metrics.json").read_text())
    _claim(folder, fingerprint)
    if reuse is not None:
        log.info("compare: reusing the run's stage-5 classifier (%s): the same training", reuse)
        for name in ("best.safetensors", "history.json"):
            shutil.copy2(reuse / name, folder / name)
    elif not trained:
        stage5.train(cfg, run, folder=folder, progress=progress)
    return None


def _evaluate(cfg: ExperimentConfig, folder: Path, progress: bool, splits=None) -> dict:
    """Stage 6 on ``folder``'s classifier into ``folder/results`` (``splits``: the datasets, when
    the caller built them once for many classifiers)."""
    bundle = stage5.load_classifier(folder / "best.safetensors")
    results, raw = stage6.evaluate(cfg, bundle, progress=progress, splits=splits)
    stage6.write_results(folder / "results", results, raw)
    return results


def _evaluate_many(jobs: list[tuple[ExperimentConfig, Path]], progress: bool) -> list[dict]:
    """:func:`_evaluate` for every ``(cfg, folder)`` (one data config), the datasets built once.
    On the CPU the evaluations run side by side on worker threads of one intra-op thread each, as
    ``train_many``'s threaded engine trains (a small network's kernels do not keep two cores busy;
    each evaluation is the same arithmetic whatever thread runs it)."""
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


def _train_together(jobs: list[tuple[ExperimentConfig, RunDir, Path, str]], progress: bool = True) -> set[Path]:
    """Train the not yet complete ``(cfg, run_dir, folder, fingerprint)`` of ``jobs`` in vectorised passes
    (:func:`~ncis_core.stages.train_many.train_many`), as many per pass as ``compare.max_parallel``
    or :func:`~ncis_core.stages.train_many.models_per_pass` allow; the folders it trained. The rest
    (one per pass would be all a pass holds, or the trainings cannot share one) train one at a time
    in :func:`train_and_evaluate`, as before."""
    from .stages import train_many as many

    groups: dict[str, list[tuple]] = {}
    for cfg, run_dir, folder, fingerprint in jobs:
        if not _complete(folder, fingerprint):
            groups.setdefault(many.shared_key(cfg), []).append((cfg, run_dir, folder, fingerprint))
    done: set[Path] = set()
    for group in groups.values():
        size = many.models_per_pass(group[0][0], len(group))
        if size <= 1:
            continue
        for _, _, folder, fingerprint in group:
            _claim(folder, fingerprint)
        log.info("compare: %d trainings of classifier.arch=%s in vectorised passes of up to %d", len(group),
                 group[0][0].classifier.arch, size)
        try:
            many.train_many([(cfg, run_dir, folder) for cfg, run_dir, folder, _ in group], progress,
                            max_parallel=size)
        except many.NotPackable as exc:
            log.info("compare: %s: training them one at a time", exc)
            continue
        done.update(folder for _, _, folder, _ in group)
    return done


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
                diffs = [value(a, name, key) - value(b, name, key) for a, b in pairs
                         if value(a, name, key) is not None and value(b, name, key) is not None]
                if not diffs:
                    continue
                d = np.asarray(diffs, dtype=float)
                mean, n = float(d.mean()), len(d)
                std = float(d.std(ddof=1)) if n > 1 else 0.0
                half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else None
                low, high = (mean - half, mean + half) if half is not None else (None, None)
                better = int(np.sum(d < 0) if key == "fpr95" else np.sum(d > 0))
                p = float(2 * stats.t.sf(abs(mean) / (std / np.sqrt(n)), n - 1)) if n > 1 and std > 0 else None
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
    trained = _train_together([(cfg, run_dir, f, fingerprint_of[f]) for _, _, cfg, run_dir, f, reuse in jobs
                               if reuse is None], progress)
    # the trainings left (none when every one shared a vectorised pass), then the evaluations
    results_of: dict[Path, dict] = {}
    for method, seed, cfg, run_dir, job_folder, reuse in jobs:
        done = _train(cfg, run_dir, job_folder, progress, reuse, job_folder in trained, fingerprint_of[job_folder])
        if done is not None:
            results_of[job_folder] = done
    pending = [(cfg, job_folder) for _, _, cfg, _, job_folder, _ in jobs if job_folder not in results_of]
    seconds["train"] = time.perf_counter() - started
    waiting = {f for _, f in pending}
    trained_now = sum(1 for *_, job_folder, reuse in jobs if job_folder in waiting and reuse is None)
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
