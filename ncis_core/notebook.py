"""Notebook plumbing: :func:`start`, every notebook's first call (config, run folder, logging), and
helpers that write and strip output-free notebooks.

    >>> import tempfile
    >>> cfg, run = start("smoke", tempfile.mkdtemp(), ["cvpn.epochs=3"])
    >>> cfg.cvpn.epochs, sorted(p.name for p in run.root.iterdir())
    (3, ['config.yaml', 'manifest.json'])
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .assets import project_dir
from .config import ExperimentConfig, load_run_config
from .progress import HEADLESS_ENV, headless as _headless
from .runs import RunDir

__all__ = ["start", "notebook_folder", "write_notebook", "notebook_has_outputs", "strip_outputs"]

log = logging.getLogger("ncis_core")

# set by the runner for its kernels: the executed copy's path, and "headless" (bars off, log to RUN/logs/)
NOTEBOOK_ENV = "NCIS_NOTEBOOK"
# An executed copy's run_dir: the folder above its own folder RUN/notebooks/, i.e. RUN.
RUN_DIR_OF_A_COPY = ".."

try:  # where the kernel started: Jupyter and nbconvert start it in the notebook's folder
    _STARTED_IN: Path | None = Path.cwd()
except OSError:
    _STARTED_IN = None


def _is_run_notebooks(folder: Path | None) -> bool:
    """Whether ``folder`` is a run folder's ``notebooks/`` (its parent holds a ``config.yaml``)."""
    return folder is not None and folder.name == "notebooks" and (folder.parent / "config.yaml").is_file()


def notebook_folder() -> Path | None:
    """The folder of the notebook this kernel runs when that is a run folder's ``notebooks/``, else None.

    From ``$NCIS_NOTEBOOK``, ``$JPY_SESSION_NAME``, or the folder the kernel started in.
    """
    candidates = [Path(os.environ[name]).parent for name in (NOTEBOOK_ENV, "JPY_SESSION_NAME")
                  if os.environ.get(name) and Path(os.environ[name]).is_absolute()]
    for folder in (*candidates, _STARTED_IN):
        if _is_run_notebooks(folder):
            return folder
    return None


def start(preset: str, run_dir: str, overrides: list[str] | tuple[str, ...] = ()
          ) -> tuple[ExperimentConfig, RunDir]:
    """``(cfg, run)``: ``preset`` + ``overrides`` resolved for the run folder ``run_dir``, opened.

    Args:
        run_dir: the run folder; ``".."``: the one the notebook sits in (ValueError where unknown).
    """
    root = project_dir()
    here = notebook_folder()
    if Path.cwd() != root:
        os.chdir(root)
    headless = _headless()
    if not headless and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(run_dir).expanduser()
    if str(run_dir).rstrip("/") == RUN_DIR_OF_A_COPY:
        if here is None:
            raise ValueError(
                f"run_dir={run_dir!r} is the run folder an executed notebook sits in (RUN/notebooks/ → RUN), "
                f"but this kernel does not run inside a run folder's notebooks/ (it started in {_STARTED_IN}): "
                f"open the notebook there (JupyterLab, `jupyter nbconvert --execute` do; papermill: "
                f"`--cwd RUN/notebooks`), or set run_dir to the run folder")
        out = here.parent
    elif not out.is_absolute():
        out = root / out
    cfg = load_run_config(preset, list(overrides), out=str(out))
    run = RunDir.create(cfg)
    if headless:
        log_file = _log_to_run_folder(run)
        print(f"preset {preset}, run folder {out}; log: {log_file}")
    else:
        log.info("preset %s → run folder %s", preset, out)
    return cfg, run


_HANDLERS: list[logging.Handler] = []  # what _log_to_run_folder installed (a second start() replaces them)


def _log_to_run_folder(run: RunDir) -> Path:
    """Headless logging: INFO and above into ``RUN/logs/<notebook>.log``, warnings also to stderr."""
    name = Path(os.environ.get(NOTEBOOK_ENV) or "notebook").stem
    folder = run.path("logs")
    folder.mkdir(parents=True, exist_ok=True)
    log_file = folder / f"{name}.log"
    root_logger, kit = logging.getLogger(), logging.getLogger("ncis_core")
    for handler in _HANDLERS:
        handler.close()
        root_logger.removeHandler(handler)
        kit.removeHandler(handler)
    _HANDLERS.clear()
    to_file = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    shown = logging.StreamHandler()  # sys.stderr: the notebook's stderr stream
    shown.setLevel(logging.WARNING)
    shown.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root_logger.addHandler(to_file)
    root_logger.setLevel(logging.INFO)
    kit.addHandler(shown)
    _HANDLERS.extend([to_file, shown])
    return log_file


def write_notebook(path: str | os.PathLike, cells: list[tuple]) -> None:
    """Write an output-free notebook from ``(kind, source[, tags])`` cells (``kind``: md | code)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, source, *tags in cells:
        make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
        cell = make(source)
        if tags:
            cell.metadata["tags"] = list(tags[0])
        nb.cells.append(cell)
    nbformat.write(nb, str(path))


def notebook_has_outputs(path: str | os.PathLike) -> bool:
    """True when any code cell of the notebook carries outputs or an execution count."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    return any(c.get("outputs") or c.get("execution_count")
               for c in nb.cells if c.cell_type == "code")


def strip_outputs(path: str | os.PathLike) -> bool:
    """Remove outputs and execution counts in place; return True when the file changed."""
    import nbformat

    if not notebook_has_outputs(path):
        return False
    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, str(path))
    return True
