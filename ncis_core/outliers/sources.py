"""Every method's outliers in a run folder: embeddings, rendered images, and stage 5's image source.

* The method stage 3 runs (``sample.method``) has its embeddings in ``outlier_embeddings.safetensors``
  and its images in stage 4's ``outliers/``.
* Any other method that produces embeddings has them computed on the same training rows
  (:func:`method_outlier_embeddings`, kept in ``RUN/cache/outlier_embeddings/`` under a
  :func:`~ncis_core.runs.cache_key` of everything they depend on) and its images rendered by
  :func:`render_outliers` into ``outliers_<method>/`` with stage 4's plan, settings and seeds, so image
  ``n`` of a class starts from the same noise for every method.
* ``idgen`` renders the plain class prompt into ``outliers_idgen/``; ``none`` has no images.

``outliers_<method>/index.json`` records the inputs the render was made from and each image's
SHA-256; a render of other inputs is replaced, a partial or damaged render of the same inputs
resumed (only the missing or damaged images are drawn again, as in stage 4).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import ExperimentConfig
from ..runs import RunDir, atomic_write_json, cache_key, cache_path, content_hash
from .base import EMBEDDINGS, NOTHING, PROMPT_IMAGES, get_method, method_inputs, method_params

__all__ = ["sampled_by_stage3", "sample_method", "method_outlier_file", "method_outlier_embeddings",
           "render_outliers", "outlier_image_folder"]

log = logging.getLogger(__name__)


def sampled_by_stage3(cfg: ExperimentConfig, name: str) -> bool:
    """True when ``name`` is the method whose outliers stages 3 and 4 make (``sample.method``)."""
    return name == cfg.sample.method


def sample_method(cfg: ExperimentConfig, run: RunDir, name: str, progress: bool = True,
                  device: torch.device | str | None = None, inputs=None) -> dict:
    """Run method ``name``'s sampler on the run's training rows (no cache).

    Returns:
        ``outliers`` (C × M × D float32, CPU), ``log_density`` (C × M float64; NaN for a method that
        draws from no Gaussian), the method's other per-outlier tensors, ``method`` and ``metadata``.

    ``inputs``: the :class:`~ncis_core.outliers.inputs.SampleInputs` when already built.

    Raises:
        ValueError: the method produces no embeddings; or its outliers are not finite.
    """
    from .inputs import sample_inputs

    method = get_method(name)
    if method.produces != EMBEDDINGS:
        raise ValueError(f"outlier method {name!r} produces {method.produces}, not embeddings")
    inputs = inputs if inputs is not None else sample_inputs(cfg, run, device)
    result = method.sample(inputs, method_params(method, cfg.sample.method_args), progress)
    outliers = result["outliers"].to(torch.float32).cpu()
    if not torch.isfinite(outliers).all():
        raise ValueError(f"{name}: sampled outliers contain NaN or Inf; the cVPN or the class covariances "
                         f"are degenerate (try a larger sample.reg_weight)")
    out = {key: value.cpu() for key, value in result.items() if isinstance(value, torch.Tensor)}
    out["outliers"] = outliers
    out.setdefault("log_density", torch.full(outliers.shape[:2], float("nan"), dtype=torch.float64))
    out.update(method=name, metadata={**result.get("metadata", {}), "class_names": inputs.class_names})
    return out


def method_outlier_embeddings(cfg: ExperimentConfig, run: RunDir, name: str, progress: bool = True) -> dict:
    """Method ``name``'s outlier embeddings for the run (:func:`method_outlier_file`, read).

    Returns:
        :func:`~ncis_core.outliers.files.load_outliers`'s dict (``outliers``, ``log_density``, ...).
    """
    from .files import load_outliers

    return load_outliers(method_outlier_file(cfg, run, name, progress))


def method_outlier_file(cfg: ExperimentConfig, run: RunDir, name: str, progress: bool = True) -> Path:
    """The file of method ``name``'s outlier embeddings: stage 3's when stage 3 ran it (checked
    current), else computed once and kept in ``RUN/cache/outlier_embeddings/<name>-<key>.safetensors``
    (key: the content of every artefact the method reads, its config sections, the package versions).
    """
    from .files import save_outliers

    if sampled_by_stage3(cfg, name):
        return run.require("outlier_embeddings")
    artefacts, sections = method_inputs(cfg, name)
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cfg)
    key = cache_key({a: content_hash(run.require(a)) for a in artefacts},
                    {"method": name, "seed": cfg.run.seed,
                     **{s: OmegaConf.to_container(OmegaConf.select(node, s)) if OmegaConf.is_config(
                         OmegaConf.select(node, s)) else OmegaConf.select(node, s) for s in sections}},
                    versions=("torch", "ncis-kit"))
    cached = cache_path(run.root, "outlier_embeddings", f"{name}-{key}", ".safetensors")
    if not cached.exists():
        result = sample_method(cfg, run, name, progress)
        save_outliers(cached, result, {"cache_of": f"outlier embeddings of {name}", **result["metadata"]})
    return cached


def render_outliers(cfg: ExperimentConfig, run: RunDir, name: str, progress: bool = True) -> Path:
    """Render ``outliers_<name>/`` with stage 4's plan, settings and seeds; skipped when it already
    holds a complete, intact render of the same inputs (every image equal to its recorded hash);
    missing or damaged images of such a render are drawn again. Returns the folder."""
    from ..device import resolve_device
    from ..embeddings_io import load_embeddings
    from ..stages import generate as stage4

    method = get_method(name)
    if method.produces == NOTHING:
        raise ValueError(f"outlier method {name!r} has no images")
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
        if all(stage4.image_intact(target / im["file"], im.get("sha256")) for im in previous["images"]):
            return target
        log.warning("%s: some images are missing or damaged: drawing them again", target)
    elif previous is not None:
        shutil.rmtree(target)  # a complete render of other inputs (or of unknown ones)
    names = load_embeddings(run.require("embeddings"))["class_names"]
    outliers = None
    if method.produces == EMBEDDINGS:
        outliers = method_outlier_embeddings(cfg, run, name, progress)["outliers"]
    pipe, tokens = stage4.prepare(cfg, names, resolve_device(cfg.run.device))
    batches = stage4.plan(len(names), outliers.shape[1] if outliers is not None else 1, cfg.generate, names)
    target.mkdir(parents=True, exist_ok=True)
    stage4.render_batches(pipe, tokens, batches, range(len(batches)), outliers, target, cfg.generate,
                          progress, desc=f"{name} outlier images")
    hashes = stage4.image_hashes(target, batches)
    atomic_write_json(index_file, {"method": name, "inputs": inputs, "images": [
        {"file": im.file, "class": im.class_index, "embedding_index": im.embedding_index, "seed": im.seed,
         "sha256": hashes.get(im.file)} for batch in batches for im in batch]})
    return target


def outlier_image_folder(cfg: ExperimentConfig, run: RunDir, name: str | None = None,
                         require: bool = True) -> Path | None:
    """Where method ``name``'s images are (default ``classifier.outliers``): stage 4's ``outliers/``
    for stage 3's method, ``outliers_<name>/`` for the others, ``classifier.outlier_folder`` when set
    (or for ``folder``), None for a method without images.

    Raises:
        MissingArtefactError / StaleArtefactError: stage 4's tree is missing or stale (``require``).
        FileNotFoundError: another method's images were not rendered yet (the message says how).
    """
    name = name or cfg.classifier.outliers
    folder = cfg.classifier.outlier_folder
    if name == "folder":
        if not folder:
            raise FileNotFoundError("classifier.outliers=folder needs classifier.outlier_folder "
                                    "(a folder of images)")
        return Path(folder)
    method = get_method(name)
    if method.produces == NOTHING:
        return None
    if folder and name == cfg.classifier.outliers and not sampled_by_stage3(cfg, name):
        return Path(folder)  # another method's images, made elsewhere
    if method.produces == EMBEDDINGS and sampled_by_stage3(cfg, name):
        return run.require("outliers_dir") if require else run.path("outliers_dir")
    path = run.path("method_outliers_dir", method=name)
    if require and not (path / "index.json").exists():
        raise FileNotFoundError(
            f"classifier.outliers={name} needs the images in {path}; render them with "
            f"`python -m ncis_core compare --methods {name} ...` or point classifier.outlier_folder at them")
    return path
