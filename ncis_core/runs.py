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

Example (a ``smoke`` run folder; stage 0, ``data``, reads no artefact and writes one):
    >>> import tempfile
    >>> from ncis_core.config import load_config
    >>> run = RunDir.create(load_config("smoke", out=tempfile.mkdtemp()))
    >>> with run.stage("data") as rec:
    ...     if not rec.done:
    ...         _ = atomic_write_json(run.path("data_summary"), [{"name": "id-train", "count": 48}])
    >>> rec.done, run.manifest()["stages"]["data"]["status"]
    (False, 'complete')
    >>> with run.stage("data") as rec:  # again: complete and current, so the work is skipped
    ...     pass
    >>> rec.done
    True
    >>> with run.stage("cvpn") as rec:  # stage 2 reads stage 1's embeddings
    ...     pass
    Traceback (most recent call last):
    ...
    ncis_core.runs.MissingArtefactError: embeddings.safetensors is missing from ...; run stage 1 (embed) first ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from omegaconf import OmegaConf

from .errors import user_error
from .config import ExperimentConfig, config_from_yaml, config_to_yaml, memo_by_content

__all__ = [
    "ARTEFACTS",
    "STAGES",
    "Stage",
    "register_stage",
    "StaleArtefactError",
    "MissingArtefactError",
    "RunFolderUnwritable",
    "make_run_folder",
    "RunDir",
    "StageRecord",
    "StageState",
    "RunFolderBusy",
    "write_lock",
    "stage_inputs",
    "stage_sections",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_safetensors",
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
    # a headless run's log, one file per notebook (the runner's kernels; ncis_core.notebook.start)
    "logs": "logs",
    # derived results kept between commands (UMAP maps, other methods' outlier embeddings, ...):
    # never an input of a stage, always keyed by everything they were computed from (cache_key)
    "cache_dir": "cache",
}


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its number (= notebook number), what it reads and what it writes.

    Each stage module declares its own, next to its ``run()`` (``STAGE = register_stage(Stage(...))``).

    Args:
        number: the stage number; notebook ``NN_<name>.ipynb`` runs it.
        name: the stage's name (also its manifest key).
        config_sections: config sections (or ``section.key``) whose values the outputs depend on.
        inputs: artefact names (keys of :data:`ARTEFACTS`) produced by earlier stages.
        outputs: artefact names this stage writes; the first is the one whose presence means "done".
        inputs_for: ``cfg -> inputs`` where the config changes what the stage reads (default: ``inputs``).
        sections_for: ``cfg -> extra config sections`` the config adds (default: none).
    """

    number: int
    name: str
    config_sections: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    inputs_for: Callable[[ExperimentConfig], tuple[str, ...]] | None = None
    sections_for: Callable[[ExperimentConfig], tuple[str, ...]] | None = None


class _StageTable(Mapping):
    """Stage name → :class:`Stage`, in stage order. The stage modules declare their stages; the
    table imports ``ncis_core.stages`` (whose ``__init__`` imports every stage module) on first use,
    so a run folder opened anywhere knows every stage."""

    def __init__(self):
        self._stages: dict[str, Stage] = {}
        self._loading = False

    def _load(self) -> dict[str, Stage]:
        if not self._loading and len(self._stages) < _STAGE_COUNT:
            self._loading = True  # the stage modules register themselves while being imported
            try:
                importlib.import_module("ncis_core.stages")
            finally:
                self._loading = False
        return self._stages

    def register(self, stage: Stage) -> Stage:
        known = self._stages.get(stage.name)
        if known is not None:
            # `python -m ncis_core.stages.<stage>` imports the module twice (as __main__ and by its
            # package): the same declaration again is fine, a different one is a bug
            same = [getattr(known, f) for f in ("number", "config_sections", "inputs", "outputs")] == \
                [getattr(stage, f) for f in ("number", "config_sections", "inputs", "outputs")]
            if not same:
                raise ValueError(f"stage {stage.name!r} is declared twice, differently")
            return known
        self._stages[stage.name] = stage
        self._stages = dict(sorted(self._stages.items(), key=lambda item: item[1].number))
        return stage

    def __getitem__(self, name: str) -> Stage:
        return self._load()[name]

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


_STAGE_COUNT = 7  # stages 0-6; stage 7 (the explorer) is a view, not a stage
STAGES: Mapping[str, Stage] = _StageTable()


def register_stage(stage: Stage) -> Stage:
    """Add a stage module's declaration to :data:`STAGES` (returns it, for ``STAGE = register_stage(...)``)."""
    return STAGES.register(stage)


def stage_inputs(cfg: ExperimentConfig, name: str) -> tuple[str, ...]:
    """The artefacts stage ``name`` reads under ``cfg`` (its ``inputs_for``, else its ``inputs``)."""
    stage = STAGES[name]
    return tuple(stage.inputs_for(cfg)) if stage.inputs_for is not None else stage.inputs


