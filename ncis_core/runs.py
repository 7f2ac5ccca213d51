"""The run folder: artefact paths, atomic writes, the manifest, and the stale-input check.

A run folder (``outputs/<run>/``) holds the resolved ``config.yaml``, a ``manifest.json`` and every
stage's artefacts (DESIGN.md, "Stage contracts"). The manifest records package versions, the git
commit, the seed and, per stage, start/end times and the content hashes of what the stage read
(artefacts of earlier stages and its config sections) and wrote.

Stages go through :meth:`RunDir.stage`, which

* refuses to start when an input artefact is missing, naming the stage that makes it;
* refuses an input artefact that was built from different inputs than the ones in the folder now
  (or edited after it was written), naming the stage to rerun;
* tells the stage whether its own outputs are already complete and current (``rec.done``), so a
  rerun skips finished work, and whether partial work may be resumed (``rec.resumable``);
* records hashes and times when the stage finishes.

Example:
    >>> run = RunDir.create(load_config("smoke", out="/tmp/ncis-doc-run"))  # doctest: +SKIP
    >>> with run.stage("cvpn") as rec:                                     # doctest: +SKIP
    ...     if not rec.done:
    ...         train(..., run.path("cvpn_best"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from omegaconf import OmegaConf

from .config import ExperimentConfig, config_from_yaml, config_to_yaml

__all__ = [
    "ARTEFACTS",
    "STAGES",
    "Stage",
    "StaleArtefactError",
    "MissingArtefactError",
    "RunDir",
    "StageRecord",
    "stage_inputs",
    "stage_sections",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "content_hash",
    "cache_key",
    "cache_path",
    "package_versions",
    "git_commit",
]

log = logging.getLogger(__name__)

# Every artefact of a run, by name → path relative to the run folder (DESIGN.md's stage table).
ARTEFACTS: dict[str, str] = {
    "config": "config.yaml",
    "manifest": "manifest.json",
    "data_summary": "data/summary.json",
    "embeddings": "embeddings.safetensors",
    "cvpn_dir": "cvpn",
    "cvpn_best": "cvpn/best.safetensors",
    "cvpn_history": "cvpn/history.json",
    "outlier_embeddings": "outlier_embeddings.safetensors",
    "outliers_dir": "outliers",
    "outliers_index": "outliers/index.json",
    # the images of an outlier method other than stage 3's (rendered by compare; {method} = its name)
    "method_outliers_dir": "outliers_{method}",
    "classifier_dir": "classifier",
    "classifier_best": "classifier/best.safetensors",
    "classifier_history": "classifier/history.json",
    "results_dir": "results",
    "metrics_json": "results/metrics.json",
    "metrics_csv": "results/metrics.csv",
    "table_md": "results/table.md",
    "scores_npz": "results/scores.npz",
    # compare: one folder per (method, seed), the tables and their summary
    "compare_dir": "compare",
    "figures": "figures",
    "notebooks": "notebooks",
    # derived results kept between commands (UMAP maps, other methods' outlier embeddings, ...):
    # never an input of a stage, always keyed by everything they were computed from (cache_key)
    "cache_dir": "cache",
}


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its number (= notebook number), what it reads and what it writes.

    Args:
        number: the stage number; notebook ``NN_<name>.ipynb`` runs it.
        name: the stage's name (also its manifest key).
        config_sections: config sections whose values the outputs depend on.
        inputs: artefact names (keys of :data:`ARTEFACTS`) produced by earlier stages.
        outputs: artefact names this stage writes; the first is the one whose presence means "done".
    """

    number: int
    name: str
    config_sections: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage(0, "data", ("data",), (), ("data_summary",)),
    Stage(1, "embed", ("data", "diffusion", "embed"), (), ("embeddings",)),
    Stage(2, "cvpn", ("cvpn",), ("embeddings",), ("cvpn_best", "cvpn_history")),
    Stage(3, "sample", ("sample",), ("embeddings", "cvpn_best"), ("outlier_embeddings",)),
    Stage(4, "generate", ("diffusion", "generate"), ("outlier_embeddings",), ("outliers_dir",)),
    Stage(5, "classifier", ("data", "classifier"), ("outliers_dir",),
          ("classifier_best", "classifier_history")),
    Stage(6, "evaluate", ("data", "evaluate"), ("classifier_best",),
          ("metrics_json", "metrics_csv", "table_md")),
]}

