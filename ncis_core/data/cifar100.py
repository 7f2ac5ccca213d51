"""CIFAR-100 from the official python archive (``cifar-100-python.tar.gz``, extracted).

Its pickles are read with a restricted unpickler that builds only plain containers and numpy arrays.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from .base import DataError, ImageDataset, Transform
from .classes import CIFAR100_SHORT

__all__ = ["CIFAR100_LAYOUT", "CIFAR100_SOURCE", "CIFAR100"]

log = logging.getLogger(__name__)

CIFAR100_LAYOUT = "<data.root>/cifar-100-python/{train,test,meta}"
CIFAR100_SOURCE = ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it inside "
                   "data.root, so that <data.root>/cifar-100-python/ exists)")

# numpy arrays and dtypes (Python 2 or 3, numpy 1 or 2) and protocol 2's latin-1 bytes; nothing else
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _missing(root: Path, what: str) -> DataError:
    return DataError(
        f"CIFAR-100 not found: {what}. Expected layout: {CIFAR100_LAYOUT} (the official python "
        f"archive). Get it from {CIFAR100_SOURCE}, and point the config key data.root at the "
        f"folder holding cifar-100-python/.")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official pickles were written by Python 2 (keys b"data" …).
            return _SafeUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"cannot read the CIFAR-100 file {path}: {exc}. Expected the official "
                        f"python archive from {CIFAR100_SOURCE}.") from exc


class CIFAR100(ImageDataset):
    """CIFAR-100 (fine labels) as ``32 × 32 × 3`` ``uint8`` RGB images.

    Args:
        root: the folder holding ``cifar-100-python/`` (``data.root``).

    Attributes:
        fine_label_names: the archive's own class names (``apple``, ``aquarium_fish`` …).
        classes: the kit's short names (:data:`~ncis_core.data.classes.CIFAR100_SHORT`).
    """

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not str(root).strip():
            raise _missing(Path(), "data.root is empty")
        root = Path(root)
        folder = root / "cifar-100-python"
        if not root.is_dir():
            raise _missing(root, f"the folder {str(root)!r} does not exist")
        for name in (split, "meta"):
            if not (folder / name).is_file():
                raise _missing(root, f"{folder / name} is missing")
        batch = _read_pickle(folder / split)
        meta = _read_pickle(folder / "meta")
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"fine_labels"], dtype=np.int64)
            filenames = [_text(name) for name in batch.get(b"filenames", [])]
            names = [_text(name) for name in meta[b"fine_label_names"]]
        except KeyError as exc:
            raise DataError(f"{folder / split} or {folder / 'meta'} lacks the key {exc}; expected "
                            f"the official python archive from {CIFAR100_SOURCE}.") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"{folder / split}: expected N×3072 data and N labels, got "
                            f"{data.shape} and {len(labels)}")
        if len(names) != 100 or labels.size and not 0 <= labels.min() <= labels.max() < 100:
            raise DataError(f"{folder}: expected 100 fine classes with labels in 0..99")
        # Rows are channel planes (C, H, W); items are H × W × C.
        self.images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        self.labels = labels
        self.filenames = filenames
        self.fine_label_names = names
        self.classes = list(CIFAR100_SHORT)
        self.split = split
        self.transform = transform
        log.debug("CIFAR-100 %s: %d images from %s", split, len(labels), folder)

    def _load(self, index: int) -> np.ndarray:
        return self.images[index]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
