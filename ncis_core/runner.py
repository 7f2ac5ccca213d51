"""Run the numbered notebook series (``notebooks/NN_*.ipynb``, shipped in the package) headlessly
with papermill into ``<run>/notebooks/``; the first failing notebook stops it (:class:`NotebookFailed`).

    >>> sorted(parse_stages("0,2-3")), parse_stages("all")
    ([0, 2, 3], None)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import re
from pathlib import Path
from typing import Iterator

from .errors import user_error
from .assets import notebooks_dir, project_dir
from .config import load_run_config
from .notebook import HEADLESS_ENV, NOTEBOOK_ENV, RUN_DIR_OF_A_COPY
from .runs import ARTEFACTS, STAGES, RunDir, stage_inputs, write_lock

__all__ = ["NOTEBOOK_DIR", "VIEW_INPUTS", "NotebookFailed", "notebook_series", "parse_stages", "run_series"]

log = logging.getLogger(__name__)

NOTEBOOK_DIR = notebooks_dir()
_NUMBERED = re.compile(r"^(\d\d)_[\w-]+\.ipynb$")

# Notebooks that are not stages, by number → the artefacts they read (keys of runs.ARTEFACTS).
VIEW_INPUTS: dict[int, tuple[str, ...]] = {
    7: ("embeddings", "outlier_embeddings", "outliers_dir"),  # 07_explore: the class explorer
}


@user_error
class NotebookFailed(RuntimeError):
    """A notebook of the series raised; the message says which notebook and cell, and why."""


def notebook_series(folder: str | os.PathLike = NOTEBOOK_DIR) -> list[tuple[int, Path]]:
    """``[(stage number, path), …]`` of the numbered notebooks in ``folder``, in order."""
    found = []
    for path in Path(folder).glob("*.ipynb"):
        match = _NUMBERED.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def parse_stages(spec: str | None) -> set[int] | None:
    """``"1-6"``, ``"0,2-3"`` or ``"4"`` → a set of stage numbers; None or ``"all"`` → None (all)."""
    if spec is None or spec.strip() in ("", "all"):
        return None
    numbers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad --stages {spec!r}: use e.g. 1-6, 0,2-3 or 4")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"bad --stages {spec!r}: {part} is an empty range")
        numbers.update(range(lo, hi + 1))
    return numbers


def _describe_failure(exc: Exception, notebook: str, executed: Path) -> str:
    index = getattr(exc, "cell_index", None)
    ename, evalue = getattr(exc, "ename", type(exc).__name__), getattr(exc, "evalue", str(exc))
    source = (getattr(exc, "source", "") or "").strip().splitlines()
    # Cells are counted from 1 in the executed copy (papermill inserts an injected-parameters cell).
    where = f"cell {index + 1} of the executed copy" if index is not None else "a cell"
    if source:
        where += f" (starting `{source[0][:80]}`)"
    return f"{notebook} failed in {where}: {ename}: {evalue}\nexecuted copy: {executed}"


def run_series(preset: str, out: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
               stages: str | None = None, notebooks: str | os.PathLike = NOTEBOOK_DIR,
               kernel_name: str | None = None, progress: bool = True) -> list[Path]:
    """Execute the notebook series on ``preset`` into the run folder ``out``; the executed paths.

    Args:
        stages: which stages to run (``"1-6"``, ``"0,2"``); None runs every notebook present.
        kernel_name: Jupyter kernel; None uses the notebook's own (``python3``).

    Raises:
        NotebookFailed: a notebook raised; the series stops there.
    """
    import papermill  # heavy import: only when a series actually runs
    from papermill.exceptions import PapermillExecutionError

    cfg = load_run_config(preset, list(overrides), out=str(out))
    # one writer per run folder; the notebooks' kernels write under this process's lock
    with write_lock(cfg.run.out, f"run --stages {stages or 'all'} (PID {os.getpid()})"):
        return _run_series(cfg, preset, out, overrides, stages, notebooks, kernel_name, progress,
                           papermill, PapermillExecutionError)


def _run_series(cfg, preset, out, overrides, stages, notebooks, kernel_name, progress, papermill,
                PapermillExecutionError) -> list[Path]:
    run = RunDir.create(cfg)
    wanted = parse_stages(stages)
    series = [(n, p) for n, p in notebook_series(notebooks) if wanted is None or n in wanted]
    if not series:
        raise NotebookFailed(f"no notebooks for stages {stages!r} in {notebooks}")
    out_dir = run.path("notebooks")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp.ipynb"):
        stale.unlink()  # the copy in progress of a killed run (this process holds the folder's lock)
    # the run folder the executed copy sits in, whatever its path later (ncis_core.notebook.start)
    parameters = {"preset": preset, "run_dir": RUN_DIR_OF_A_COPY, "overrides": list(overrides)}
    available = {n for n, _ in notebook_series(notebooks)}
    skipped: set[int] = set()
    executed = []
    for number, path in series:
        target = out_dir / path.name
        reason = _unbuilt_input(run, number, available - skipped)
        if reason:
            log.warning("stage %d: %s skipped: %s", number, path.name, reason)
            run.note("notebooks", path.name, {"status": "skipped", "reason": reason})
            skipped.add(number)
            continue
        log.info("stage %d: executing %s", number, path.name)
        started = _dt.datetime.now(_dt.timezone.utc)
        partial = out_dir / f".{path.stem}.{os.urandom(4).hex()}.tmp.ipynb"
        try:
            with _kernel_environment(target):
                papermill.execute_notebook(
                    str(path), str(partial), parameters=parameters, kernel_name=kernel_name,
                    progress_bar=progress, cwd=str(project_dir()))
        except PapermillExecutionError as exc:
            if partial.exists():
                os.replace(partial, target)
            _record(run, path.name, started, "failed")
            raise NotebookFailed(_describe_failure(exc, path.name, target)) from None
        except BaseException as exc:  # e.g. a full disk while papermill writes the copy
            partial.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.filename in (None, str(partial)):
                exc.filename = str(target)  # name the notebook, not the hidden copy
            raise
        os.replace(partial, target)
        _record(run, path.name, started, "complete")
        executed.append(target)
    return executed


@contextlib.contextmanager
def _kernel_environment(notebook: Path) -> Iterator[None]:
    """The variables the notebook's kernel inherits (it is started with this process's environment)."""
    # absolute: `make demo` names a relative run folder, and the kernel resolves only absolute paths
    values = {NOTEBOOK_ENV: str(Path(notebook).resolve()), HEADLESS_ENV: "1"}
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        values[name] = os.environ.get(name, "error")
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _unbuilt_input(run: RunDir, number: int, available: set[int]) -> str | None:
    """Why stage ``number`` cannot run: an input is missing and its stage has no notebook; else None."""
    stage = next((s for s in STAGES.values() if s.number == number), None)
    for artefact in stage_inputs(run.cfg, stage.name) if stage else VIEW_INPUTS.get(number, ()):
        producer = next(s for s in STAGES.values() if artefact in s.outputs)
        if not run.path(artefact).exists() and producer.number not in available:
            return (f"it needs {ARTEFACTS[artefact]} from stage {producer.number} ({producer.name}), "
                    f"which cannot run yet (no notebook for it or for a stage before it)")
    return None


def _record(run: RunDir, notebook: str, started: _dt.datetime, status: str) -> None:
    run.note("notebooks", notebook, {
        "status": status, "started": started.isoformat(timespec="seconds"),
        "ended": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
