"""Tiny on-disk datasets in the official formats, for the data-layer tests (nothing is downloaded).

Example:
    >>> write_tiny_cifar100(tmp_path, n_train=20, n_test=10, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ncis_core.data.classes import CIFAR100_SHORT

__all__ = ["write_tiny_cifar100", "write_image", "write_corrupt", "write_tiny_imagenet",
           "write_svhn_mat"]

# The archive's own names (``apple``, ``aquarium_fish`` …) differ from the kit's short names;
# a recognisable stand-in is enough for the tests.
FINE_LABEL_NAMES = [f"fine_{name}" for name in CIFAR100_SHORT]


def write_tiny_cifar100(root: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ``<root>/cifar-100-python/{train,test,meta}`` like the official archive.

    Returns ``{"train": (data, labels), "test": …}`` with ``data`` the ``N × 3072`` rows written.
    Labels cycle through 0..99 so that every class up to N appears in order.
    """
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [i % 100 for i in range(n)]
        batch = {
            b"filenames": [f"{split}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [label // 5 for label in labels],
            b"data": data,
        }
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[split] = (data, np.asarray(labels))
    meta = {b"fine_label_names": [name.encode() for name in FINE_LABEL_NAMES],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def write_image(path: str | Path, size: tuple[int, int] = (12, 10), seed: int = 0,
                mode: str = "RGB") -> np.ndarray:
    """Write a random image of ``size = (height, width)``; the format follows the suffix.

    Returns the RGB array that was encoded (lossy formats will read back close to it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return array


def write_corrupt(path: str | Path) -> Path:
    """Write bytes that no image reader accepts, under an image file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image" * 10)
    return path


def write_tiny_imagenet(root: str | Path, wnids: Sequence[str], per_class: dict[str, int] | int = 2,
                        splits: Sequence[str] = ("train", "val")) -> None:
    """Write ``<root>/<split>/<wnid>/<wnid>_<k>.JPEG`` (tiny JPEGs) for each wnid and split."""
    for s, split in enumerate(splits):
        for w, wnid in enumerate(wnids):
            n = per_class if isinstance(per_class, int) else per_class[wnid]
            for k in range(n):
                write_image(Path(root) / split / wnid / f"{wnid}_{k}.JPEG", (8, 10),
                            seed=1000 * s + 10 * w + k)


def write_svhn_mat(path: str | Path, n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write an SVHN-format ``.mat``: ``X`` 32×32×3×N ``uint8``, ``y`` N×1 in 1..10 (10 = 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"X": x, "y": y})
    return x, y
