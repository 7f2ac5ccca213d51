"""Stage 4: outlier images (METHOD.md §4) ↔ ``04_generate_outliers.ipynb``: Stable Diffusion with the
class token's row replaced by an outlier embedding of stage 3; resumable, repairable, shardable.

The plan (:func:`plan`) is fixed by the config: batch ``b`` is class ``b mod C``; its image ``j`` is the
class's image ``n = (b div C) · batch_size + j``, seeded ``generate.seed + b · batch_size + j``, with one
outlier embedding per batch or per image (``generate.embedding_per``), recorded in ``index.json``."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import queue
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..progress import bar_options
from .. import diffusion
from ..device import broadcast, intra_op_threads, process_state
from ..config import ExperimentConfig, GenerateConfig
from ..runs import STAGES, RunDir, atomic_path, atomic_write_json, cache_key, content_hash, method_inputs

__all__ = [
    "INDEX_FORMAT",
    "PlannedImage",
    "plan",
    "load_outlier_embeddings",
    "prepare",
    "generate_images",
    "to_uint8",
    "ordinary_images",
    "render_batches",
    "render_workers",
    "SIDE_BY_SIDE_MAX_PARAMETERS",
    "recorded_hashes",
    "image_intact",
    "image_hashes",
    "comparison_rows",
    "load_index",
    "render_method",
    "run",
    "main",
]

log = logging.getLogger(__name__)

INDEX_FORMAT = "ncis-outlier-images/1"

#: the largest UNet (parameters) whose batches :func:`render_workers` draws side by side on the CPU
SIDE_BY_SIDE_MAX_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class PlannedImage:
    """One image of the plan (one entry of ``index.json``)."""

    file: str
    batch: int
    class_index: int
    class_name: str
    embedding_index: int
    seed: int


def _file_stem(name: str) -> str:
    return re.sub(r"[^\w-]+", "_", name.strip().lower()) or "class"


def plan(num_classes: int, num_embeddings: int, gcfg: GenerateConfig, class_names: Sequence[str]
         ) -> list[list[PlannedImage]]:
    """The batches of stage 4, each a list of :class:`PlannedImage` (see the module docstring)."""
    if num_classes < 1 or num_embeddings < 1:
        raise ValueError(f"cannot plan outlier images for {num_classes} classes × {num_embeddings} "
                         f"embeddings")
    if gcfg.num_batches < 0 or gcfg.batch_size < 1:
        raise ValueError("generate.num_batches must be ≥ 0 and generate.batch_size ≥ 1")
    # the b-th draw of one generator: every process has the same plan, a longer one extends a shorter
    random_choice = np.random.default_rng(np.random.SeedSequence([gcfg.seed, 4])).integers(
        0, num_embeddings, size=gcfg.num_batches)
    batches = []
    for b in range(gcfg.num_batches):
        c, k = b % num_classes, b // num_classes
        images = []
        for j in range(gcfg.batch_size):
            n = k * gcfg.batch_size + j
            if gcfg.embedding_per == "image":
                e = n % num_embeddings
            elif gcfg.batch_embedding == "random":
                e = int(random_choice[b])
            else:
                e = k % num_embeddings
            images.append(PlannedImage(f"{c}/{_file_stem(class_names[c])}_{n}.png", b, c,
                                       class_names[c], e, gcfg.seed + b * gcfg.batch_size + j))
        batches.append(images)
    return batches


def load_outlier_embeddings(path: str | Path) -> dict:
    """Stage 3's file, checked: ``{"outliers": C × M × D float32, "class_names": [C], ...}``; ValueError if
    ``outliers`` is missing, empty, not finite or not ``C × M × D``, or not one name per class."""
    from ..embeddings_io import load_outliers

    data = load_outliers(path)
    out = data.get("outliers")
    if out is None:
        raise ValueError(f"{path} holds no 'outliers' tensor; rerun stage 3 (sample)")
    if out.ndim != 3:
        raise ValueError(f"outlier embeddings must be C × M × D, got shape {tuple(out.shape)} in {path}")
    if out.numel() == 0:
        raise ValueError(f"{path} holds no outlier embeddings (shape {tuple(out.shape)}); rerun stage 3 "
                         f"(sample) with sample.rounds and sample.keep_per_round ≥ 1")
    if not torch.isfinite(out).all():
        raise ValueError(f"{path} contains NaN or Inf outlier embeddings; rerun stage 3 (sample)")
    meta = data.get("metadata", {})
    names = (json.loads(meta["class_names"]) if "class_names" in meta
             else [f"class_{i}" for i in range(len(out))])
    if len(names) != out.shape[0]:
        raise ValueError(f"{path}: {out.shape[0]} classes of outliers but {len(names)} class names")
    data["class_names"] = names
    return data


def prepare(cfg: ExperimentConfig, class_names: Sequence[str], device: torch.device | str = "cpu",
            progress: bool = False):
    """``(pipe, tokens)``: the pipeline (PNDM with ``skip_prk_steps``, weights in ``generate.precision``'s
    dtype) and the class tokens for ``class_names``."""
    from diffusers import PNDMScheduler

    dtype, _ = diffusion.generation_precision(cfg.generate.precision, device)
    pipe, tokens = diffusion.pipeline_with_class_tokens(cfg, class_names, device, progress, dtype)
    if not (isinstance(pipe.scheduler, PNDMScheduler) and pipe.scheduler.config.skip_prk_steps):
        # METHOD.md §4: PLMS = PNDM without the Runge-Kutta warm-up steps
        pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=True)
    return pipe, tokens


def to_uint8(images: torch.Tensor, size: int, antialias: bool = False, quantize: str = "truncate"
             ) -> np.ndarray:
    """``B × 3 × H × W`` in [0, 1] → clamp, bilinear resize to ``size``, ``B × size × size × 3`` uint8
    (``quantize``: ``truncate`` or ``round``; no antialias and truncation are the original's).

    >>> x = torch.full((1, 3, 2, 2), 0.999)
    >>> to_uint8(x, 2)[0, 0, 0].tolist(), to_uint8(x, 2, quantize="round")[0, 0, 0].tolist()
    ([254, 254, 254], [255, 255, 255])
    """
    if quantize not in ("truncate", "round"):
        raise ValueError(f"generate.quantize={quantize!r} is not one of truncate, round")
    x = images.float().clamp(0, 1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    x = x.clamp(0, 1) * 255
    if quantize == "round":
        x = x.round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # float → uint8 truncates


@torch.no_grad()
def generate_images(pipe, tokens, class_index: int, vectors: torch.Tensor | None, seeds: Sequence[int],
                    gcfg: GenerateConfig) -> np.ndarray:
    """One ``B × output_size × output_size × 3`` uint8 batch of class ``class_index``, image ``j`` with
    ``vectors[j]`` in place of the class token's row (``None``: the plain long-name prompt)."""
    b = len(seeds)
    _, precision = diffusion.generation_precision(gcfg.precision, pipe.device)
    with precision():
        if vectors is None:
            ctx = diffusion.encode_prompts(pipe, [gcfg.prompt.format(tokens.long_names[class_index])] * b)
        else:
            prompts = [gcfg.prompt.format(tokens.generation_words[class_index])] * b
            ctx = diffusion.encode_prompts(pipe, prompts, [tokens.token_ids[class_index]] * b, vectors)
        negative = diffusion.encode_prompts(pipe, [gcfg.negative_prompt] * b)
        # One CPU generator per image: its starting noise depends on its seed only, on any device.
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        out = pipe(prompt_embeds=ctx, negative_prompt_embeds=negative, height=gcfg.height, width=gcfg.width,
                   num_inference_steps=gcfg.steps, guidance_scale=gcfg.guidance_scale, eta=gcfg.eta,
                   generator=generators, output_type="pt").images
    return to_uint8(out, gcfg.output_size, gcfg.antialias, gcfg.quantize)


def ordinary_images(pipe, tokens, class_index: int, seeds: Sequence[int], gcfg: GenerateConfig
                    ) -> np.ndarray:
    """The plain class prompt's images with ``seeds`` (the notebook's comparison row)."""
    return generate_images(pipe, tokens, class_index, None, seeds, gcfg)


def recorded_hashes(out_dir: str | Path) -> dict[str, str]:
    """``file → SHA-256`` from an earlier render's ``out_dir/index.json``; ``{}`` if none or unreadable."""
    index = Path(out_dir) / "index.json"
    try:
        images = json.loads(index.read_text()).get("images", [])
    except (OSError, ValueError, AttributeError):
        return {}
    return {im["file"]: im["sha256"] for im in images if isinstance(im, dict) and im.get("sha256")}


def image_intact(path: str | Path, recorded: str | None) -> bool:
    """Whether ``path`` is what a render wrote: of SHA-256 ``recorded``, or without a record, decodable."""
    path = Path(path)
    if not path.is_file():
        return False
    if recorded is not None:
        return content_hash(path) == recorded
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError …)
        return False