def stage_inputs(cfg: ExperimentConfig, name: str) -> tuple[str, ...]:
    """The artefacts stage ``name`` reads under ``cfg``: its own list, except where the config
    changes it (stage 3 reads the cVPN only for a method that needs it; stage 5 reads stage 4's
    ``outliers/`` only when ``classifier.outliers`` is stage 3's method)."""
    if name == "sample":
        from .outliers.base import method_inputs

        return method_inputs(cfg, cfg.sample.method)[0]
    if name == "classifier" and cfg.classifier.outliers != cfg.sample.method:
        return ()
    return STAGES[name].inputs


def stage_sections(cfg: ExperimentConfig, name: str) -> tuple[str, ...]:
    """The config sections stage ``name``'s outputs depend on under ``cfg``: its own list plus what
    the config adds (stage 3: what its method reads, e.g. the generator for ``knn_boundary``'s class
    token rows; stage 5: the generator and ``embed.resolution`` when it makes generated-looking ID
    images)."""
    own = STAGES[name].config_sections
    if name == "sample":
        from .outliers.base import method_inputs

        return tuple(dict.fromkeys((*own, *method_inputs(cfg, cfg.sample.method)[1])))
    if name == "classifier" and cfg.classifier.id_generated != "none":
        return (*own, "diffusion", "embed.resolution")
    return own


# Config sections every stage depends on (the seed changes every random draw).
_COMMON_SECTIONS = ("run.seed",)


class MissingArtefactError(FileNotFoundError):
    """An input artefact is not in the run folder; the message names the stage that makes it."""


