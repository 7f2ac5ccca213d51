"""The embedded demo world: animal silhouettes as ID and near-OOD, small bundled images as far-OOD.

Nothing downloads: ``animal-mnist``'s files (read without importing it), scikit-learn's digits and
scikit-image's photographs, as ``32 × 32 × 3`` uint8 images in splits fixed by constant seeds.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import pickle
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .base import ArrayDataset, DataError, Split, Subset, seeded_subset_indices
from .classes import DEMO_ID_CLASSES, DEMO_NEAR_CLASSES  # re-exported: one source of truth

if TYPE_CHECKING:  # only for annotations: the config module imports nothing from here
    from ..config import DataConfig

__all__ = [
    "ANIMAL_MNIST_CLASSES",
    "DEMO_ID_CLASSES",
    "DEMO_NEAR_CLASSES",
    "DEMO_OOD_SETS",
    "DEMO_BACKGROUND",
    "DEMO_SPLIT_SEED",
    "demo_arrays",
    "demo_splits",
    "clear_demo_cache",
]

log = logging.getLogger(__name__)

#: Class names of animal-mnist labels 0..9 (alphabetical; verified by eye on a montage).
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse",
                        "sheep", "zebra")

#: The OOD sets of the demo world, in the order of the ``demo`` preset, with their roles.
DEMO_OOD_SETS = {"demo_near": "ood-near", "digits": "ood-far", "texture_crops": "ood-far",
                 "faces": "ood-far"}

#: Background grey of every demo image (the silhouettes are white on black) and of the padding.
DEMO_BACKGROUND = 0

#: Seed of the per-class train/test and near-OOD permutations (not the run seed: the split never moves)
DEMO_SPLIT_SEED = 20_240_503

TRAIN_PER_CLASS, TEST_PER_CLASS, NEAR_PER_CLASS = 800, 200, 200
SIDE, PAD = 28, 2  # 28 × 28 like the silhouettes, then 2 px each side → 32 × 32
TEXTURES = ("brick", "grass", "gravel")
CROPS_PER_TEXTURE = 200
# crops at 112 px, shrunk ×4 to 28 px, keep the texture's pattern visible
CROP_SIDE = 112
TEXTURE_SEED = 7
N_FACES = 100  # lfw_subset holds 100 faces followed by 100 non-face patches

_PACKAGE_HINT = ("install it with `pip install --no-deps animal-mnist==0.4` (`make demo` does it; "
                 "--no-deps because its declared TensorFlow dependency is not needed)")


# ---------------------------------------------------------------------------------------- reading

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else, so a tampered data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}") from None


def _animal_mnist_files() -> tuple[Path, Path]:
    """The data and label files of the installed ``animal_mnist`` package, found without importing it."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the demo world needs the package `animal-mnist`, which is not installed: "
                        f"{_PACKAGE_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    files = folder / "animal_data_version_3.gz", folder / "animal_label_version_3.gz"
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DataError(f"animal-mnist is installed but lacks {missing}; reinstall it: {_PACKAGE_HINT}")
    return files


@lru_cache(maxsize=1)
def _animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """All 10 000 silhouettes (``N × 28 × 28`` uint8) and their labels (int64, 0..9)."""
    data_file, label_file = _animal_mnist_files()
    try:
        with gzip.open(data_file, "rb") as f:
            images = np.asarray(_ArrayUnpickler(f).load())
        with gzip.open(label_file, "rb") as f:
            labels = np.asarray(_ArrayUnpickler(f).load()).astype(np.int64)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(f"cannot read animal-mnist's files ({err}); reinstall it: {_PACKAGE_HINT}") from err
    if images.shape != (10_000, SIDE, SIDE) or images.dtype != np.uint8 or labels.shape != (10_000,):
        raise DataError(f"unexpected animal-mnist arrays {images.shape} {images.dtype} / {labels.shape}; "
                        f"the demo world expects version 0.4: {_PACKAGE_HINT}")
    return images, labels


# ------------------------------------------------------------------------------------- the splits

