"""The run folder: artefact paths, atomic writes, the manifest, and the stale-input check.

:class:`RunDir` holds ``config.yaml``, ``manifest.json`` (versions, git commit, seed; per stage its times
and the hashes of what it read and wrote) and the artefacts of the stage table :data:`STAGES`;
:meth:`RunDir.stage` refuses missing or stale inputs, naming the stage to rerun, and skips finished work.
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
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

from omegaconf import OmegaConf

from .errors import user_error
from .config import ExperimentConfig, config_from_yaml, config_to_yaml, memo_by_content

__all__ = [
    "ARTEFACTS",
    "STAGES",
    "Stage",
    "producer",
    "method_inputs",
    "sampled_by_stage3",
    "outlier_image_folder",
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
    # another outlier method's images (rendered by compare)
    "method_outliers_dir": "outliers_{method}",
    "classifier_dir": "classifier",
    "classifier_best": "classifier/best.safetensors",
    "classifier_history": "classifier/history.json",
    "results_dir": "results",
    "metrics_json": "results/metrics.json",
    "metrics_csv": "results/metrics.csv",
    "table_md": "results/table.md",
    "scores_npz": "results/scores.npz",
    "compare_dir": "compare",
    "figures": "figures",
    "notebooks": "notebooks",
    # a headless run's log, one file per notebook
    "logs": "logs",
    # derived results kept between commands, keyed by cache_key; never a stage's input
    "cache_dir": "cache",
}


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, a row of :data:`STAGES`: its number (= notebook), the config sections (or
    ``section.key``) and :data:`ARTEFACTS` its outputs depend on, what it writes (first = "done"), and
    ``inputs_for`` / ``sections_for`` (``cfg -> ...``) where the config decides."""

    number: int
    name: str
    config_sections: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    inputs_for: Callable[[ExperimentConfig], tuple[str, ...]] | None = None
    sections_for: Callable[[ExperimentConfig], tuple[str, ...]] | None = None
    module: str = ""


