"""Shared types of the data layer: image datasets, named splits, and the data errors.

Every dataset is an :class:`ImageDataset` of ``(image, label)`` items: ``H × W × 3`` uint8 RGB and
an ``int`` (``-1`` for unlabelled OOD sets); stages add their tensor transforms on top. A
:class:`Split` gives a dataset its role (:data:`ROLES`) and class names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..errors import user_error

__all__ = [
    "DataError",
    "ImageDataset",
    "ArrayDataset",
    "Subset",
    "Split",
    "ROLES",
    "seeded_subset_indices",
]

ROLES = ("id-train", "id-test", "ood-near", "ood-far")

Transform = Callable[[np.ndarray], np.ndarray]


@user_error
class DataError(RuntimeError):
    """A dataset is missing, laid out wrongly, or unreadable; from a loader worker, its own line.

        >>> str(DataError("Caught DataError in DataLoader worker process 0.\\nOriginal Traceback (most "
        ...               "recent call last):\\n  File ...\\nncis_core.data.base.DataError: cannot read x.png\\n"))
        'cannot read x.png'
    """

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0]),)
        super().__init__(*args)


_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_RAISED = re.compile(r"^(?:[\w.]+\.)?DataError: ", re.M)


def _worker_message(message: str) -> str:
    """The worker's own message inside torch's re-raise of a worker's DataError (else ``message``)."""
    if not _WORKER.match(message):
        return message
    last = None
    for last in _RAISED.finditer(message):
        pass
    return message[last.end():].rstrip("\n") if last else message


class ImageDataset:
    """Base class: ``len(ds)``, ``ds[i] -> (uint8 H×W×3 array, int label)``, ``ds.labels``.

    Subclasses implement :meth:`_load` and set ``self.labels``; ``transform`` applies on access.
    """

    labels: np.ndarray
    transform: Transform | None = None

    def __len__(self) -> int:
        return int(len(self.labels))

    def _load(self, index: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        image = self._load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


class ArrayDataset(ImageDataset):
    """An in-memory dataset over a ``N × H × W × 3`` ``uint8`` array."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Transform | None = None):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be N×H×W×3 uint8, got {images.shape} {images.dtype}")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def _load(self, index: int) -> np.ndarray:
        return self.images[index]


class Subset(ImageDataset):
    """The items ``indices`` of ``base``, in that order."""

    def __init__(self, base: ImageDataset, indices: Sequence[int]):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(base.labels)[self.indices]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        return self.base[int(self.indices[index])]


def seeded_subset_indices(n: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``size`` out of ``n`` (all when None or ≥ n)."""
    if size is None or size >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False))


@dataclass
class Split:
    """One named split of an experiment: ``name``, ``role`` (:data:`ROLES`), dataset, class names."""

    name: str
    role: str
    dataset: ImageDataset
    classes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {ROLES}")

    def describe(self) -> dict:
        """The JSON-able summary printed by ``python -m ncis_core datasets``."""
        n = len(self.dataset)
        shape = list(self.dataset[0][0].shape) if n else []
        return {"name": self.name, "role": self.role, "count": n,
                "classes": list(self.classes), "image_shape": shape}
