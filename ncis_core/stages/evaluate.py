"""Stage 6: score ID test and every OOD set, compute FPR95 / AUROC / AUPR per set, write the tables.

Every score of ``evaluate.score`` / ``extra_scores`` on every set, with near / far / all mean rows;
writes ``results/metrics.json``, ``metrics.csv``, ``table.md`` and the raw ``scores.npz``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..progress import bar_options
from ..config import ExperimentConfig
from ..data import build_splits, get_split
from ..data.base import Split
from ..data.transforms import Compose, Normalize, ToTensor
from ..device import resolve_device
from ..metrics import CONVENTIONS, METRIC_KEYS, mean_row, ood_metrics
from ..checkpoints import ClassifierBundle, load_classifier
from ..models.resnet import MEMORY_FORMAT
from ..runs import STAGES, RunDir, atomic_path, atomic_write_json, atomic_write_text
from ..scores.base import Score, build_score, score_arguments, score_class

__all__ = ["score_split", "energy_sign", "same_size_batches", "build_scores", "evaluate", "format_table", "run", "NormalisedImages",
           "normalised_splits"]

log = logging.getLogger(__name__)


class _Normalised(torch.utils.data.Dataset):
    """A split's images (after its own evaluation transform) as normalised tensors."""

    def __init__(self, split: Split, cfg: ExperimentConfig):
        self.dataset = split.dataset
        self.to_tensor = Compose([ToTensor(), Normalize(cfg.classifier.mean, cfg.classifier.std)])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        image, label = self.dataset[i]
        return self.to_tensor(image), label


class NormalisedImages:
    """A split's images normalised once into one ``N × C × H × W`` tensor, for many evaluations."""

    def __init__(self, split: Split, cfg: ExperimentConfig):
        loader = DataLoader(_Normalised(split, cfg), batch_size=cfg.evaluate.batch_size, shuffle=False,
                            num_workers=cfg.classifier.num_workers)
        parts = list(loader)
        self.images = torch.cat([x for x, _ in parts]) if parts else torch.empty(0)
        self.labels = torch.cat([y for _, y in parts]) if parts else torch.empty(0, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.images[lo:lo + batch_size], self.labels[lo:lo + batch_size])
                for lo in range(0, len(self), batch_size)]


# the most bytes of normalised images `normalised_splits` keeps in memory
NORMALISED_CACHE_MAX_BYTES = 2 << 30


def normalised_splits(splits: list[Split], cfg: ExperimentConfig) -> list[Split]:
    """``splits`` as :class:`NormalisedImages` (unchanged above the memory cap or for mixed sizes)."""
    pixels = sum(len(s.dataset) for s in splits) * 3 * cfg.data.image_size ** 2
    if pixels * 4 > NORMALISED_CACHE_MAX_BYTES:
        return splits
    return [s if _mixed_sizes(s) else dataclasses.replace(s, dataset=NormalisedImages(s, cfg)) for s in splits]


def _mixed_sizes(split: Split) -> bool:
    return len(set(getattr(split.dataset, "sizes", ()))) > 1


def same_size_batches(sizes: list, batch_size: int) -> list[list[int]]:
    """Indices in order, cut into batches of at most ``batch_size`` wherever the size changes.

        >>> same_size_batches([(32, 32), (32, 32), (36, 36), (32, 32)], 3)
        [[0, 1], [2], [3]]
    """
    batches: list[list[int]] = []
    for i, size in enumerate(sizes):
        if batches and len(batches[-1]) < batch_size and sizes[batches[-1][0]] == size:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _loader(split: Split, cfg: ExperimentConfig):
    if isinstance(split.dataset, NormalisedImages):
        return split.dataset.batches(cfg.evaluate.batch_size)
    if _mixed_sizes(split):  # an as-is set (data.as_is_sets) with images of several sizes
        return DataLoader(_Normalised(split, cfg), num_workers=cfg.classifier.num_workers,
                          batch_sampler=same_size_batches(split.dataset.sizes, cfg.evaluate.batch_size))
    return DataLoader(_Normalised(split, cfg), batch_size=cfg.evaluate.batch_size, shuffle=False,
                      num_workers=cfg.classifier.num_workers)


