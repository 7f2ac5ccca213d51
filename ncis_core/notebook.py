"""Notebook plumbing: :func:`start`, what every notebook's first code cell calls (resolve the
config, open the run folder, set up logging), and :func:`write_notebook`, which the team uses to
create a new numbered notebook output-free.

Notebooks carry a ``parameters`` cell (``preset``, ``run_dir``, ``overrides``) and then call
:func:`start`. Relative paths in the config (dataset roots, the run folder) are relative to the
project folder (:func:`ncis_core.assets.project_dir`): the repository checkout when the package runs
from one, so :func:`start` makes it the working directory and a notebook opened from
``notebooks/`` in JupyterLab and one executed by papermill see the same files; for an installed
copy, the working directory (the runner's, or the folder a notebook was opened from).

Example (a notebook's first cell would say ``start(preset, run_dir, overrides)`` with the values
of its parameters cell, e.g. ``"smoke", "outputs/smoke", []``):
    >>> import tempfile
    >>> cfg, run = start("smoke", tempfile.mkdtemp(), ["cvpn.epochs=3"])
    >>> cfg.run.preset, cfg.cvpn.epochs, str(run.root) == cfg.run.out
    ('smoke', 3, True)
    >>> sorted(p.name for p in run.root.iterdir())
    ['config.yaml', 'manifest.json']
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .assets import project_dir
from .config import ExperimentConfig, load_run_config
from .runs import RunDir

__all__ = ["start", "write_notebook", "notebook_has_outputs", "strip_outputs"]

log = logging.getLogger("ncis_core")


def start(preset: str, run_dir: str, overrides: list[str] | tuple[str, ...] = ()
          ) -> tuple[ExperimentConfig, RunDir]:
    """Resolve ``preset`` + ``overrides`` into the config of the run folder ``run_dir`` and open it.

    Args:
        preset: preset name.
        run_dir: the run folder; a relative path is taken from the project folder (the
            repository checkout, or the working directory for an installed copy).
        overrides: ``stage.key=value`` strings.

    Returns:
        ``(cfg, run)``: the frozen config and the :class:`~ncis_core.runs.RunDir`.
    """
    root = project_dir()
    if Path.cwd() != root:
        os.chdir(root)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(run_dir)
    out = out if out.is_absolute() else root / out
    cfg = load_run_config(preset, list(overrides), out=str(out))
    run = RunDir.create(cfg)
    log.info("preset %s → run folder %s", preset, out)
    return cfg, run


def write_notebook(path: str | os.PathLike, cells: list[tuple]) -> None:
    """Write an output-free notebook from ``(kind, source[, tags])`` cells (``kind``: md | code).

    For creating a new stage notebook from a script; afterwards edit it in JupyterLab and keep it
    output-free (``make strip``).
    """
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