def method_inputs(cfg: ExperimentConfig, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(artefacts, config sections)`` that outlier method ``name``'s outlier embeddings depend on."""
    from .outliers.base import get_method

    method = get_method(name)
    artefacts = tuple(a for need, a in (("embeddings", "embeddings"), ("cvpn", "cvpn_best"))
                      if need in method.needs)
    sections = ("sample", "cvpn.holdout_fraction") + (
        ("diffusion", "embed.resolution") if "class_token_rows" in method.needs else ())
    return artefacts, sections


def _sample_inputs(cfg: ExperimentConfig) -> tuple[str, ...]:
    return method_inputs(cfg, cfg.sample.method)[0]  # the cVPN only for a method that needs it


def _sample_sections(cfg: ExperimentConfig) -> tuple[str, ...]:
    return method_inputs(cfg, cfg.sample.method)[1]  # e.g. the generator for the class tokens' rows


def _classifier_inputs(cfg: ExperimentConfig) -> tuple[str, ...]:
    # stage 4's tree only for stage 3's method's outliers (others: outside paths, train_classifier.run)
    return ("outliers_dir",) if cfg.classifier.outliers == cfg.sample.method else ()


def _classifier_sections(cfg: ExperimentConfig) -> tuple[str, ...]:
    # the generated-looking ID images come from the generator at stage 1's resolution
    return ("diffusion", "embed.resolution") if cfg.classifier.id_generated != "none" else ()


# The stage contracts (DESIGN.md's table), in stage order; stage 7 (the explorer) is a view, not a stage.
STAGES: Mapping[str, Stage] = MappingProxyType({stage.name: stage for stage in (
    Stage(0, "data", ("data",), (), ("data_summary",), module="data_summary"),
    Stage(1, "embed", ("data", "diffusion", "embed"), (), ("embeddings",), module="embed"),
    Stage(2, "cvpn", ("cvpn",), ("embeddings",), ("cvpn_best", "cvpn_history"), module="train_cvpn"),
    Stage(3, "sample", ("sample",), ("embeddings", "cvpn_best"), ("outlier_embeddings",),
          inputs_for=_sample_inputs, sections_for=_sample_sections, module="sample"),
    Stage(4, "generate", ("diffusion", "generate"), ("outlier_embeddings",), ("outliers_dir",),
          module="generate"),
    Stage(5, "classifier", ("data", "classifier"), ("outliers_dir",), ("classifier_best", "classifier_history"),
          inputs_for=_classifier_inputs, sections_for=_classifier_sections, module="train_classifier"),
    Stage(6, "evaluate", ("data", "evaluate"), ("classifier_best",), ("metrics_json", "metrics_csv", "table_md"),
          module="evaluate"),
)})


def producer(artefact: str) -> Stage:
    """The stage that writes ``artefact``."""
    for stage in STAGES.values():
        if artefact in stage.outputs:
            return stage
    raise KeyError(artefact)


def stage_inputs(cfg: ExperimentConfig, name: str) -> tuple[str, ...]:
    """The artefacts stage ``name`` reads under ``cfg`` (its ``inputs_for``, else its ``inputs``)."""
    stage = STAGES[name]
    return tuple(stage.inputs_for(cfg)) if stage.inputs_for is not None else stage.inputs


def stage_sections(cfg: ExperimentConfig, name: str) -> tuple[str, ...]:
    """The config sections stage ``name``'s outputs depend on under ``cfg`` (own and ``sections_for``'s)."""
    stage = STAGES[name]
    extra = tuple(stage.sections_for(cfg)) if stage.sections_for is not None else ()
    return tuple(dict.fromkeys((*stage.config_sections, *extra)))


# ----------------------------------------------------------------------------- each method's outliers
def sampled_by_stage3(cfg: ExperimentConfig, name: str) -> bool:
    """True when ``name`` is the method whose outliers stages 3 and 4 make (``sample.method``)."""
    return name == cfg.sample.method


def outlier_image_folder(cfg: ExperimentConfig, run: "RunDir", name: str | None = None,
                         require: bool = True) -> Path | None:
    """Method ``name``'s image folder (default ``classifier.outliers``); None for a method without images.

    Raises:
        MissingArtefactError / StaleArtefactError: stage 4's tree is missing or stale (``require``).
        FileNotFoundError: another method's images were not rendered yet (the message says how).
    """
    from .outliers.base import EMBEDDINGS, NOTHING, get_method

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


# Config sections every stage depends on (the seed changes every random draw).
_COMMON_SECTIONS = ("run.seed",)


@user_error
class MissingArtefactError(FileNotFoundError):
    """An input artefact is not in the run folder; the message names the stage that makes it."""


@user_error
class StaleArtefactError(RuntimeError):
    """An artefact was built from other inputs than the folder's now; the message names the stage to rerun."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (for libraries that write to a path themselves); rename it
    onto ``path`` on success, remove it on an exception. It gets a new file's permissions, not ``0600``."""
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
    """The process's umask, from ``/proc/self/status`` where Linux gives it, else set and restored."""
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
    """Write ``tensors`` (name → tensor) and ``metadata`` (str → str) as safetensors, atomically, with the
    same bytes for the same tensors and metadata (the header's keys sorted)."""
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
    """SHA-256 of a file's bytes or of a folder (relative paths and bytes, sorted; ``.*.tmp`` ignored)."""
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
    """Installed versions of ``names`` (default: packages that shape a run's numbers); None when absent."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the kit's checkout (or ``repo``); None without a git checkout."""
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
        inputs: name → :func:`content_hash` of every file the result was read from.
        config: everything else, JSON-serialisable (dataclasses converted, other objects by ``str``).

    >>> cache_key({"e": "a"}, {"k": 3}) == cache_key({"e": "a"}, {"k": 3}) != cache_key({"e": "a"}, {"k": 4})
    True
    """
    def plain(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return str(value)

    payload = {"inputs": dict(inputs), "config": config, "versions": package_versions(tuple(versions))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=plain).encode()).hexdigest()[:24]


def cache_path(root: str | os.PathLike, kind: str, key: str, suffix: str = "") -> Path:
    """``<run>/cache/<kind>/<key><suffix>`` (folder created): where every cache of the kit lives."""
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
    """What :meth:`RunDir.stage` hands to a stage: ``done`` (outputs current: skip the work),
    ``resumable`` (partial work from the same inputs may be reused) and ``info`` (values for the manifest)."""

    stage: Stage
    done: bool
    resumable: bool
    info: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class StageState:
    """What :meth:`RunDir.stage_state` says: ``state`` (``current``, ``stale`` or ``missing``), the ``reason``
    ("" when current) and the ``earliest`` stage whose rerun would make it current (None when current)."""

    stage: str
    state: str
    reason: str
    earliest: str | None


class RunDir:
    """The run folder ``root`` and its config; :meth:`create` writes them, :meth:`open` reads them."""

    def __init__(self, root: str | os.PathLike, cfg: ExperimentConfig):
        self.root = Path(root)
        self.cfg = cfg

    # -- construction
    @classmethod
    def create(cls, cfg: ExperimentConfig, root: str | os.PathLike | None = None) -> "RunDir":
        """Make (or reuse, even with another config) the folder ``cfg.run.out``; write config and manifest."""
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
        """Absolute path of an artefact (:data:`ARTEFACTS`); ``fields`` fill a pattern (``method=...``)."""
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

    def producer(self, artefact: str) -> Stage:
        """The stage that writes ``artefact`` (:func:`producer`)."""
        return producer(artefact)

    def _hash_of(self, key: str) -> str:
        """The current hash of a recorded input: ``config:<section>``, an artefact or ``path:<outside>``."""
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
        """The values of the config sections stage ``name`` runs with (kept per stage in the manifest)."""
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
        """Whether stage ``name``'s outputs are current: complete, unchanged, made from the folder's inputs
        and config now, and every stage upstream current (else stale, naming the earliest)."""
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
                    up = self.stage_state(self.producer(key).name, memo)
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
            MissingArtefactError: it is absent, its stage never finished, or a stage upstream never ran.
            StaleArtefactError: it or its inputs changed since; the message names the earliest stage to rerun.
        """
        producer = self.producer(artefact)
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
        """Run a stage: check its inputs, say whether it is done, record hashes and times on a clean exit.

        Args:
            inputs: the artefacts this run reads, where the config decides (default: the stage's own).
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
        """Write every stage's :meth:`stage_state` into the manifest's ``"status"``."""
        manifest = self.manifest()
        manifest["status"] = {st.stage: {"state": st.state, "reason": st.reason} for st in self.status()}
        self._write_manifest(manifest)

    def format_status(self) -> str:
        """The status table (Markdown) of every stage and the command that brings the folder up to date."""
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
    """The run folder cannot be created or written; the message names the path, the reason and the fix."""


def make_run_folder(root: str | os.PathLike) -> Path:
    """Create the run folder ``root`` when missing and check, by writing a file, that it is writable
    (else :class:`RunFolderUnwritable`)."""
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
    """Hold the run folder's writer lock while the block runs (re-entrant; child processes inherit it);
    a second writer fails at once with :class:`RunFolderBusy`."""
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