class StaleArtefactError(RuntimeError):
    """An artefact was built from different inputs than the ones in the run folder now;
    the message names the stage to rerun."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path`` (atomic on POSIX).

    For libraries that write to a path themselves (``safetensors.torch.save_file``, ``PIL``). On an
    exception the temporary file is removed and ``path`` is left untouched, so a killed run never
    leaves a half-written artefact that a rerun would mistake for a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------- hashes, provenance
def content_hash(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, or of a folder tree (relative paths and file bytes, sorted).

    Hidden temporary files (``.*.tmp``) are ignored, so work in flight does not change a folder's hash.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            if file.name.startswith(".") and file.name.endswith(".tmp"):
                continue
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
            h.update(content_hash(file).encode() + b"\n")
        return h.hexdigest()
    raise FileNotFoundError(path)


_VERSIONED = ("torch", "diffusers", "transformers", "accelerate", "numpy", "scipy", "scikit-learn",
              "scikit-image", "umap-learn", "matplotlib", "papermill", "omegaconf", "safetensors",
              "animal-mnist", "ncis-kit")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a run's numbers (None when absent)."""
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the kit's checkout (or of ``repo``), or None: for an
    installed copy (no checkout: :func:`ncis_core.assets.checkout_root`) and outside a git checkout."""
    if not repo:
        from .assets import checkout_root

        repo = checkout_root()
        if repo is None:
            return None
    repo = Path(repo)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def cache_key(inputs: dict[str, str], config: Any = None, versions: tuple[str, ...] = ()) -> str:
    """The key of a cached result: a short SHA-256 over what it was computed from.

    Args:
        inputs: name → content hash (:func:`content_hash`) of every file the result was read from.
        config: everything else it depends on, JSON-serialisable (dataclasses are converted; other
            objects by ``str``).
        versions: package names whose installed versions change the result (e.g. ``umap-learn``).

    Example:
        >>> cache_key({"embeddings": "ab12"}, {"k": 3}) == cache_key({"embeddings": "ab12"}, {"k": 3})
        True
        >>> cache_key({"embeddings": "ab12"}, {"k": 3}) == cache_key({"embeddings": "ab12"}, {"k": 4})
        False
    """
    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return str(value)

    found = {}
    for name in versions:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    payload = {"inputs": dict(inputs), "config": config, "versions": found}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=plain).encode()).hexdigest()[:24]


def cache_path(root: str | os.PathLike, kind: str, key: str, suffix: str = "") -> Path:
    """``<run>/cache/<kind>/<key><suffix>``: where a cached result of ``kind`` lives (the folder is
    created). Every cache of the kit goes through here and :func:`cache_key`."""
    folder = Path(root) / ARTEFACTS["cache_dir"] / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}{suffix}"


def _section_hash(cfg: ExperimentConfig, dotted: str) -> str:
    node = OmegaConf.select(OmegaConf.structured(cfg), dotted)
    text = OmegaConf.to_yaml(node) if OmegaConf.is_config(node) else repr(node)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- the run folder
@dataclass
class StageRecord:
    """What :meth:`RunDir.stage` hands to a stage.

    Attributes:
        stage: the :class:`Stage`.
        done: outputs exist and were built from exactly the current inputs: skip the work.
        resumable: partial work of an interrupted run from the same inputs may be reused. False when
            the inputs changed since the partial work was done: the stage must start afresh.
        info: free-form values the stage wants in the manifest (e.g. ``{"k": 269}``).
    """

    stage: Stage
    done: bool
    resumable: bool
    info: dict = dataclasses.field(default_factory=dict)


class RunDir:
    """A run folder. Use :meth:`create` (writes config and manifest) or :meth:`open` (reads them).

    Args:
        root: the folder.
        cfg: the resolved config of this run.
    """

    def __init__(self, root: str | os.PathLike, cfg: ExperimentConfig):
        self.root = Path(root)
        self.cfg = cfg

    # -- construction
    @classmethod
    def create(cls, cfg: ExperimentConfig, root: str | os.PathLike | None = None) -> "RunDir":
        """Make (or reuse) the run folder ``cfg.run.out``, write ``config.yaml`` and the manifest header.

        Reusing a folder with a different config is allowed: stages whose config sections changed are
        then recomputed (their recorded config hashes no longer match).
        """
        run = cls(root or cfg.run.out, cfg)
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.path("config"), config_to_yaml(cfg))
        manifest = run.manifest()
        manifest.update({
            "preset": cfg.run.preset,
            "seed": cfg.run.seed,
            "packages": package_versions(),
            "git": git_commit(),
            "updated": _now(),
        })
        manifest.setdefault("created", _now())
        manifest.setdefault("stages", {})
        run._write_manifest(manifest)
        return run

    @classmethod
    def open(cls, root: str | os.PathLike) -> "RunDir":
        """Open an existing run folder (its ``config.yaml`` must exist)."""
        root = Path(root)
        cfg_file = root / ARTEFACTS["config"]
        if not cfg_file.exists():
            raise MissingArtefactError(
                f"{root} is not a run folder (no {ARTEFACTS['config']}); create it with "
                f"`python -m ncis_core run --preset P --out {root}`")
        return cls(root, config_from_yaml(cfg_file.read_text()))

    # -- paths and manifest
    def path(self, artefact: str, **fields: str) -> Path:
        """Absolute path of an artefact by name (see :data:`ARTEFACTS`); ``fields`` fill a pattern
        (``run.path("method_outliers_dir", method="linear")``)."""
        try:
            relative = ARTEFACTS[artefact]
        except KeyError:
            raise KeyError(f"unknown artefact {artefact!r}; known: {', '.join(ARTEFACTS)}") from None
        return self.root / relative.format(**fields) if fields or "{" in relative else self.root / relative

    def figure_path(self, name: str) -> Path:
        """``figures/<name>`` (the folder is created)."""
        folder = self.path("figures")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def manifest(self) -> dict:
        """The manifest as a dict (empty when not written yet)."""
        file = self.path("manifest")
        return json.loads(file.read_text()) if file.exists() else {}

    def _write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.path("manifest"), manifest)

    def note(self, section: str, key: str, entry: dict) -> None:
        """Set ``manifest[section][key] = entry`` (e.g. the runner's per-notebook times)."""
        manifest = self.manifest()
        manifest.setdefault(section, {})[key] = entry
        self._write_manifest(manifest)

    def _producer(self, artefact: str) -> Stage:
        for stage in STAGES.values():
            if artefact in stage.outputs:
                return stage
        raise KeyError(artefact)

    def _hash_of(self, key: str) -> str:
        """The current hash of one recorded input key: ``config:<section>``, an artefact name, or
        ``path:<absolute path>`` (an outside file or folder, e.g. a folder of outlier images)."""
        if key.startswith("config:"):
            return _section_hash(self.cfg, key[len("config:"):])
        path = Path(key[len("path:"):]) if key.startswith("path:") else self.path(key)
        return content_hash(path) if path.exists() else "missing"

    def _input_keys(self, stage: Stage, inputs: tuple[str, ...] | None = None,
                    extra: tuple[str | os.PathLike, ...] = ()) -> list[str]:
        keys = [f"config:{s}" for s in (*_COMMON_SECTIONS, *stage_sections(self.cfg, stage.name))]
        keys += list(stage.inputs if inputs is None else inputs)
        keys += [f"path:{Path(p).resolve()}" for p in extra]
        return keys

    def _input_hashes(self, stage: Stage, inputs: tuple[str, ...] | None = None,
                      extra: tuple[str | os.PathLike, ...] = ()) -> dict[str, str]:
        return {key: self._hash_of(key) for key in self._input_keys(stage, inputs, extra)}

    # -- the checks
    def require(self, artefact: str) -> Path:
        """Path of an input artefact after checking it is present and current.

        Raises:
            MissingArtefactError: the artefact is absent (or its stage never finished).
            StaleArtefactError: it was edited after its stage wrote it, or its stage's own inputs
                (earlier artefacts, config sections) changed since; the message names the stage to rerun.
        """
        producer = self._producer(artefact)
        where = f"stage {producer.number} ({producer.name})"
        file = self.path(artefact)
        record = self.manifest().get("stages", {}).get(producer.name, {})
        if not file.exists() or record.get("status") != "complete":
            raise MissingArtefactError(
                f"{ARTEFACTS[artefact]} is missing from {self.root}; run {where} first")
        if record.get("outputs", {}).get(artefact) != content_hash(file):
            raise StaleArtefactError(
                f"{ARTEFACTS[artefact]} changed after {where} wrote it; rerun {where}")
        # recompute exactly what the producer recorded (its inputs may differ by config, e.g. stage 5)
        recorded = record.get("inputs", {})
        changed = [k for k in recorded if recorded[k] != self._hash_of(k)]
        if changed:
            what = ", ".join(ARTEFACTS.get(k, k) for k in changed)
            raise StaleArtefactError(
                f"{ARTEFACTS[artefact]} was built from different inputs than the ones in {self.root} "
                f"now (changed: {what}); rerun {where}")
        return file

    @contextlib.contextmanager
    def stage(self, name: str, inputs: tuple[str, ...] | None = None,
              extra: tuple[str | os.PathLike, ...] = ()) -> Iterator[StageRecord]:
        """Run a stage: check its inputs, say whether it is done, record hashes and times.

        Only a stage that leaves the ``with`` block without an exception is recorded as complete.

        Args:
            name: a key of :data:`STAGES`.
            inputs: the artefacts this run of the stage reads, when they depend on the config
                (stage 5 reads ``outliers_dir`` only for NCIS outliers); default: the stage's own.
            extra: files or folders outside the run folder that the stage reads (hashed too).
        """
        try:
            stage = STAGES[name]
        except KeyError:
            raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None
        inputs = stage_inputs(self.cfg, name) if inputs is None else inputs
        for artefact in inputs:
            self.require(artefact)
        inputs = self._input_hashes(stage, inputs, extra)
        manifest = self.manifest()
        previous = manifest.get("stages", {}).get(name, {})
        same_inputs = previous.get("inputs") == inputs
        outputs_intact = all(
            self.path(a).exists() and previous.get("outputs", {}).get(a) == content_hash(self.path(a))
            for a in stage.outputs)
        done = same_inputs and previous.get("status") == "complete" and outputs_intact
        rec = StageRecord(stage=stage, done=done,
                          resumable=same_inputs or previous.get("inputs") is None,
                          info=dict(previous.get("info", {})))
        if done:
            log.info("stage %d (%s) is complete and current: skipped", stage.number, name)
            yield rec
            return
        started = _now()
        manifest.setdefault("stages", {})[name] = {
            "number": stage.number, "status": "running", "started": started, "inputs": inputs,
            "runs": previous.get("runs", 0) + 1}
        self._write_manifest(manifest)
        try:
            yield rec
        except BaseException:
            manifest = self.manifest()
            manifest["stages"][name].update(status="failed", ended=_now())
            self._write_manifest(manifest)
            raise
        missing = [ARTEFACTS[a] for a in stage.outputs if not self.path(a).exists()]
        if missing:
            raise RuntimeError(f"stage {stage.number} ({name}) finished without writing "
                               f"{', '.join(missing)}")
        manifest = self.manifest()
        manifest["stages"][name].update(
            status="complete", ended=_now(), info=rec.info,
            outputs={a: content_hash(self.path(a)) for a in stage.outputs})
        self._write_manifest(manifest)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r}, preset={self.cfg.run.preset!r})"