def image_hashes(out_dir: str | Path, batches: list[list[PlannedImage]]) -> dict[str, str]:
    """``file → SHA-256`` of the plan's images present in ``out_dir`` (what ``index.json`` records)."""
    out_dir = Path(out_dir)
    return {im.file: content_hash(out_dir / im.file) for batch in batches for im in batch
            if (out_dir / im.file).is_file()}


def render_batches(pipe, tokens, batches: list[list[PlannedImage]], which: Sequence[int],
                   outliers: torch.Tensor | None, out_dir: Path, gcfg: GenerateConfig,
                   progress: bool = True, on_batch_end: Callable[[int], None] | None = None,
                   desc: str = "stage 4: outlier images") -> float:
    """Render the plan's batches ``which`` into ``out_dir`` (``outliers``: C × M × D, or ``None`` for the
    plain prompt), skipping intact batches and writing only damaged or missing files; returns seconds."""
    recorded = recorded_hashes(out_dir)
    damaged = {b: [im for im in batches[b] if not image_intact(out_dir / im.file, recorded.get(im.file))]
               for b in which}
    todo = [b for b in which if damaged[b]]
    if len(todo) < len(which):
        log.info("resuming: %d of %d batches already done", len(which) - len(todo), len(which))
    repaired = [im.file for b in todo if len(damaged[b]) < len(batches[b]) for im in damaged[b]]
    if repaired:
        log.warning("%d damaged or missing image(s) in %s are regenerated: %s", len(repaired), out_dir,
                    ", ".join(repaired[:5]) + (", …" if len(repaired) > 5 else ""))
    bar = tqdm(total=sum(len(damaged[b]) for b in todo), desc=desc, unit="img",
               **bar_options(progress))
    started = time.time()

    def draw(p, b: int) -> np.ndarray:
        images = batches[b]
        c = images[0].class_index
        vectors = None if outliers is None else outliers[c, [im.embedding_index for im in images]]
        return generate_images(p, tokens, c, vectors, [im.seed for im in images], gcfg)

    try:
        # in plan order, each saved before the next: a kill after batch b leaves exactly batches ≤ b
        with contextlib.closing(_drawn_in_order(pipe, todo, draw)) as drawn:
            for b, pixels in drawn:
                for im, px in zip(batches[b], pixels):
                    if im in damaged[b]:
                        _save_png(out_dir / im.file, px)
                bar.update(len(damaged[b]))
                if on_batch_end is not None:
                    on_batch_end(b)
    finally:
        bar.close()
    return time.time() - started