class _OnDevice:
    """A loader's batches with the images moved to ``device``; iterable more than once."""

    def __init__(self, loader: DataLoader, device: torch.device, desc: str, progress: bool):
        self.loader, self.device, self.desc, self.progress = loader, device, desc, progress

    def __iter__(self):
        for images, labels in tqdm(self.loader, desc=self.desc, leave=False, **bar_options(self.progress)):
            yield images.to(self.device).contiguous(memory_format=MEMORY_FORMAT), labels


class _OneForwardPerBatch:
    """``model`` with one gradient-free forward pass per batch (:meth:`start`), shared by all scores.

    Calls on another tensor (ODIN's perturbed input) or with gradients run the network itself.
    """

    def __init__(self, model: torch.nn.Module):
        self.model, self._images, self._outputs = model, None, None

    def start(self, images: torch.Tensor) -> torch.Tensor:
        self._images, self._outputs = images, None
        return images

    def __call__(self, images: torch.Tensor, return_features: bool = False):
        if images is not self._images or torch.is_grad_enabled():
            return self.model(images, return_features=return_features)
        if self._outputs is None:
            self._outputs = self.model(images, return_features=True)
        return self._outputs if return_features else self._outputs[0]

    def __getattr__(self, name):
        return getattr(self.model, name)


def score_split(model: torch.nn.Module, score_fn, split: Split, cfg: ExperimentConfig,
                device: torch.device, progress: bool = True) -> np.ndarray:
    """Scores (higher = more ID) of every image of ``split``, in order, as float64."""
    return _score_batches(model, {score_fn.name: score_fn}, split, cfg, device, progress)[0][score_fn.name]


def _score_batches(model: torch.nn.Module | None, scores: dict, split: Split, cfg: ExperimentConfig,
                   device: torch.device, progress: bool) -> tuple[dict[str, np.ndarray], float | None]:
    """``({name: float64 scores}, top-1 accuracy)`` on ``split``, one forward pass per batch."""
    shared = _OneForwardPerBatch(model) if model is not None else None
    out: dict[str, list] = {name: [] for name in scores}
    correct = total = 0
    for images, labels in tqdm(_loader(split, cfg), desc=f"{', '.join(scores)} · {split.name}", leave=False,
                               **bar_options(progress)):
        images = images.to(device).contiguous(memory_format=MEMORY_FORMAT)
        if shared is not None:
            shared.start(images)
        for name, score_fn in scores.items():
            out[name].append(score_fn(shared, images).double().cpu())
        if shared is not None:
            with torch.no_grad():
                correct += (shared(images).argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    accuracy = correct / max(total, 1) if shared is not None else None
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}, accuracy


def energy_sign(rule: str, slope: float | None) -> tuple[float, str]:
    """The sign the energy score is multiplied by, and where it came from (``evaluate.energy_sign``).

        >>> energy_sign("auto", None)
        (1.0, 'no energy head in the checkpoint: +logsumexp (the original rule)')
    """
    if rule == "positive":
        return 1.0, "evaluate.energy_sign=positive"
    if rule == "negative":
        return -1.0, "evaluate.energy_sign=negative"
    if rule != "auto":
        raise ValueError(f"evaluate.energy_sign={rule!r} is not one of auto, positive, negative")
    if slope is None:
        return 1.0, "no energy head in the checkpoint: +logsumexp (the original rule)"
    if slope < 0:
        log.warning("the energy head's slope is negative (%.3g): scoring with −logsumexp "
                    "(evaluate.energy_sign=positive keeps +logsumexp)", slope)
        return -1.0, f"the saved energy head's slope ({slope:.3g} < 0)"
    return 1.0, f"the saved energy head's slope ({slope:.3g} ≥ 0)"


