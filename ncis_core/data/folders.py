"""Datasets of image files on disk: a file scanner and :class:`ImageFolderFiles`.

Shared by ImageNet-100 and the folder-of-images OOD sets; images are read where they lie. An
unreadable file raises :class:`~ncis_core.data.base.DataError` when accessed, or with
``skip_unreadable`` is dropped at build time (a warning, ``.skipped``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .base import DataError, ImageDataset, Transform
from .transforms import to_rgb_uint8

__all__ = ["IMAGE_EXTENSIONS", "list_images", "is_readable", "ImageFolderFiles"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(root: str | Path, recursive: bool = True) -> list[Path]:
    """The image files under ``root`` (:data:`IMAGE_EXTENSIONS`, any case, no hidden ones), sorted by path."""
    root = Path(root)
    found: list[Path] = []
    if recursive:
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found.extend(Path(folder) / f for f in files
                         if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    else:
        found = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                 and p.name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=str)


def is_readable(path: str | Path) -> bool:
    """Whether PIL can open ``path`` and its data passes ``Image.verify`` (no full decode)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises many kinds (OSError, SyntaxError, ValueError …)
        return False


class ImageFolderFiles(ImageDataset):
    """Images read from files with PIL and converted to RGB ``uint8``.

    Args:
        skip_unreadable: drop unreadable files now (``.skipped``); else DataError when accessed.
    """

    def __init__(self, paths: Sequence[str | Path], labels: Sequence[int],
                 transform: Transform | None = None, skip_unreadable: bool = False):
        paths = [Path(p) for p in paths]
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(paths):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.skipped: list[Path] = []
        if skip_unreadable and paths:
            keep = np.array([is_readable(p) for p in paths], dtype=bool)
            self.skipped = [p for p, ok in zip(paths, keep) if not ok]
            if self.skipped:
                log.warning("skipped %d unreadable image file(s) of %d (first: %s)",
                            len(self.skipped), len(paths), self.skipped[0])
            paths = [p for p, ok in zip(paths, keep) if ok]
            labels = labels[keep]
        self.paths = paths
        self.labels = labels
        self.transform = transform

    def _load(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return to_rgb_uint8(image)
        except Exception as exc:
            raise DataError(
                f"cannot read image file {path}: {exc}. Replace or delete the file, or set "
                f"data.skip_unreadable=true to skip unreadable files (they are counted and logged)."
            ) from exc