def stage_sections(cfg: ExperimentConfig, name: str) -> tuple[str, ...]:
    """The config sections stage ``name``'s outputs depend on under ``cfg``: its own plus what its
    ``sections_for`` adds."""
    stage = STAGES[name]
    extra = tuple(stage.sections_for(cfg)) if stage.sections_for is not None else ()
    return tuple(dict.fromkeys((*stage.config_sections, *extra)))


# Config sections every stage depends on (the seed changes every random draw).
_COMMON_SECTIONS = ("run.seed",)


@user_error
class MissingArtefactError(FileNotFoundError):
    """An input artefact is not in the run folder; the message names the stage that makes it."""


@user_error
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
    leaves a half-written artefact that a rerun would mistake for a finished one. The file gets the
    permissions of any new file (``0666`` less the umask: ``0644`` under the usual ``022``), not
    ``mkstemp``'s private ``0600``, so a shared run folder is readable by the colleagues it is shared with.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where Linux gives it (setting the umask
    to read it back would change it for every thread meanwhile), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def atomic_write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``tensors`` (name → torch tensor) and ``metadata`` (str → str) as safetensors, atomically,
    with the same bytes for the same tensors and metadata.

    ``safetensors.torch.save_file`` keeps the metadata in a Rust ``HashMap``, so its header lists the
    keys in a different order from one call to the next: equal checkpoints, different file hashes,
    and manifests of two identical runs that never match. Here the header is rewritten with the
    metadata keys sorted and the tensors in the order of their data (the tensor bytes are the
    library's, unchanged); the file reads back through ``safetensors`` as before.

    Example:
        >>> import torch, tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> a = atomic_write_safetensors(folder / "a.safetensors", {"x": torch.ones(2)}, {"b": "1", "a": "2"})
        >>> b = atomic_write_safetensors(folder / "b.safetensors", {"x": torch.ones(2)}, {"a": "2", "b": "1"})
        >>> a.read_bytes() == b.read_bytes()
        True
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    ordered = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the library's alignment of the data that follows
    return atomic_write_bytes(path, len(text).to_bytes(8, "little") + text + data[8 + n:])


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


def package_versions(names: tuple[str, ...] = _VERSIONED) -> dict[str, str | None]:
    """Installed versions of ``names`` (default: the packages that shape a run's numbers; None when
    absent)."""
    versions = {}
    for name in names:
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

    payload = {"inputs": dict(inputs), "config": config, "versions": package_versions(tuple(versions))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=plain).encode()).hexdigest()[:24]


def cache_path(root: str | os.PathLike, kind: str, key: str, suffix: str = "") -> Path:
    """``<run>/cache/<kind>/<key><suffix>``: where a cached result of ``kind`` lives (the folder is
    created). Every cache of the kit goes through here and :func:`cache_key`."""
    folder = Path(root) / ARTEFACTS["cache_dir"] / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}{suffix}"


@memo_by_content()
def _section_hash(cfg: ExperimentConfig, dotted: str) -> str:
    """The hash of one config section (``classifier``, ``run.seed``) as the manifest records it."""
    node = OmegaConf.select(_structured(cfg), dotted)
    text = OmegaConf.to_yaml(node) if OmegaConf.is_config(node) else repr(node)
    return hashlib.sha256(text.encode()).hexdigest()


@memo_by_content(maxsize=8)
def _structured(cfg: ExperimentConfig):
    """``OmegaConf.structured(cfg)``, once for all the sections hashed of one config (read only)."""
    return OmegaConf.structured(cfg)


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