def build_scores(cfg: ExperimentConfig, sign: float) -> dict[str, Score]:
    """The run's scores by name, main first, with their ``score_args`` and stage 6's ``sign``."""
    e = cfg.evaluate
    from_stage = {"sign": sign}
    scores = {}
    for name in dict.fromkeys([e.score, *e.extra_scores]):
        cls = score_class(name)
        missing = [a for a in cls.stage_args if a not in from_stage]
        if missing:
            raise ValueError(f"score {name!r} asks stage 6 for {missing}; it supplies {', '.join(from_stage)}")
        # score_arguments refuses a stage argument in the config: evaluate.energy_sign decides the sign
        scores[name] = build_score(name, **score_arguments(name, e.score_args.get(name)),
                                   **{a: from_stage[a] for a in cls.stage_args})
    return scores


def _mean_rows(rows: list[dict], score: str) -> list[dict]:
    means = []
    for label, roles in [("mean (near)", {"ood-near"}), ("mean (far)", {"ood-far"}),
                         ("mean (all)", {"ood-near", "ood-far"})]:
        chosen = [{k: r[k] for k in METRIC_KEYS} for r in rows if r["score"] == score and r["role"] in roles]
        if chosen and not (label == "mean (all)" and len({r["role"] for r in rows if r["role"] in roles}) < 2):
            means.append({"score": score, "set": label, "role": "mean", **mean_row(chosen)})
    return means


