"""The far-OOD test sets of the paper presets (METHOD.md §6) and how to find them on disk.

:data:`OOD_SETS` maps a set's name to its loader (SVHN's ``.mat``, else a folder of images), layout
and source; :func:`ood_split` makes a seeded ``ood-far`` split of one. Every label is ``-1``.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from .base import ArrayDataset, DataError, ImageDataset, Split, Subset, seeded_subset_indices
from .folders import ImageFolderFiles, list_images
from .transforms import eval_transform

__all__ = ["OODSpec", "OOD_SETS", "SVHN", "AsIsImageFiles", "image_folder", "ood_split"]

log = logging.getLogger(__name__)


class SVHN(ArrayDataset):
    """The SVHN test set from ``test_32x32.mat`` (``root``: the file or its folder); labels ``-1``.

    The digit classes (the file's 10 means 0) are kept as ``.digit_labels``.
    """

    def __init__(self, root: str | Path):
        from scipy.io import loadmat  # scipy is needed for this set only

        root = Path(root)
        path = root if root.is_file() else root / "test_32x32.mat"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        try:
            mat = loadmat(path)
            x, y = mat["X"], mat["y"]
        except Exception as exc:
            raise DataError(f"cannot read SVHN from {path}: {exc}") from exc
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise DataError(f"{path}: expected X of shape 32×32×3×N, got {x.shape}")
        images = np.ascontiguousarray(np.moveaxis(x, 3, 0).astype(np.uint8))  # N × 32 × 32 × 3
        super().__init__(images, np.full(len(images), -1))
        self.digit_labels = np.asarray(y, dtype=np.int64).reshape(-1) % 10


class AsIsImageFiles(ImageFolderFiles):
    """Image files evaluated at their own size, no Resize/CenterCrop (the original's LSUN-C, iSUN).

    ``sizes``: each file's ``(width, height)`` from its header (``None`` where PIL cannot open it).
    """

    def __init__(self, paths, labels, skip_unreadable: bool = False):
        super().__init__(paths, labels, None, skip_unreadable)
        self.sizes = [_header_size(p) for p in self.paths]


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except Exception:  # PIL raises many kinds; the load reports it with the path
        return None


def _log_sizes(name: str, sizes: list, image_size: int) -> None:
    """Say once which sizes an as-is set holds, and warn when some are not ``image_size`` square."""
    counts = Counter(size for size in sizes if size is not None)
    seen = ", ".join(f"{w}×{h} ({n})" for (w, h), n in counts.most_common())
    log.info("OOD set %s, as is (no Resize/CenterCrop): image sizes %s", name, seen or "none")
    if set(counts) - {(image_size, image_size)}:
        log.warning("OOD set %s is in data.as_is_sets and holds images that are not %d×%d (%s): they are "
                    "scored at their own size, as the original does (the network pools globally); "
                    "--set data.as_is_sets=[] resizes and centre-crops them instead",
                    name, image_size, image_size, seen)


def image_folder(root: str | Path) -> ImageFolderFiles:
    """Every image file under ``root`` (recursive, sorted), labels ``-1``; FileNotFoundError if none."""
    paths = list_images(root)
    if not paths:
        raise FileNotFoundError(f"no image files under {root}")
    return ImageFolderFiles(paths, [-1] * len(paths))


class OODSpec(NamedTuple):
    """How to read one OOD set: ``loader(root) -> ImageDataset``, its layout and its source."""

    loader: Callable[[Path], ImageDataset]
    layout: str
    source: str


_ODIN = "the ODIN README at github.com/facebookresearch/odin"
_MOS = "the MOS README at github.com/deeplearning-wisc/large_scale_ood"

OOD_SETS: dict[str, OODSpec] = {
    "svhn": OODSpec(
        SVHN,
        "<root>/test_32x32.mat (or point the key at the .mat file itself)",
        "http://ufldl.stanford.edu/housenumbers/test_32x32.mat (official SVHN, cropped digits, "
        "test split)"),
    "places365": OODSpec(
        image_folder,
        "<root>/**/*.jpg: the Places365 test images at any depth, e.g. the extracted test_256.tar "
        "(<root>/test_256/Places365_test_00000001.jpg …)",
        "the official Places365-Standard test images, http://data.csail.mit.edu/places/places365/"
        "test_256.tar (328 500 images, linked from http://places2.csail.mit.edu/download.html): the "
        "copy the original evaluates (its places_test/ folder); the val images (val_256.tar) are "
        "another set"),
    "lsun_crop": OODSpec(
        image_folder,
        "<root>/**/*.jpg: the extracted LSUN.tar.gz (images in <root>/test/)",
        f"https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz (LSUN-Crop, 10 000 images; "
        f"linked from {_ODIN})"),
    "lsun_resize": OODSpec(
        image_folder,
        "<root>/**/*.jpg: the extracted LSUN_resize.tar.gz",
        f"https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz (LSUN-Resize, 10 000 "
        f"images; linked from {_ODIN})"),
    "isun": OODSpec(
        image_folder,
        "<root>/**/*.jpeg: the extracted iSUN.tar.gz (images in <root>/iSUN_patches/)",
        f"https://www.dropbox.com/s/ssz7qxfqae0cca5/iSUN.tar.gz (8 925 images; linked from "
        f"{_ODIN})"),
    "textures": OODSpec(
        image_folder,
        "<root>/<category>/*.jpg with <root> = dtd/images of the extracted DTD archive",
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz (official "
        "Describable Textures Dataset, 5 640 images)"),
    "inaturalist": OODSpec(
        image_folder,
        "<root>/images/*.jpg: the extracted iNaturalist.tar.gz",
        f"http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/iNaturalist.tar.gz (10 000 "
        f"images of concepts disjoint from ImageNet-1k, selected by MOS; see {_MOS})"),
    "sun": OODSpec(
        image_folder,
        "<root>/images/*.jpg: the extracted SUN.tar.gz",
        f"http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/SUN.tar.gz (10 000 images "
        f"of concepts disjoint from ImageNet-1k, selected by MOS; see {_MOS})"),
    "places": OODSpec(
        image_folder,
        "<root>/images/*.jpg: the extracted Places.tar.gz",
        f"http://pages.cs.wisc.edu/~huangrui/imagenet_ood_dataset/Places.tar.gz (10 000 images "
        f"of concepts disjoint from ImageNet-1k, selected by MOS; see {_MOS})"),
}


def _error(name: str, root, what: str) -> DataError:
    spec = OOD_SETS[name]
    return DataError(f"OOD set {name!r} not found: {what}. Expected layout: {spec.layout}. Get it "
                     f"from {spec.source}, and point the config key data.ood_roots.{name} at it "
                     f"(now: {str(root or '')!r}).")


def ood_split(name: str, root: str | Path | None, *, resize: int, image_size: int,
              subset_size: int | None, subset_seed: int, skip_unreadable: bool = False,
              as_is: bool = False) -> Split:
    """One OOD test set as an ``ood-far`` split.

    Args:
        subset_size: images kept, a random subset seeded by ``subset_seed``; ``None``: all.
        skip_unreadable: drop unreadable files of the subset (it may come out a few images short).
        as_is: no Resize/CenterCrop: each image is scored at its own size.

    Raises:
        DataError: unknown name, or a missing, empty or unreadable root (with layout and source).
    """
    if name not in OOD_SETS:
        raise DataError(f"unknown OOD set {name!r}; known sets: {', '.join(OOD_SETS)} "
                        f"(config key data.ood_sets)")
    if root is None or not str(root).strip():
        raise _error(name, root, f"data.ood_roots has no entry for {name!r}")
    if not Path(root).exists():
        raise _error(name, root, f"{str(root)!r} does not exist")
    try:
        full = OOD_SETS[name].loader(Path(root))
    except FileNotFoundError as exc:
        raise _error(name, root, str(exc)) from None
    indices = seeded_subset_indices(len(full), subset_size, subset_seed)
    if subset_size is not None and len(full) < subset_size:
        log.warning("OOD set %s has %d images, fewer than the %d asked for; using all",
                    name, len(full), subset_size)
    transform = None if as_is else eval_transform(resize, image_size)
    if isinstance(full, ImageFolderFiles):
        # Re-index the chosen files only, so skip mode checks just those.
        paths, labels = [full.paths[i] for i in indices], full.labels[indices]
        dataset: ImageDataset = (
            AsIsImageFiles(paths, labels, skip_unreadable) if as_is
            else ImageFolderFiles(paths, labels, transform, skip_unreadable))
        if as_is:
            _log_sizes(name, dataset.sizes, image_size)
    else:
        images = getattr(full, "images", None)  # an in-memory set (SVHN): one size for all
        if as_is and images is not None:
            _log_sizes(name, [(images.shape[2], images.shape[1])] * len(indices), image_size)
        full.transform = transform
        dataset = Subset(full, indices)
    log.info("OOD set %s: %d images from %s%s", name, len(dataset), root,
             " (as is: no Resize/CenterCrop)" if as_is else "")
    return Split(name=name, role="ood-far", dataset=dataset, classes=[])