@dataclass(frozen=True)
class StageState:
    """What :meth:`RunDir.stage_state` says about a stage.

    Attributes:
        stage: the stage's name.
        state: ``current``, ``stale`` or ``missing``.
        reason: why it is not current ("" when it is).
        earliest: the earliest stage whose rerun would make it current (None when current).
    """

    stage: str
    state: str
    reason: str
    earliest: str | None


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
        make_run_folder(run.root)
        if run.path("config").is_file():
            changed = run.stages_changed_by(config_from_yaml(run.path("config").read_text()))
            if changed:
                log.info("the config differs from %s's: stage(s) %s will rerun", run.root,
                         ", ".join(f"{STAGES[n].number} ({n})" for n in changed))
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

    def stages_changed_by(self, before: ExperimentConfig) -> list[str]:
        """The stages whose config sections differ between ``before`` and this folder's config."""
        return [name for name in STAGES
                if any(_section_hash(before, sec) != _section_hash(self.cfg, sec)
                       for sec in (*_COMMON_SECTIONS, *stage_sections(self.cfg, name),
                                   *stage_sections(before, name)))]

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

    def _sections_used(self, name: str) -> dict[str, Any]:
        """The values of the config sections stage ``name`` runs with (the manifest keeps them per
        stage: what each artefact was made with, whatever ``config.yaml`` says later)."""
        node = _structured(self.cfg)
        out = {}
        for section in (*_COMMON_SECTIONS, *stage_sections(self.cfg, name)):
            value = OmegaConf.select(node, section)
            out[section] = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        return out

    def _input_hashes(self, stage: Stage, inputs: tuple[str, ...] | None = None,
                      extra: tuple[str | os.PathLike, ...] = ()) -> dict[str, str]:
        return {key: self._hash_of(key) for key in self._input_keys(stage, inputs, extra)}

    # -- the checks
    def rerun_hint(self, stage: Stage) -> str:
        """The command that reruns ``stage`` and every stage after it in this folder."""
        last = max(s.number for s in STAGES.values())
        stages = f"{stage.number}-{last}" if stage.number < last else f"{stage.number}"
        return (f"python -m ncis_core run --preset {self.cfg.run.preset} --out {self.root} "
                f"--stages {stages}")

    def stage_state(self, name: str, _memo: dict | None = None) -> StageState:
        """Whether stage ``name``'s outputs are current: complete, unchanged since it wrote them,
        built from the inputs and config in the folder now, **and** every stage upstream of it
        current too. A stale or missing upstream stage makes it stale, naming the earliest one."""
        memo = {} if _memo is None else _memo
        if name in memo:
            return memo[name]
        stage = STAGES[name]
        record = self.manifest().get("stages", {}).get(name, {})
        state = None
        if record.get("status") != "complete":
            state = StageState(name, "missing", "never finished" if record else "not run", name)
        else:
            for artefact in stage.outputs:
                path = self.path(artefact)
                if not path.exists():
                    state = StageState(name, "missing", f"{ARTEFACTS[artefact]} is missing", name)
                    break
                if record.get("outputs", {}).get(artefact) != content_hash(path):
                    state = StageState(name, "stale", f"{ARTEFACTS[artefact]} changed after the stage "
                                                      f"wrote it", name)
                    break
        if state is None:
            recorded = record.get("inputs", {})
            for key in recorded:  # upstream first: the earliest stale stage is the one to rerun
                if key in ARTEFACTS:
                    up = self.stage_state(self._producer(key).name, memo)
                    if up.state != "current":
                        state = StageState(name, "stale", f"stage {STAGES[up.earliest].number} "
                                           f"({up.earliest}) upstream is {up.state}", up.earliest)
                        break
        if state is None:
            changed = [k for k in record.get("inputs", {}) if record["inputs"][k] != self._hash_of(k)]
            state = StageState(name, "stale", "changed since: " + ", ".join(
                ARTEFACTS.get(k, k) for k in changed), name) if changed else StageState(name, "current", "", None)
        memo[name] = state
        return state

    def status(self) -> list[StageState]:
        """:meth:`stage_state` of every stage, in order."""
        memo: dict = {}
        return [self.stage_state(name, memo) for name in STAGES]

    def require(self, artefact: str) -> Path:
        """Path of an input artefact after checking it is present and current, all the way up.

        Raises:
            MissingArtefactError: the artefact is absent (or its stage never finished), or a stage
                upstream of it never ran.
            StaleArtefactError: it was edited after its stage wrote it, or its stage's inputs
                (earlier artefacts, config sections) changed since, or a stage upstream is stale; the
                message names the **earliest** stage to rerun and the command that reruns the chain.
        """
        producer = self._producer(artefact)
        where = f"stage {producer.number} ({producer.name})"
        file = self.path(artefact)
        record = self.manifest().get("stages", {}).get(producer.name, {})
        if not file.exists() or record.get("status") != "complete":
            raise MissingArtefactError(
                f"{ARTEFACTS[artefact]} is missing from {self.root}; run {where} first "
                f"(`{self.rerun_hint(producer)}`)")
        state = self.stage_state(producer.name)
        if state.state == "current":
            return file
        earliest = STAGES[state.earliest]
        first = f"stage {earliest.number} ({earliest.name})"
        hint = f"`{self.rerun_hint(earliest)}`"
        if state.earliest != producer.name:
            error = MissingArtefactError if self.stage_state(earliest.name).state == "missing" else StaleArtefactError
            raise error(f"{ARTEFACTS[artefact]} is not current: {state.reason}; rerun {first} and the "
                        f"stages after it: {hint}")
        if record.get("outputs", {}).get(artefact) != content_hash(file):
            raise StaleArtefactError(
                f"{ARTEFACTS[artefact]} changed after {where} wrote it; rerun {where}: {hint}")
        raise StaleArtefactError(
            f"{ARTEFACTS[artefact]} was built from different inputs than the ones in {self.root} "
            f"now ({state.reason}); rerun {where} and the stages after it: {hint}")

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
        with write_lock(self.root, f"stage {stage.number} ({name})"):
            with self._stage(stage, inputs, extra) as rec:
                yield rec

    @contextlib.contextmanager
    def _stage(self, stage: Stage, inputs: tuple[str, ...] | None,
               extra: tuple[str | os.PathLike, ...]) -> Iterator[StageRecord]:
        name = stage.name
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
            "config": self._sections_used(name), "runs": previous.get("runs", 0) + 1}
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
        self.note_status()

    def note_status(self) -> None:
        """Write every stage's :meth:`stage_state` into the manifest (``"status"``), so that the
        manifest says which stages are current, stale (because of what) or missing."""
        manifest = self.manifest()
        manifest["status"] = {st.stage: {"state": st.state, "reason": st.reason} for st in self.status()}
        self._write_manifest(manifest)

    def format_status(self) -> str:
        """The status table (Markdown): each stage current / stale (because of what) / missing, and
        the command that brings the folder up to date."""
        rows = self.status()
        out = [f"Run folder {self.root} (preset {self.cfg.run.preset})", "",
               "| stage | state | why |", "|---|---|---|"]
        for st in rows:
            stage = STAGES[st.stage]
            out.append(f"| {stage.number} {stage.name} | {st.state} | {st.reason} |")
        todo = [STAGES[st.earliest] for st in rows if st.state != "current" and st.earliest]
        if todo:
            first = min(todo, key=lambda s: s.number)
            out += ["", f"To bring it up to date: `{self.rerun_hint(first)}`"]
        return "\n".join(out) + "\n"

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r}, preset={self.cfg.run.preset!r})"