def evaluate(cfg: ExperimentConfig, bundle: ClassifierBundle, progress: bool = True,
             splits: list[Split] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Evaluate a classifier on the preset's ID test and OOD sets (``splits``: built once, read-only).

    Returns:
        ``(results, raw_scores)``: the metrics rows and more; ``raw_scores`` maps ``score/set``.
    """
    device = resolve_device(cfg.run.device)
    model = bundle.model.to(device, memory_format=MEMORY_FORMAT).eval()
    splits = build_splits(cfg.data) if splits is None else splits
    id_test = next(s for s in splits if s.role == "id-test")
    trained_on = bundle.meta.get("classes")
    if trained_on is not None and list(trained_on) != list(id_test.classes):
        raise ValueError(f"the classifier was trained on the classes {list(trained_on)[:6]}… "
                         f"({len(trained_on)}) but preset {cfg.run.preset!r} has {list(id_test.classes)[:6]}… "
                         f"({len(id_test.classes)}); evaluate it with the preset it was trained for")
    ood = [s for s in splits if s.role.startswith("ood")]
    sign, sign_source = energy_sign(cfg.evaluate.energy_sign, bundle.slope)
    e = cfg.evaluate
    scores = build_scores(cfg, sign)
    to_set_up = [name for name, score_fn in scores.items() if score_fn.needs_setup]
    if to_set_up:
        # one loader over the training split with the evaluation transform, read by each in turn
        train = next(s for s in splits if s.role == "id-train")
        loader = _loader(train, cfg)
        for name in to_set_up:
            scores[name].setup(model, _OnDevice(loader, device, f"{name} · setup on {train.name}", progress))
    # each split read once; all scores of a batch (and the ID accuracy) from one forward pass
    by_split = {}
    for split in [id_test, *ood]:
        by_split[split.name], split_accuracy = _score_batches(model, scores, split, cfg, device, progress)
        if split is id_test:
            accuracy = split_accuracy
    rows, raw = [], {}
    for name in scores:
        raw[f"{name}/{id_test.name}"] = id_scores = by_split[id_test.name][name]
        for split in ood:
            raw[f"{name}/{split.name}"] = ood_scores = by_split[split.name][name]
            rows.append({"score": name, "set": split.name, "role": split.role,
                         **ood_metrics(id_scores, ood_scores, positive=e.positive,
                                                     fpr95_rule=e.fpr95_rule)})
        rows += _mean_rows(rows, name)
    results = {
        "positive": e.positive, "convention": CONVENTIONS[e.positive], "main_score": e.score,
        "fpr95_rule": e.fpr95_rule,
        "id_accuracy": accuracy, "energy_sign": sign,
        "energy_sign_source": sign_source,
        "score_args": {name: score_arguments(name, e.score_args.get(name)) for name in scores},
        "slope": bundle.slope, "classifier": {k: v for k, v in bundle.meta.items() if k != "classes"},
        "sets": {s.name: {"role": s.role, "count": len(s.dataset)} for s in [id_test, *ood]},
        "rows": rows,
    }
    return results, raw


def format_table(results: dict, score: str | None = None) -> str:
    """The markdown table of one score (default: the main one), metrics in percent, convention stated."""
    score = score or results["main_score"]
    notes = [f"{arg}={value}" for arg, value in results.get("score_args", {}).get(score, {}).items()]
    if score == "energy":
        source = results.get("energy_sign_source", "the head's slope")
        notes.append(f"{'+' if results['energy_sign'] > 0 else '−'}logsumexp: {source}")
    note = f" ({'; '.join(notes)})" if notes else ""
    rule = {"closest": "the ROC point with recall closest to 95 % (the original's rule)",
            "first_above": "the first ROC point with recall ≥ 95 %"}.get(results.get("fpr95_rule"))
    lines = [f"Score: **{score}**{note}. Positive class: {results['convention']}."
             + (f" FPR95 threshold: {rule}." if rule else ""),
             f"ID accuracy: {100 * results['id_accuracy']:.2f} %.", "",
             "| OOD set | role | FPR95 ↓ | AUROC ↑ | AUPR-In ↑ | AUPR-Out ↑ |", "|---|---|---:|---:|---:|---:|"]
    for row in results["rows"]:
        if row["score"] == score:
            name = f"**{row['set']}**" if row["role"] == "mean" else row["set"]
            lines.append(f"| {name} | {row['role']} | " + " | ".join(
                f"{100 * row[k]:.2f}" for k in METRIC_KEYS) + " |")
    return "\n".join(lines) + "\n"


def _csv(results: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["score", "set", "role", *METRIC_KEYS, "positive"])
    writer.writeheader()
    for row in results["rows"]:
        writer.writerow({**row, "positive": results["positive"]})
    return buffer.getvalue()


def write_results(folder: Path, results: dict, raw: dict[str, np.ndarray]) -> None:
    """``metrics.json``, ``metrics.csv``, ``table.md`` and ``scores.npz`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "scores.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **raw)
    atomic_write_text(folder / "metrics.csv", _csv(results))
    tables = [format_table(results)] + [format_table(results, s) for s in
                                        dict.fromkeys(r["score"] for r in results["rows"])
                                        if s != results["main_score"]]
    atomic_write_text(folder / "table.md", "\n".join(tables))
    atomic_write_json(folder / "metrics.json", results)


# Stage 6 reads the ID test split, the OOD sets and the classifier; it writes the metrics and tables.
STAGE = STAGES["evaluate"]


def run(cfg: ExperimentConfig, run_dir: RunDir, checkpoint: str | Path | None = None,
        progress: bool = True) -> dict:
    """Stage 6 in the run folder: evaluate ``classifier/best.safetensors`` (or ``checkpoint``)."""
    c = cfg.classifier
    if checkpoint is not None:
        # the kit's own files carry arch and classes; third-party ones take them from the config
        num_classes = len(get_split(cfg.data, "id-test").classes)
        bundle = load_classifier(checkpoint, c.arch, num_classes, c.energy_head, c.head_hidden, c.width)
        results, raw = evaluate(cfg, bundle, progress)
        write_results(run_dir.path("results_dir"), results, raw)
        return results
    with run_dir.stage("evaluate") as rec:
        if rec.done:
            return json.loads(run_dir.path("metrics_json").read_text())
        bundle = load_classifier(run_dir.require("classifier_best"))
        results, raw = evaluate(cfg, bundle, progress)
        write_results(run_dir.path("results_dir"), results, raw)
        main = [r for r in results["rows"] if r["score"] == results["main_score"] and r["role"] == "mean"]
        rec.info.update(id_accuracy=results["id_accuracy"],
                        means={r["set"]: {k: r[k] for k in ("fpr95", "auroc")} for r in main})
    return results