def render_workers(pipe, batches: int) -> int:
    """Batches to draw side by side: one per intra-op thread (at most one per batch) on the CPU for a UNet
    of at most :data:`SIDE_BY_SIDE_MAX_PARAMETERS` parameters; else 1."""
    if batches < 2 or pipe.device.type != "cpu" or torch.get_num_threads() < 2:
        return 1
    if sum(p.numel() for p in pipe.unet.parameters()) > SIDE_BY_SIDE_MAX_PARAMETERS:
        return 1
    return min(torch.get_num_threads(), batches)


def _drawn_in_order(pipe, todo: Sequence[int], draw: Callable) -> Iterator[tuple[int, np.ndarray]]:
    """``(b, draw(pipe, b))`` for each batch of ``todo`` in order; with :func:`render_workers` > 1, drawn on
    one-thread workers, each with its own copy of the pipeline."""
    workers = render_workers(pipe, len(todo))
    if workers == 1:
        for b in todo:
            yield b, draw(pipe, b)
        return
    from concurrent.futures import ThreadPoolExecutor

    free = queue.SimpleQueue()  # a pipeline per worker: a task takes one and puts it back
    for p in [pipe] + [copy.deepcopy(pipe) for _ in range(workers - 1)]:
        free.put(p)

    def task(b: int) -> np.ndarray:
        p = free.get()
        try:
            return draw(p, b)
        finally:
            free.put(p)

    with intra_op_threads(1):
        pool = ThreadPoolExecutor(workers, thread_name_prefix="render")
        try:
            futures = [pool.submit(task, b) for b in todo]
            for b, future in zip(todo, futures):
                yield b, future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def comparison_rows(cfg: ExperimentConfig, run_dir: RunDir, index: dict, classes: Sequence[int],
                    per_class: int, device: torch.device | str = "cpu"
                    ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """Per class: its first ``per_class`` outlier images and plain-prompt ones of the same seeds, as rows."""
    pipe, tokens = prepare(cfg, index["classes"], device)
    ordinary, outliers = [], []
    for c in classes:
        entries = [e for e in index["images"] if e["class"] == c][:per_class]
        outliers.append([np.asarray(Image.open(run_dir.path("outliers_dir") / e["file"]).convert("RGB"))
                         for e in entries])
        ordinary.append(list(ordinary_images(pipe, tokens, c, [e["seed"] for e in entries], cfg.generate)))
    return ordinary, outliers


def _save_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def load_index(path: str | Path) -> dict:
    """``outliers/index.json``: settings and ``images`` (file, class, embedding index, seed, batch, hash)."""
    return json.loads(Path(path).read_text())


def render_method(cfg: ExperimentConfig, run: RunDir, name: str,
                  embeddings: Callable[[], torch.Tensor] | None = None, progress: bool = True) -> Path:
    """Render method ``name``'s images (not stage 3's; ``compare`` asks) into ``outliers_<name>/`` with this
    stage's plan and seeds, keeping an intact render of the same inputs; returns the folder. ``embeddings``:
    ``() -> C × M × D`` of a method producing embeddings, called only when there are images to draw."""
    from ..device import resolve_device
    from ..embeddings_io import load_embeddings
    from ..outliers.base import EMBEDDINGS, NOTHING, PROMPT_IMAGES, get_method

    method = get_method(name)
    if method.produces == NOTHING:
        raise ValueError(f"outlier method {name!r} has no images")
    if method.produces == EMBEDDINGS and embeddings is None:
        raise ValueError(f"outlier method {name!r} renders outlier embeddings: pass them (embeddings=)")
    target = run.path("method_outliers_dir", method=name)
    if method.produces == PROMPT_IMAGES:
        inputs = {"embeddings": content_hash(run.require("embeddings"))}
    else:
        artefacts, sections = method_inputs(cfg, name)
        inputs = {a: content_hash(run.require(a)) for a in artefacts}
    # everything stage 4 reads, and the method's own settings; the classifier sections do not matter
    inputs["config"] = cache_key({}, [asdict(getattr(cfg, k)) for k in (
        "diffusion", "generate", "sample", "cvpn", "data")] + [cfg.embed.prompt, cfg.run.seed])
    index_file = target / "index.json"
    previous = None  # no index: no render yet, or a partial one (resumed)
    if index_file.exists():
        try:
            previous = json.loads(index_file.read_text())
        except (OSError, ValueError):
            previous = {}  # unreadable: which inputs its images come from is unknown
    if isinstance(previous, dict) and previous.get("inputs") == inputs and previous.get("images"):
        if all(image_intact(target / im["file"], im.get("sha256")) for im in previous["images"]):
            return target
        log.warning("%s: some images are missing or damaged: drawing them again", target)
    elif previous is not None:
        shutil.rmtree(target)  # a complete render of other inputs (or of unknown ones)
    names = load_embeddings(run.require("embeddings"))["class_names"]
    outliers = embeddings() if method.produces == EMBEDDINGS else None
    pipe, tokens = prepare(cfg, names, resolve_device(cfg.run.device))
    batches = plan(len(names), outliers.shape[1] if outliers is not None else 1, cfg.generate, names)
    target.mkdir(parents=True, exist_ok=True)
    render_batches(pipe, tokens, batches, range(len(batches)), outliers, target, cfg.generate,
                   progress, desc=f"{name} outlier images")
    hashes = image_hashes(target, batches)
    atomic_write_json(index_file, {"method": name, "inputs": inputs, "images": [
        {"file": im.file, "class": im.class_index, "embedding_index": im.embedding_index, "seed": im.seed,
         "sha256": hashes.get(im.file)} for batch in batches for im in batch]})
    return target


# Stage 4 reads stage 3's outlier embeddings and the generator; it writes the outlier images.
STAGE = STAGES["generate"]


def run(cfg: ExperimentConfig, run_dir: RunDir, progress: bool = True,
        on_batch_end: Callable[[int], None] | None = None) -> dict:
    """Stage 4: write ``outliers/<class>/*.png`` and ``outliers/index.json``; returns the index.
    ``on_batch_end(b)`` runs after batch ``b`` is saved (tests kill a run there).

    Raises:
        ValueError: an empty outlier file, or embeddings not as wide as the text encoder's.
    """
    state, device = process_state(cfg.run.device)
    main_process = state.is_main_process
    gcfg = cfg.generate
    out_dir = run_dir.path("outliers_dir")
    with contextlib.ExitStack() as stack:
        rec = stack.enter_context(run_dir.stage("generate")) if main_process else None
        done, resumable = broadcast(state, [rec.done, rec.resumable] if rec else [None, None])
        if not done:
            data = load_outlier_embeddings(run_dir.require("outlier_embeddings"))
            outliers, names = data["outliers"], data["class_names"]
            num_classes, num_embeddings, dim = outliers.shape
            batches = plan(num_classes, num_embeddings, gcfg, names)
            if main_process:
                if out_dir.exists() and not resumable:
                    log.info("inputs changed since the partial run: discarding %s", out_dir)
                    shutil.rmtree(out_dir)
                for stale in out_dir.rglob(".*.tmp") if out_dir.exists() else ():
                    stale.unlink()  # a killed run's half-written file
                out_dir.mkdir(parents=True, exist_ok=True)
            state.wait_for_everyone()
            pipe, tokens = prepare(cfg, names, device)
            width = diffusion.embedding_width(pipe)
            if dim != width:
                raise ValueError(f"the outlier embeddings have width D={dim} but the text encoder of "
                                 f"diffusion.pipeline={cfg.diffusion.pipeline!r} has input-embedding width "
                                 f"{width}: stage 3's embeddings must come from stage 1 with the same "
                                 f"diffusion.pipeline")
            missing = diffusion.tokens_missing_from_prompt(pipe, tokens, gcfg.prompt)
            if missing and main_process:
                log.warning("the class token of %s does not occur in its generation prompt, so no outlier "
                            "embedding is injected there (METHOD.md defect 1; diffusion.class_token="
                            "placeholder fixes it)", ", ".join(f"{c} ({names[c]})" for c in missing))
            with state.split_between_processes(list(range(len(batches)))) as mine:
                mine = list(mine)
            elapsed = render_batches(pipe, tokens, batches, mine, outliers, out_dir, gcfg,
                                     progress and main_process, on_batch_end)
            state.wait_for_everyone()
            if main_process:
                hashes = image_hashes(out_dir, batches)
                index = {"format": INDEX_FORMAT, "class_token": tokens.strategy,
                         "embedding_per": gcfg.embedding_per, "classes": list(names),
                         "prompts": [gcfg.prompt.format(w) for w in tokens.generation_words],
                         "missing_injection": missing, "settings": asdict(gcfg),
                         "images": [{"file": im.file, "class": im.class_index, "class_name": im.class_name,
                                     "embedding_index": im.embedding_index, "seed": im.seed,
                                     "batch": im.batch, "sha256": hashes.get(im.file)}
                                    for batch in batches for im in batch]}
                atomic_write_json(run_dir.path("outliers_index"), index)
                used = len({(im.class_index, im.embedding_index) for batch in batches for im in batch})
                rec.info.update(images=sum(len(x) for x in batches), distinct_embeddings=used,
                                processes=state.num_processes, seconds_main_process=round(elapsed, 2),
                                missing_injection=missing)
                log.info("stage 4: %d images from %d distinct outlier embeddings",
                         sum(len(x) for x in batches), used)
    state.wait_for_everyone()
    run_dir.require("outliers_dir")
    return load_index(run_dir.path("outliers_index"))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ncis_core.stages.generate --preset P --out DIR [--set k=v …]``."""
    from .command import stage_main

    return stage_main(argv, "generate", run)


if __name__ == "__main__":
    raise SystemExit(main())
