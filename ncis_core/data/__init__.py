"""The data layer: datasets, transforms, and the named splits of an experiment.

:func:`build_splits` turns a :class:`~ncis_core.config.DataConfig` into the experiment's splits —
``id-train``, ``id-test``, then one ``ood-far`` split per name in ``cfg.ood_sets`` (in that order) —
and :func:`get_split` builds just one of them. Every split's items are ``(uint8 H×W×3 RGB, int)``.

Transforms of the ID splits: both carry the evaluation transform ``Resize(cfg.resize)`` +
``CenterCrop(cfg.image_size)`` (METHOD.md §6), so every consumer gets same-size images by default
(for CIFAR-100 at 32/32 it changes nothing). Stages that need other views replace it with
:func:`with_transform`: stage 5 puts its augmentation on ``id-train`` (it needs the raw image for
RandomResizedCrop), stage 1 its own Resize(512) + CenterCrop(512).

Example (the ``smoke`` preset's demo world, 8 images per class; ``load_config("cifar100")`` gives
``id-train`` 50 000, ``id-test`` 10 000, then ``svhn`` and the other far-OOD sets, 2 000 each):
    >>> from ncis_core.config import load_config
    >>> splits = build_splits(load_config("smoke").data)
    >>> [(s.name, s.role, len(s.dataset)) for s in splits]
    [('id-train', 'id-train', 48), ('id-test', 'id-test', 48), ('demo_near', 'ood-near', 16),
     ('digits', 'ood-far', 16), ('texture_crops', 'ood-far', 16), ('faces', 'ood-far', 16)]
    >>> image, label = splits[0].dataset[0]
    >>> image.shape, image.dtype, splits[0].classes[label]
    ((32, 32, 3), dtype('uint8'), 'bear')
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

from .base import (ROLES, ArrayDataset, DataError, ImageDataset, Split, Subset,
                   seeded_subset_indices)
from .cifar100 import CIFAR100
from .classes import (CIFAR100_LONG, CIFAR100_SHORT, DEMO_ID_CLASSES, DEMO_NEAR_CLASSES,
                      IMAGENET100_NAMES, IMAGENET100_PROMPT_NAMES, IMAGENET100_WNIDS)
from .folders import ImageFolderFiles, list_images
from .imagenet import ImageNet100
from .ood import OOD_SETS, SVHN, OODSpec, ood_split
from .transforms import (CenterCrop, Compose, Normalize, RandomChoiceResize, RandomCrop,
                         RandomHorizontalFlip, RandomResizedCrop, Resize, ToTensor, eval_transform,
                         to_rgb_uint8)

__all__ = [
    # splits
    "ID_SPLITS", "build_splits", "get_split", "first_per_class", "with_transform",
    # shared types
    "ROLES", "DataError", "ImageDataset", "ArrayDataset", "Subset", "Split",
    "seeded_subset_indices",
    # datasets
    "CIFAR100", "ImageNet100", "ImageFolderFiles", "list_images", "SVHN", "OOD_SETS", "OODSpec",
    "ood_split",
    # class lists
    "CIFAR100_SHORT", "CIFAR100_LONG", "IMAGENET100_WNIDS", "IMAGENET100_NAMES",
    "IMAGENET100_PROMPT_NAMES", "DEMO_ID_CLASSES", "DEMO_NEAR_CLASSES",
    # transforms
    "Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "RandomResizedCrop",
    "RandomChoiceResize", "ToTensor", "Normalize", "eval_transform", "to_rgb_uint8",
]

ID_SPLITS = ("id-train", "id-test")


def first_per_class(labels: Sequence[int], n: int | None) -> np.ndarray:
    """Indices of the first ``n`` items of each class, in their original order (all when ``None``).

    Example:
        >>> first_per_class([0, 1, 0, 0, 1], 2).tolist()
        [0, 1, 2, 4]
    """
    labels = np.asarray(labels)
    if n is None:
        return np.arange(len(labels))
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(labels)) - starts  # position of each item within its class
    return np.sort(order[rank < n])


def with_transform(dataset: ImageDataset, transform) -> ImageDataset:
    """A shallow copy of ``dataset`` (through any :class:`Subset`) with ``transform`` instead.

    The images are shared, not copied; the original keeps its transform.

    Example:
        >>> ds = Subset(ArrayDataset(np.zeros((4, 64, 48, 3), np.uint8), [0, 1, 2, 3],
        ...                          transform=eval_transform(32, 32)), [3, 1])
        >>> raw = with_transform(ds, None)
        >>> raw[0][0].shape, raw[0][1], ds[0][0].shape  # the original keeps its transform
        ((64, 48, 3), 3, (32, 32, 3))
    """
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.base, transform), dataset.indices)
    clone = copy.copy(dataset)
    clone.transform = transform
    return clone


def _data_config(cfg):
    # Accept the whole ExperimentConfig too: callers often hold that.
    return getattr(cfg, "data", cfg)


def _id_split(cfg, name: str) -> Split:
    transform = eval_transform(cfg.resize, cfg.image_size)
    if cfg.dataset == "cifar100":
        dataset: ImageDataset = CIFAR100(cfg.root, "train" if name == "id-train" else "test",
                                         transform)
        if cfg.max_per_class is not None:
            dataset = Subset(dataset, first_per_class(dataset.labels, cfg.max_per_class))
        return Split(name, name, dataset, list(CIFAR100_SHORT))
    if cfg.dataset == "imagenet100":
        dataset = ImageNet100(cfg.root, "train" if name == "id-train" else "val", transform,
                              cfg.skip_unreadable, max_per_class=cfg.max_per_class)
        return Split(name, name, dataset, list(IMAGENET100_NAMES))
    raise DataError(f"unknown data.dataset {cfg.dataset!r}; use demo, cifar100 or imagenet100")


def _ood_split(cfg, name: str) -> Split:
    return ood_split(name, cfg.ood_roots.get(name), resize=cfg.resize, image_size=cfg.image_size,
                     subset_size=cfg.ood_subset_size, subset_seed=cfg.subset_seed,
                     skip_unreadable=cfg.skip_unreadable, as_is=name in cfg.as_is_sets)


def build_splits(cfg) -> list[Split]:
    """All splits of the experiment: ``id-train``, ``id-test``, then ``cfg.ood_sets`` in order.

    Args:
        cfg: a :class:`~ncis_core.config.DataConfig` (or an ``ExperimentConfig``; its ``data``).

    For ``dataset: demo`` this is :func:`ncis_core.data.demo.demo_splits`.

    Raises:
        DataError: a dataset is missing or unreadable; the message gives the expected layout,
            its source and the config key that points to it.
    """
    cfg = _data_config(cfg)
    if cfg.dataset == "demo":
        from .demo import demo_splits  # lazily: the demo world needs its own packages

        return demo_splits(cfg)
    return [_id_split(cfg, name) for name in ID_SPLITS] + [_ood_split(cfg, n) for n in cfg.ood_sets]


def get_split(cfg, name: str) -> Split:
    """The split called ``name`` (``id-train``, ``id-test`` or a name in ``cfg.ood_sets``),
    building only that one (for ``demo``: picked from :func:`build_splits`).

    Raises:
        DataError: an unknown name (the message lists the valid ones), or as :func:`build_splits`.
    """
    cfg = _data_config(cfg)
    if cfg.dataset == "demo":
        splits = build_splits(cfg)
        for split in splits:
            if split.name == name:
                return split
        names = [s.name for s in splits]
    else:
        if name in ID_SPLITS:
            return _id_split(cfg, name)
        if name in cfg.ood_sets:
            return _ood_split(cfg, name)
        names = [*ID_SPLITS, *cfg.ood_sets]
    raise DataError(f"no split {name!r} for data.dataset={cfg.dataset}; splits: {', '.join(names)}")
