"""ImageNet-100: the 100 classes of CLASSES.md read in place from an ImageNet folder tree.

An index (paths + labels, optionally cached as JSON) over ``<root>/{train,val}/<wnid>/*``; label
``i`` is the ``i``-th wnid of :data:`~ncis_core.data.classes.IMAGENET100_WNIDS`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

from .base import DataError, Transform
from .classes import IMAGENET100_NAMES, IMAGENET100_WNIDS
from .folders import ImageFolderFiles, list_images

__all__ = ["IMAGENET100_LAYOUT", "IMAGENET100_SOURCE", "ImageNet100", "ImageFolderFiles",
           "scan_imagenet"]

log = logging.getLogger(__name__)

IMAGENET100_LAYOUT = ("<data.root>/train/<wnid>/*.JPEG and <data.root>/val/<wnid>/*.JPEG (the "
                      "usual ImageNet-1k folder tree, validation images sorted into one folder per "
                      "wnid); only the 100 wnids listed in ncis_core/data/classes.py are read")
IMAGENET100_SOURCE = ("ILSVRC-2012 from https://image-net.org/download.php (free registration): "
                      "ILSVRC2012_img_train.tar (one inner tar per wnid) and ILSVRC2012_img_val.tar "
                      "(flat; sort it into wnid folders with the usual valprep script)")

_NAME_OF = dict(zip(IMAGENET100_WNIDS, IMAGENET100_NAMES))
_CACHE_FORMAT = 1


def _error(what: str) -> DataError:
    return DataError(f"ImageNet-100 not found: {what}. Expected layout: {IMAGENET100_LAYOUT}. "
                     f"Get it from {IMAGENET100_SOURCE}, and point the config key data.root at the "
                     f"folder holding train/ and val/.")


def scan_imagenet(root: str | Path, split: str, wnids: Sequence[str] = IMAGENET100_WNIDS
                  ) -> tuple[list[Path], list[int]]:
    """Paths and labels of ``<root>/<split>/<wnid>/*`` for ``wnids`` (label = index in ``wnids``).

    Raises:
        DataError: the root or split folder is missing, or some wnid folders are missing or empty.
    """
    if not str(root).strip():
        raise _error("data.root is empty")
    root = Path(root)
    if not root.is_dir():
        raise _error(f"the folder {str(root)!r} does not exist")
    folder = root / split
    if not folder.is_dir():
        raise _error(f"{folder} does not exist")
    paths: list[Path] = []
    labels: list[int] = []
    missing: list[str] = []
    for label, wnid in enumerate(wnids):
        files = list_images(folder / wnid, recursive=False) if (folder / wnid).is_dir() else []
        if not files:
            missing.append(wnid)
        paths.extend(files)
        labels.extend([label] * len(files))
    if missing:
        first = ", ".join(missing[:5]) + (", …" if len(missing) > 5 else "")
        raise _error(f"{len(missing)} of the {len(wnids)} class folders are missing or empty under "
                     f"{folder} (first: {first})")
    return paths, labels


def _read_cache(path: Path, root: Path, split: str, wnids: list[str]):
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (cache.get("format") != _CACHE_FORMAT or cache.get("root") != str(root.resolve())
            or cache.get("split") != split or cache.get("wnids") != wnids):
        return None
    return [root / rel for rel, _ in cache["files"]], [int(label) for _, label in cache["files"]]


def _write_cache(path: Path, root: Path, split: str, wnids: list[str], paths, labels) -> None:
    files = [[str(p.relative_to(root)), int(label)] for p, label in zip(paths, labels)]
    cache = {"format": _CACHE_FORMAT, "root": str(root.resolve()), "split": split,
             "wnids": wnids, "files": files}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


class ImageNet100(ImageFolderFiles):
    """The ImageNet-100 subset (100 wnids) of an ImageNet folder tree, read in place.

    Args:
        root: the ImageNet folder holding ``train/`` and ``val/`` (``data.root``).
        skip_unreadable: drop files that fail ``PIL.Image.verify`` (listed in ``.skipped``).
        max_per_class: keep the first (sorted) files of each class; ``None``: all.
        index_cache: a JSON file caching the scan (reused for the same root, split and wnids).

    Raises:
        DataError: the tree is missing or incomplete.
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None,
                 skip_unreadable: bool = False, *, max_per_class: int | None = None,
                 wnids: Sequence[str] = IMAGENET100_WNIDS,
                 index_cache: str | Path | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        wnids = list(wnids)
        index = None
        if index_cache is not None and Path(index_cache).is_file() and str(root).strip():
            index = _read_cache(Path(index_cache), Path(root), split, wnids)
            if index is not None:
                log.debug("ImageNet-100 %s: index read from %s", split, index_cache)
        if index is None:
            index = scan_imagenet(root, split, wnids)
            if index_cache is not None:
                _write_cache(Path(index_cache), Path(root), split, wnids, *index)
        paths, labels = index
        if max_per_class is not None:
            seen: dict[int, int] = {}
            keep = []
            for i, label in enumerate(labels):
                seen[label] = seen.get(label, 0) + 1
                if seen[label] <= max_per_class:
                    keep.append(i)
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        super().__init__(paths, labels, transform, skip_unreadable)
        self.wnids = wnids
        self.classes = [_NAME_OF.get(w, w) for w in wnids]
        self.split = split
        log.debug("ImageNet-100 %s: %d images from %s", split, len(self), root)
