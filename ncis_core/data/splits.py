"""The named splits of an experiment: ``id-train``, ``id-test``, then one per ``data.ood_sets`` name.

Items are ``(uint8 H×W×3 RGB, int)``; the ID splits carry the evaluation transform, which stages
replace with :func:`with_transform`.

    >>> from ncis_core.config import load_config
    >>> [(s.name, len(s.dataset)) for s in build_splits(load_config("smoke").data)][:3]
    [('id-train', 48), ('id-test', 48), ('demo_near', 16)]
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

from .base import DataError, ImageDataset, Split, Subset
from .cifar100 import CIFAR100
from .classes import CIFAR100_SHORT, IMAGENET100_NAMES
from .imagenet import ImageNet100
from .ood import ood_split
from .transforms import eval_transform

__all__ = ["ID_SPLITS", "build_splits", "get_split", "first_per_class", "with_transform"]

ID_SPLITS = ("id-train", "id-test")


def first_per_class(labels: Sequence[int], n: int | None) -> np.ndarray:
    """Indices of the first ``n`` items of each class, in their original order (all when ``None``).

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

    Raises:
        DataError: a dataset is missing or unreadable (with its layout, source and config key).
    """
    cfg = _data_config(cfg)
    if cfg.dataset == "demo":
        from .demo import demo_splits  # lazily: the demo world needs its own packages

        return demo_splits(cfg)
    return [_id_split(cfg, name) for name in ID_SPLITS] + [_ood_split(cfg, n) for n in cfg.ood_sets]


def get_split(cfg, name: str) -> Split:
    """The split called ``name``, building only that one; DataError as :func:`build_splits`."""
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
