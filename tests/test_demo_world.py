"""The embedded demo world: counts, shapes, determinism, disjointness, caps, polarity, missing package."""

import importlib.util

import numpy as np
import pytest

from ncis_core.config import DataConfig
from ncis_core.data import demo
from ncis_core.data.base import DataError, Subset

ALL_OOD = ["demo_near", "digits", "texture_crops", "faces"]
EXPECTED = {"id-train": (4800, 6), "id-test": (1200, 6), "demo_near": (800, 4),
            "digits": (1797, 10), "texture_crops": (600, 3), "faces": (100, 0)}


def _cfg(**kw):
    kw.setdefault("ood_sets", ALL_OOD)
    kw.setdefault("ood_subset_size", None)
    return DataConfig(dataset="demo", root="", ood_roots={}, **kw)


@pytest.fixture(scope="module")
def splits():
    return {s.name: s for s in demo.demo_splits(_cfg())}


def test_counts_roles_and_shapes(splits):
    assert list(splits) == ["id-train", "id-test"] + ALL_OOD
    roles = {"id-train": "id-train", "id-test": "id-test", "demo_near": "ood-near"}
    for name, (count, n_classes) in EXPECTED.items():
        split = splits[name]
        assert split.role == roles.get(name, "ood-far")
        assert len(split.dataset) == count
        assert len(split.classes) == n_classes
        image, label = split.dataset[0]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and isinstance(label, int)
    assert splits["id-train"].classes == ["bear", "bird", "cat", "dog", "elephant", "giraffe"]
    assert splits["demo_near"].classes == ["cow", "horse", "sheep", "zebra"]
    assert np.bincount(splits["id-train"].dataset.labels).tolist() == [800] * 6
    assert np.bincount(splits["id-test"].dataset.labels).tolist() == [200] * 6
    assert np.bincount(splits["demo_near"].dataset.labels).tolist() == [200] * 4
    assert (splits["faces"].dataset.labels == -1).all()


def test_grey_replicated_to_three_channels(splits):
    for split in splits.values():
        images = split.dataset.images
        assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()


def test_rebuild_is_byte_identical(splits):
    before = {name: s.dataset.images.tobytes() for name, s in splits.items()}
    demo.clear_demo_cache()
    after = {s.name: s.dataset.images.tobytes() for s in demo.demo_splits(_cfg())}
    assert before == after


def test_cached_arrays_are_read_only():
    images, _ = demo.demo_arrays("id-test")
    with pytest.raises(ValueError):
        images[0, 0, 0, 0] = 1


def test_train_test_and_near_are_disjoint():
    index = demo._animal_indices()
    _, labels = demo._animal_mnist()
    train, test, near = (np.concatenate(index[k]) for k in ("train", "test", "near"))
    assert not set(train) & set(test)
    assert len(set(train)) == len(train) and len(set(test)) == len(test)
    names = np.array(demo.ANIMAL_MNIST_CLASSES)
    assert set(names[labels[np.concatenate([train, test])]]) == set(demo.DEMO_ID_CLASSES)
    assert set(names[labels[near]]) == set(demo.DEMO_NEAR_CLASSES)
    assert not set(demo.DEMO_ID_CLASSES) & set(demo.DEMO_NEAR_CLASSES)


def test_no_test_image_also_appears_in_train(splits):
    # animal-mnist holds exact duplicate pairs; the split keeps them out of the test set
    train = {img.tobytes() for img in splits["id-train"].dataset.images}
    assert not any(img.tobytes() in train for img in splits["id-test"].dataset.images)
    near = [img.tobytes() for img in splits["demo_near"].dataset.images]
    assert len(set(near)) == len(near)


def test_common_background_and_polarity(splits):
    for name, split in splits.items():
        images = split.dataset.images[..., 0]
        ring = np.ones((32, 32), bool)
        ring[2:-2, 2:-2] = False
        assert (images[:, ring] == demo.DEMO_BACKGROUND).all(), name
    # silhouettes and digits: dark background, bright object (the corners of the 28 × 28 content)
    for name in ("id-train", "id-test", "demo_near", "digits"):
        images = splits[name].dataset.images[:, 2:-2, 2:-2, 0].astype(float)
        corners = images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
        assert np.median(corners) == demo.DEMO_BACKGROUND, name
        assert images.max(axis=(1, 2)).mean() > 200, name


def test_max_per_class_takes_first_images_of_the_split(splits):
    cfg = _cfg(max_per_class=5, ood_sets=["demo_near", "faces"])
    capped = {s.name: s for s in demo.demo_splits(cfg)}
    assert len(capped["id-train"].dataset) == 30 and len(capped["id-test"].dataset) == 30
    assert len(capped["demo_near"].dataset) == 20
    assert len(capped["faces"].dataset) == 100  # far-OOD sets are not capped per class
    full = splits["id-train"].dataset
    for c in range(6):
        first = full.images[np.flatnonzero(full.labels == c)[:5]]
        got = capped["id-train"].dataset.images[capped["id-train"].dataset.labels == c]
        assert np.array_equal(first, got)


def test_ood_subset_is_seeded(splits):
    a = {s.name: s for s in demo.demo_splits(_cfg(ood_subset_size=16, subset_seed=3))}
    b = {s.name: s for s in demo.demo_splits(_cfg(ood_subset_size=16, subset_seed=3))}
    c = {s.name: s for s in demo.demo_splits(_cfg(ood_subset_size=16, subset_seed=4))}
    assert len(a["id-train"].dataset) == 4800  # ID sets are not subsampled
    for name in ALL_OOD:
        assert isinstance(a[name].dataset, Subset) and len(a[name].dataset) == 16
        assert np.array_equal(a[name].dataset.indices, b[name].dataset.indices)
        assert not np.array_equal(a[name].dataset.indices, c[name].dataset.indices)
        image, label = a[name].dataset[3]
        source = splits[name].dataset
        assert np.array_equal(image, source.images[a[name].dataset.indices[3]])


def test_smoke_preset_sizes():
    splits = demo.demo_splits(_cfg(max_per_class=8, ood_subset_size=16))
    assert [len(s.dataset) for s in splits] == [48, 48, 16, 16, 16, 16]


def test_ood_sets_order_and_unknown_name():
    assert [s.name for s in demo.demo_splits(_cfg(ood_sets=["faces", "digits"]))] == \
        ["id-train", "id-test", "faces", "digits"]
    with pytest.raises(DataError, match="texture_crops"):
        demo.demo_splits(_cfg(ood_sets=["svhn"]))


def test_missing_package_is_a_data_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "animal_mnist" else real(name, *a))
    demo.clear_demo_cache()
    try:
        with pytest.raises(DataError, match=r"pip install --no-deps animal-mnist==0\.4"):
            demo.demo_splits(_cfg())
    finally:
        demo.clear_demo_cache()
