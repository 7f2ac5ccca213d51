"""The files the package ships besides its code (``notebooks/``, ``data/demo/generator/``,
``data/sd14_configs/``) under their repository paths, found through :mod:`importlib.resources`.

    >>> (path("data/demo/generator") / "model_index.json").is_file()
    True
    >>> resolve("no/such/folder") is None
    True
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path, PurePath

__all__ = ["files", "path", "resolve", "notebooks_dir", "checkout_root", "project_dir"]


def files() -> Path:
    """The folder of the shipped files (this package's folder), as a filesystem path."""
    root = resources.files(__name__)
    if not isinstance(root, Path):  # e.g. imported from a zip archive: from_pretrained needs folders
        raise RuntimeError(f"ncis_core must be installed as files on disk, not from {root}")
    return root


def path(relative: str | os.PathLike) -> Path:
    """The shipped file or folder at the repository-relative path ``relative`` (it may not exist)."""
    parts = PurePath(relative).parts
    if PurePath(relative).is_absolute() or ".." in parts:
        raise ValueError(f"{relative!r}: a shipped file is named by a relative path without '..'")
    return files().joinpath(*parts)


def resolve(source: str | os.PathLike) -> Path | None:
    """``source`` as an existing path: as given, else as a shipped file (:func:`path`), else None."""
    given = Path(source).expanduser()
    if given.exists():
        return given
    if given.is_absolute() or ".." in given.parts:
        return None
    shipped = path(given)
    return shipped if shipped.exists() else None


def notebooks_dir() -> Path:
    """The folder of the numbered notebooks (``NN_<stage>.ipynb``) that the runner executes."""
    return path("notebooks")


def checkout_root() -> Path | None:
    """The repository checkout this package is imported from, or None for an installed copy."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def project_dir() -> Path:
    """Where a run's relative paths start: the repository checkout, else the working directory."""
    return checkout_root() or Path.cwd()