# ----------------------------------------------------------------------------- one writer at a time
@user_error
class RunFolderBusy(RuntimeError):
    """Another live process is writing the run folder; the message names it."""


@user_error
class RunFolderUnwritable(RuntimeError):
    """The run folder cannot be created or written (it is a file, a read-only or full file system,
    no permission); the message names the path, the reason and the fix."""


def make_run_folder(root: str | os.PathLike) -> Path:
    """Create the run folder ``root`` when missing and check that a file can be written in it (by
    writing one: permission bits say nothing for root, ACLs or a read-only mount), before any work
    starts, so that an unusable ``--out`` is one clear message rather than a traceback mid-run.

    Raises:
        RunFolderUnwritable: ``root`` is a file, cannot be created, or cannot be written.
    """
    from .errors import os_fault_message

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunFolderUnwritable(f"the run folder {root} is a file, not a folder: choose another --out "
                                  f"(a new folder, or an existing run folder)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunFolderUnwritable(os_fault_message(exc, f"the run folder {root}")) from None
    return root


_LOCK_NAME = ".run.lock"
_LOCK_ENV = "NCIS_RUN_LOCK"  # "<folder>::<token>": a process writing under its parent's lock
_held: dict[Path, list] = {}  # folder → [FileLock, depth] held by this process


def _lock_info(root: Path) -> dict:
    try:
        return json.loads((root / f"{_LOCK_NAME}.json").read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def write_lock(root: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the run folder's writer lock while the block runs (re-entrant within a process).

    A second writer fails at once with :class:`RunFolderBusy` naming the holder (PID, command, since
    when). The lock is an OS file lock (``filelock``): it dies with its process, so the lock of a
    killed run is simply taken over. Processes started by the holder (the notebooks' kernels of
    ``run``) inherit a token through the environment and write under their parent's lock.
    """
    from filelock import FileLock, Timeout

    root = Path(root).resolve()
    if root in _held:
        _held[root][1] += 1
        try:
            yield
        finally:
            _held[root][1] -= 1
        return
    inherited = os.environ.get(_LOCK_ENV, "")
    if inherited.startswith(f"{root}::") and _lock_info(root).get("token") == inherited.split("::", 1)[1]:
        yield  # our parent holds it
        return
    make_run_folder(root)
    lock = FileLock(str(root / _LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        info = _lock_info(root)
        raise RunFolderBusy(f"{root} is being written by PID {info.get('pid', '?')} "
                            f"({info.get('command', 'another command')}, since {info.get('started', '?')}); "
                            f"wait for it to finish or stop it, or use another --out") from None
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    atomic_write_json(root / f"{_LOCK_NAME}.json",
                      {"pid": os.getpid(), "command": command, "started": _now(), "token": token})
    _held[root] = [lock, 1]
    previous = os.environ.get(_LOCK_ENV)
    os.environ[_LOCK_ENV] = f"{root}::{token}"
    try:
        yield
    finally:
        del _held[root]
        if previous is None:
            os.environ.pop(_LOCK_ENV, None)
        else:
            os.environ[_LOCK_ENV] = previous
        (root / f"{_LOCK_NAME}.json").unlink(missing_ok=True)
        lock.release()