@lru_cache(maxsize=1)
def _animal_indices() -> dict[str, list[np.ndarray]]:
    """Source indices into animal-mnist: ``train``/``test`` per ID class, ``near`` per near class.

    Per class a permutation seeded by ``(DEMO_SPLIT_SEED, label)``; test images are never duplicated.
    """
    images, labels = _animal_mnist()
    _, first, inverse, counts = np.unique(images.reshape(len(images), -1), axis=0,
                                          return_index=True, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    single = counts[inverse] == 1
    first_copy = first[inverse] == np.arange(len(images))
    out: dict[str, list[np.ndarray]] = {"train": [], "test": [], "near": []}
    for name in DEMO_ID_CLASSES:
        perm = _class_permutation(labels, ANIMAL_MNIST_CLASSES.index(name))
        test = perm[single[perm]][:TEST_PER_CLASS]
        train = perm[~np.isin(perm, test)]
        if len(test) != TEST_PER_CLASS or len(train) != TRAIN_PER_CLASS:
            raise DataError(f"animal-mnist class {name!r} cannot give {TRAIN_PER_CLASS}/{TEST_PER_CLASS} "
                            f"images: {_PACKAGE_HINT}")
        out["train"].append(train)
        out["test"].append(test)
    for name in DEMO_NEAR_CLASSES:
        perm = _class_permutation(labels, ANIMAL_MNIST_CLASSES.index(name))
        out["near"].append(perm[first_copy[perm]][:NEAR_PER_CLASS])
    return out


def _class_permutation(labels: np.ndarray, label: int) -> np.ndarray:
    rng = np.random.default_rng([DEMO_SPLIT_SEED, label])
    return rng.permutation(np.flatnonzero(labels == label))


def _stack(per_class: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Silhouettes of per-class index lists as a 32 × 32 × 3 set, labels = position in the list."""
    images, _ = _animal_mnist()
    index = np.concatenate(per_class)
    labels = np.repeat(np.arange(len(per_class)), [len(p) for p in per_class])
    return _to_rgb32(images[index]), labels


# ------------------------------------------------------------------------------------- far-OOD sets

def _resize28(images: np.ndarray) -> np.ndarray:
    """Bilinear resize of ``N × h × w`` greys in 0..255 (any float) to ``N × 28 × 28`` uint8."""
    out = np.empty((len(images), SIDE, SIDE), np.uint8)
    for i, img in enumerate(images):
        # mode "F" keeps the full precision of 0..16 digits through the interpolation
        resized = Image.fromarray(np.asarray(img, np.float32)).resize((SIDE, SIDE),
                                                                                Image.BILINEAR)
        out[i] = np.clip(np.rint(np.asarray(resized)), 0, 255).astype(np.uint8)
    return out


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn; no download

    digits = load_digits()
    # 0..16 with 0 = background and high = ink: already the silhouettes' polarity
    return _to_rgb32(_resize28(digits.images * (255.0 / 16.0))), digits.target.astype(np.int64)


def _texture_crops() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data as skdata  # these three photographs ship inside scikit-image

    crops, labels = [], []
    for label, name in enumerate(TEXTURES):
        photo = getattr(skdata, name)()
        rng = np.random.default_rng([TEXTURE_SEED, label])
        corners = rng.integers(0, np.array(photo.shape) - CROP_SIDE + 1, size=(CROPS_PER_TEXTURE, 2))
        crops += [photo[y:y + CROP_SIDE, x:x + CROP_SIDE] for y, x in corners]
        labels += [label] * CROPS_PER_TEXTURE
    return _to_rgb32(_resize28(np.stack(crops).astype(np.float32))), np.array(labels, np.int64)


def _faces() -> tuple[np.ndarray, np.ndarray]:
    from skimage import data as skdata

    faces = skdata.lfw_subset()[:N_FACES]  # floats in 0..1, 25 × 25
    return _to_rgb32(_resize28(faces * 255.0)), np.full(N_FACES, -1, np.int64)


def _to_rgb32(gray28: np.ndarray) -> np.ndarray:
    """``N × 28 × 28`` uint8 → ``N × 32 × 32 × 3`` uint8, padded with the background value."""
    padded = np.pad(gray28, ((0, 0), (PAD, PAD), (PAD, PAD)), constant_values=DEMO_BACKGROUND)
    return np.repeat(padded[..., None], 3, axis=-1)


# ------------------------------------------------------------------------------------- public API

_CLASSES = {"id-train": DEMO_ID_CLASSES, "id-test": DEMO_ID_CLASSES, "demo_near": DEMO_NEAR_CLASSES,
            "digits": [str(d) for d in range(10)], "texture_crops": list(TEXTURES), "faces": []}


@lru_cache(maxsize=None)
def demo_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one demo set (``id-train``, ``id-test`` or an OOD set), cached read-only.

    Labels index the set's own classes; faces are -1.

        >>> images, labels = demo_arrays("id-test")
        >>> images.shape, np.bincount(labels).tolist()
        ((1200, 32, 32, 3), [200, 200, 200, 200, 200, 200])
    """
    if name not in _CLASSES:
        raise DataError(f"unknown demo set {name!r}; valid: {sorted(_CLASSES)}")
    if name in ("id-train", "id-test", "demo_near"):
        images, labels = _stack(_animal_indices()[{"id-train": "train", "id-test": "test",
                                                   "demo_near": "near"}[name]])
    else:
        images, labels = {"digits": _digits, "texture_crops": _texture_crops, "faces": _faces}[name]()
    # read-only: the arrays are shared by every caller through the cache
    images.setflags(write=False)
    labels.setflags(write=False)
    log.debug("built demo set %s: %s", name, images.shape)
    return images, labels


def clear_demo_cache() -> None:
    """Forget the cached demo arrays (tests use it after faking a missing package)."""
    for cached in (demo_arrays, _animal_indices, _animal_mnist):
        cached.cache_clear()


def demo_splits(cfg: "DataConfig") -> list[Split]:
    """The demo world's splits: ``id-train``, ``id-test``, then ``cfg.ood_sets`` in order.

    ``cfg.root`` and ``ood_roots`` are ignored; DataError for an unknown set or no ``animal-mnist``.

        >>> from ncis_core.config import DataConfig
        >>> cfg = DataConfig(dataset="demo", ood_sets=["digits"], ood_subset_size=16, max_per_class=8)
        >>> [(s.name, s.role, len(s.dataset)) for s in demo_splits(cfg)]
        [('id-train', 'id-train', 48), ('id-test', 'id-test', 48), ('digits', 'ood-far', 16)]
    """
    unknown = [name for name in cfg.ood_sets if name not in DEMO_OOD_SETS]
    if unknown:
        raise DataError(f"unknown OOD set(s) {unknown} for the demo world (data.ood_sets); "
                        f"valid demo sets: {list(DEMO_OOD_SETS)}")
    splits = [Split("id-train", "id-train", _capped("id-train", cfg.max_per_class), list(DEMO_ID_CLASSES)),
              Split("id-test", "id-test", _capped("id-test", cfg.max_per_class), list(DEMO_ID_CLASSES))]
    for name in cfg.ood_sets:
        # the per-class cap applies to the labelled animal set only: far-OOD sets are not class-balanced
        dataset = _capped(name, cfg.max_per_class if name == "demo_near" else None)
        keep = seeded_subset_indices(len(dataset), cfg.ood_subset_size, cfg.subset_seed)
        if len(keep) < len(dataset):
            dataset = Subset(dataset, keep)
        splits.append(Split(name, DEMO_OOD_SETS[name], dataset, list(_CLASSES[name])))
    return splits


def _capped(name: str, max_per_class: int | None) -> ArrayDataset:
    """The set as an ArrayDataset, keeping the first ``max_per_class`` images of each class."""
    images, labels = demo_arrays(name)
    if max_per_class is not None:
        keep = np.concatenate([np.flatnonzero(labels == c)[:max_per_class] for c in np.unique(labels)])
        images, labels = images[keep], labels[keep]
    return ArrayDataset(images, labels)
