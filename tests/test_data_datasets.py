"""Datasets, OOD sets and splits on tiny on-disk fixtures in the official formats."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import (FINE_LABEL_NAMES, write_corrupt, write_image, write_svhn_mat,
                           write_tiny_cifar100, write_tiny_imagenet)
from ncis_core.config import DataConfig
from ncis_core.data import (CIFAR100, OOD_SETS, SVHN, DataError, ImageFolderFiles, ImageNet100,
                            Split, build_splits, first_per_class, get_split, ood_split,
                            with_transform)
from ncis_core.data import classes
from ncis_core.data.cifar100 import CIFAR100_LAYOUT, CIFAR100_SOURCE
from ncis_core.data.imagenet import IMAGENET100_LAYOUT, IMAGENET100_SOURCE

REPO = Path(__file__).resolve().parents[1]
WNIDS3 = classes.IMAGENET100_WNIDS[:3]


# ---------------------------------------------------------------- class lists

def test_class_lists():
    assert len(classes.CIFAR100_SHORT) == len(classes.CIFAR100_LONG) == 100
    assert len(set(classes.CIFAR100_SHORT)) == 100
    pairs = zip(classes.CIFAR100_SHORT, classes.CIFAR100_LONG)
    differ = {i: (s, l) for i, (s, l) in enumerate(pairs) if s != l}
    assert differ == {1: ("fish", "aquarium fish"), 21: ("chimp", "chimpanzee"),
                      39: ("keyboard", "computer keyboard"), 41: ("mower", "lawn-mower"),
                      58: ("truck", "pickup truck"), 83: ("peppers", "sweet peppers")}
    assert classes.CIFAR100_SHORT[0] == "apples" and classes.CIFAR100_SHORT[99] == "worm"
    wnids = classes.IMAGENET100_WNIDS
    assert len(wnids) == len(classes.IMAGENET100_NAMES) == 100
    assert len(classes.IMAGENET100_PROMPT_NAMES) == 100
    assert wnids == sorted(wnids) and len(set(wnids)) == 100
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    prompt = dict(zip(classes.IMAGENET100_NAMES, classes.IMAGENET100_PROMPT_NAMES))
    assert prompt["nail"] == "wire nail" and prompt["kite"] == "kite bird"
    assert prompt["stingray"] == "stingray in the water" and prompt["impala"] == "impala animal"
    assert sum(a != b for a, b in prompt.items()) == 8
    assert classes.DEMO_ID_CLASSES == ["bear", "bird", "cat", "dog", "elephant", "giraffe"]
    assert classes.DEMO_NEAR_CLASSES == ["cow", "horse", "sheep", "zebra"]


def test_the_imagenet100_preset_prompts_nail_as_the_original_concatenates_it():
    """The original appends a whole prompt to "nail" as its suffix; the paper preset keeps that."""
    from ncis_core.config import load_config
    from ncis_core.diffusion import generation_names

    cfg = load_config("imagenet100")
    assert cfg.generate.nail_prompt == "concatenated"
    names = generation_names("imagenet100", classes.IMAGENET100_NAMES, cfg.generate.nail_prompt)
    assert classes.IMAGENET100_NAMES[80] == "nail"
    assert cfg.generate.prompt.format(names[80]) == \
        "A high-quality image of the nailA high-quality image of the wire nail"
    fixed = generation_names("imagenet100", classes.IMAGENET100_NAMES, "wire_nail")
    assert cfg.generate.prompt.format(fixed[80]) == "A high-quality image of the wire nail"
    assert names[:80] + names[81:] == fixed[:80] + fixed[81:] == \
        classes.IMAGENET100_PROMPT_NAMES[:80] + classes.IMAGENET100_PROMPT_NAMES[81:]
    # the switch touches ImageNet-100's nail only
    assert generation_names("cifar100", classes.CIFAR100_SHORT, "concatenated") == classes.CIFAR100_LONG


# ---------------------------------------------------------------- CIFAR-100

def test_cifar100_reads_the_official_format(tmp_path):
    written = write_tiny_cifar100(tmp_path, n_train=20, n_test=7, seed=1)
    train, test = CIFAR100(tmp_path, "train"), CIFAR100(tmp_path, "test")
    assert len(train) == 20 and len(test) == 7
    image, label = train[3]
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and label == 3
    # Row layout: channel planes, row-major; pixel (y, x) of channel c is at c*1024 + y*32 + x.
    row = written["train"][0][3]
    for y, x, c in [(0, 0, 0), (5, 17, 1), (31, 31, 2), (12, 3, 2)]:
        assert image[y, x, c] == row[c * 1024 + y * 32 + x]
    np.testing.assert_array_equal(test.labels, written["test"][1])
    assert train.classes == classes.CIFAR100_SHORT
    assert train.fine_label_names == FINE_LABEL_NAMES
    assert train.filenames[0] == "train_0.png"
    flipped = CIFAR100(tmp_path, "train", transform=lambda im: im[:, ::-1])
    np.testing.assert_array_equal(flipped[3][0], image[:, ::-1])


@pytest.mark.parametrize("setup", ["no_root", "empty_root", "no_test_file", "empty_string"])
def test_cifar100_missing_says_layout_source_and_key(tmp_path, setup):
    root = tmp_path / "cifar"
    if setup == "empty_root":
        root.mkdir()
    elif setup == "no_test_file":
        write_tiny_cifar100(root, 2, 2)
        (root / "cifar-100-python" / "test").unlink()
    elif setup == "empty_string":
        root = ""
    with pytest.raises(DataError) as info:
        CIFAR100(root, "test")
    message = str(info.value)
    assert CIFAR100_LAYOUT in message and CIFAR100_SOURCE in message and "data.root" in message


def test_cifar100_refuses_code_in_pickles(tmp_path):
    write_tiny_cifar100(tmp_path, 2, 2)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": Evil()}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load .*print"):
        CIFAR100(tmp_path, "train")


# ---------------------------------------------------------------- image folders and ImageNet-100

def test_image_folder_files_unreadable_file(tmp_path, caplog):
    good = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    bad = write_corrupt(tmp_path / "bad.jpg")
    paths = [tmp_path / "0.png", bad, tmp_path / "1.png"]
    lazy = ImageFolderFiles(paths, [0, 1, 2])
    assert len(lazy) == 3
    np.testing.assert_array_equal(lazy[0][0], good[0])  # PNG is lossless
    with pytest.raises(DataError) as info:
        lazy[1]
    assert str(bad) in str(info.value) and "data.skip_unreadable" in str(info.value)
    with caplog.at_level(logging.WARNING):
        skipping = ImageFolderFiles(paths, [0, 1, 2], skip_unreadable=True)
    assert len(skipping) == 2 and skipping.skipped == [bad]
    assert skipping.labels.tolist() == [0, 2]
    assert "skipped 1 unreadable" in caplog.text


def test_imagenet100_index_labels_and_classes(tmp_path):
    write_tiny_imagenet(tmp_path, WNIDS3, per_class={WNIDS3[0]: 2, WNIDS3[1]: 3, WNIDS3[2]: 1})
    ds = ImageNet100(tmp_path, "train", wnids=WNIDS3)
    assert len(ds) == 6 and ds.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert ds.classes == classes.IMAGENET100_NAMES[:3]
    image, label = ds[2]
    assert image.shape == (8, 10, 3) and image.dtype == np.uint8 and label == 1
    assert ds.paths[2] == tmp_path / "train" / WNIDS3[1] / f"{WNIDS3[1]}_0.JPEG"
    capped = ImageNet100(tmp_path, "val", wnids=WNIDS3, max_per_class=2)
    assert capped.labels.tolist() == [0, 0, 1, 1, 2]


def test_imagenet100_missing_wnids_and_root(tmp_path):
    write_tiny_imagenet(tmp_path, WNIDS3[:2], per_class=1, splits=("train",))
    (tmp_path / "train" / "n09999999").mkdir()  # an extra, unrelated folder is fine
    with pytest.raises(DataError) as info:
        ImageNet100(tmp_path, "train", wnids=WNIDS3)
    message = str(info.value)
    assert "1 of the 3 class folders" in message and WNIDS3[2] in message
    assert IMAGENET100_LAYOUT in message and IMAGENET100_SOURCE in message
    assert "data.root" in message
    with pytest.raises(DataError, match="98 of the 100 class folders"):
        ImageNet100(tmp_path, "train")
    for root in (tmp_path / "nowhere", ""):
        with pytest.raises(DataError, match="data.root"):
            ImageNet100(root, "val")


def test_imagenet100_index_cache(tmp_path):
    write_tiny_imagenet(tmp_path / "in", WNIDS3, per_class=1)
    cache = tmp_path / "cache" / "train.json"
    first = ImageNet100(tmp_path / "in", "train", wnids=WNIDS3, index_cache=cache)
    assert cache.is_file()
    write_image(tmp_path / "in" / "train" / WNIDS3[0] / "late.JPEG")  # not in the cached index
    cached = ImageNet100(tmp_path / "in", "train", wnids=WNIDS3, index_cache=cache)
    assert cached.paths == first.paths and len(cached) == 3
    rescanned = ImageNet100(tmp_path / "in", "train", wnids=WNIDS3[:2], index_cache=cache)
    assert len(rescanned) == 3  # other wnids: the cache does not match and is rebuilt


def test_imagenet100_skip_unreadable(tmp_path, caplog):
    write_tiny_imagenet(tmp_path, WNIDS3, per_class=1)
    bad = write_corrupt(tmp_path / "val" / WNIDS3[1] / "broken.JPEG")
    lazy = ImageNet100(tmp_path, "val", wnids=WNIDS3)
    with pytest.raises(DataError, match="broken.JPEG"):
        lazy[lazy.paths.index(bad)]
    with caplog.at_level(logging.WARNING):
        ds = ImageNet100(tmp_path, "val", wnids=WNIDS3, skip_unreadable=True)
    assert len(ds) == 3 and ds.skipped == [bad] and "skipped 1" in caplog.text


# ---------------------------------------------------------------- OOD sets

def make_folder_set(root: Path, n: int = 12) -> list[Path]:
    paths = []
    for i in range(n):
        suffix = [".jpg", ".JPG", ".png", ".jpeg"][i % 4]
        path = root / f"cat{i % 3}" / "deeper" / f"img{i:02d}{suffix}"
        write_image(path, size=(20 + i, 24), seed=i)
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".hidden.png")
    return sorted(paths, key=str)


def test_svhn(tmp_path):
    x, y = write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", n=25)
    ds = SVHN(tmp_path / "svhn")
    assert len(ds) == 25 and set(ds.labels.tolist()) == {-1}
    np.testing.assert_array_equal(ds[4][0], x[..., 4])
    assert ds.digit_labels[9] == 0 and ds.digit_labels[0] == 1  # the file's 10 means 0
    split = ood_split("svhn", tmp_path / "svhn" / "test_32x32.mat", resize=32, image_size=32,
                      subset_size=10, subset_seed=0)
    assert split.role == "ood-far" and len(split.dataset) == 10
    assert split.dataset[0][0].shape == (32, 32, 3)


def test_folder_set_scan_subset_and_transform(tmp_path):
    paths = make_folder_set(tmp_path / "dtd" / "images")
    full = ood_split("textures", tmp_path / "dtd" / "images", resize=16, image_size=12,
                     subset_size=None, subset_seed=0)
    assert full.dataset.paths == paths and full.classes == []
    assert len(full.dataset) == 12 and set(full.dataset.labels.tolist()) == {-1}
    assert all(full.dataset[i][0].shape == (12, 12, 3) for i in range(12))
    via_parent = ood_split("textures", tmp_path / "dtd", resize=16, image_size=12,
                           subset_size=None, subset_seed=0)
    assert via_parent.dataset.paths == paths

    def subset(seed, size=5):
        return ood_split("textures", tmp_path / "dtd", resize=16, image_size=12,
                         subset_size=size, subset_seed=seed).dataset.paths

    assert len(subset(0)) == 5 and subset(0) == subset(0) and subset(0) != subset(1)
    assert subset(0, size=50) == paths  # more than there are: all


@pytest.mark.parametrize("name", sorted(OOD_SETS))
def test_ood_missing_root_says_layout_source_and_key(tmp_path, name):
    spec = OOD_SETS[name]
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "missing", tmp_path / "empty", None, ""):
        with pytest.raises(DataError) as info:
            ood_split(name, root, resize=32, image_size=32, subset_size=5, subset_seed=0)
        message = str(info.value)
        assert spec.layout in message and spec.source in message
        assert f"data.ood_roots.{name}" in message


def test_ood_unknown_set_and_unreadable_file(tmp_path, caplog):
    with pytest.raises(DataError, match="known sets: svhn"):
        ood_split("mnist", tmp_path, resize=32, image_size=32, subset_size=5, subset_seed=0)
    make_folder_set(tmp_path / "isun", n=4)
    bad = write_corrupt(tmp_path / "isun" / "zz_bad.jpeg")  # sorts last
    split = ood_split("isun", tmp_path / "isun", resize=8, image_size=8, subset_size=None,
                      subset_seed=0)
    assert len(split.dataset) == 5
    with pytest.raises(DataError) as info:
        split.dataset[4]
    assert str(bad) in str(info.value)
    with caplog.at_level(logging.WARNING):
        skipping = ood_split("isun", tmp_path / "isun", resize=8, image_size=8, subset_size=None,
                             subset_seed=0, skip_unreadable=True)
    assert len(skipping.dataset) == 4 and skipping.dataset.skipped == [bad]
    assert "skipped 1 unreadable" in caplog.text


def as_is_config(tmp_path, **changes) -> DataConfig:
    """LSUN-C and iSUN in their real layouts (``LSUN/test/``, ``iSUN/iSUN_patches/``) and Textures."""
    values = dict(dataset="cifar100", root=str(tmp_path / "cifar"),
                  ood_sets=["lsun_crop", "isun", "textures"],
                  ood_roots={"lsun_crop": str(tmp_path / "LSUN"), "isun": str(tmp_path / "iSUN"),
                             "textures": str(tmp_path / "dtd" / "images")},
                  ood_subset_size=None, subset_seed=0, resize=32, image_size=32)
    values.update(changes)
    return DataConfig(**values)


def test_as_is_sets_keep_32x32_images_pixel_for_pixel(tmp_path):
    from PIL import Image

    from ncis_core.data import ToTensor

    files = [tmp_path / "LSUN" / "test" / f"{i:04d}.png" for i in range(3)]
    written = [write_image(f, size=(32, 32), seed=i) for i, f in enumerate(files)]
    for as_is_sets in (["lsun_crop", "isun"], []):  # a 32x32 image is untouched either way
        split = get_split(as_is_config(tmp_path, as_is_sets=as_is_sets), "lsun_crop")
        assert split.dataset.paths == files
        for i, f in enumerate(files):
            image = split.dataset[i][0]
            np.testing.assert_array_equal(image, written[i])
            with Image.open(f) as pil:  # what the original's ToTensor sees
                assert ToTensor()(image).equal(ToTensor()(np.asarray(pil.convert("RGB"))))


def test_as_is_sets_keep_every_image_at_its_own_size_and_say_so_once(tmp_path, caplog):
    """The original feeds LSUN-C and iSUN through ToTensor alone, whatever size a file has."""
    from ncis_core.data import eval_transform

    small = write_image(tmp_path / "iSUN" / "iSUN_patches" / "a.jpeg", size=(32, 32), seed=0)
    big = write_image(tmp_path / "iSUN" / "iSUN_patches" / "b.png", size=(36, 36), seed=1)
    wide = write_image(tmp_path / "iSUN" / "iSUN_patches" / "c.png", size=(32, 40), seed=2)
    bad = write_corrupt(tmp_path / "iSUN" / "iSUN_patches" / "d.jpeg")
    with caplog.at_level(logging.INFO):
        split = get_split(as_is_config(tmp_path), "isun")
    assert split.dataset.sizes == [(32, 32), (36, 36), (40, 32), None]  # (width, height) from the headers
    np.testing.assert_array_equal(split.dataset[1][0], big)  # pixel for pixel, at 36 × 36
    np.testing.assert_array_equal(split.dataset[2][0], wide)
    assert split.dataset[0][0].shape == small.shape
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "not 32×32" in warnings[0] and "36×36 (1)" in warnings[0]
    assert "data.as_is_sets=[]" in warnings[0] and "\n" not in warnings[0]
    assert any("isun, as is" in r.message and "32×32 (1)" in r.message for r in caplog.records)
    with pytest.raises(DataError, match="cannot read image file"):  # unreadable stays unreadable
        split.dataset[3]
    skipping = get_split(as_is_config(tmp_path, skip_unreadable=True), "isun")
    assert skipping.dataset.skipped == [bad] and skipping.dataset.sizes == [(32, 32), (36, 36), (40, 32)]
    # the switch: resize + centre-crop as for every other set
    resized = get_split(as_is_config(tmp_path, as_is_sets=[]), "isun")
    np.testing.assert_array_equal(resized.dataset[1][0], eval_transform(32, 32)(big))
    np.testing.assert_array_equal(resized.dataset[2][0], eval_transform(32, 32)(wide))
    assert resized.dataset[1][0].shape == (32, 32, 3)


def test_sets_outside_as_is_sets_are_still_resized(tmp_path):
    from ncis_core.data import eval_transform

    big = write_image(tmp_path / "dtd" / "images" / "banded" / "x.png", size=(36, 36), seed=3)
    split = get_split(as_is_config(tmp_path), "textures")
    np.testing.assert_array_equal(split.dataset[0][0], eval_transform(32, 32)(big))


def test_as_is_svhn_of_another_size_is_used_as_is_with_a_warning(tmp_path, caplog):
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", n=5)
    cfg = as_is_config(tmp_path, ood_sets=["svhn"], ood_roots={"svhn": str(tmp_path / "svhn")},
                       as_is_sets=["svhn"])
    with caplog.at_level(logging.WARNING):
        assert get_split(cfg, "svhn").dataset[0][0].shape == (32, 32, 3)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        split = get_split(dataclasses.replace(cfg, image_size=28, resize=28), "svhn")
    assert split.dataset[0][0].shape == (32, 32, 3)
    assert any("not 28×28" in r.message and "32×32 (5)" in r.message for r in caplog.records)


# ---------------------------------------------------------------- splits

def cifar_config(tmp_path, **changes) -> DataConfig:
    write_tiny_cifar100(tmp_path / "cifar", n_train=300, n_test=200, seed=0)
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", n=40)
    make_folder_set(tmp_path / "dtd" / "images", n=8)
    values = dict(dataset="cifar100", root=str(tmp_path / "cifar"), ood_sets=["svhn", "textures"],
                  ood_roots={"svhn": str(tmp_path / "svhn"),
                             "textures": str(tmp_path / "dtd" / "images")},
                  ood_subset_size=20, subset_seed=0, resize=32, image_size=32)
    values.update(changes)
    return DataConfig(**values)


def test_build_splits_cifar100(tmp_path):
    cfg = cifar_config(tmp_path)
    splits = build_splits(cfg)
    assert [(s.name, s.role) for s in splits] == [
        ("id-train", "id-train"), ("id-test", "id-test"), ("svhn", "ood-far"),
        ("textures", "ood-far")]
    assert [len(s.dataset) for s in splits] == [300, 200, 20, 8]
    assert splits[0].classes == classes.CIFAR100_SHORT
    for split in splits:
        assert split.describe()["image_shape"] == [32, 32, 3]
    assert get_split(cfg, "svhn").dataset.indices.tolist() == splits[2].dataset.indices.tolist()
    other_seed = get_split(cifar_config(tmp_path, subset_seed=1), "svhn")
    assert other_seed.dataset.indices.tolist() != splits[2].dataset.indices.tolist()
    with pytest.raises(DataError, match="splits: id-train, id-test, svhn, textures"):
        get_split(cfg, "places365")


def test_max_per_class(tmp_path):
    cfg = cifar_config(tmp_path, max_per_class=2)
    train = get_split(cfg, "id-train")
    assert len(train.dataset) == 200  # 300 images, labels i % 100: 3 per class, capped to 2
    assert np.bincount(train.dataset.labels).tolist() == [2] * 100
    assert train.dataset.indices.tolist() == list(range(200))  # the first two of each class
    assert first_per_class([2, 2, 0, 2, 1, 0], 1).tolist() == [0, 2, 4]
    assert first_per_class([2, 2, 0], None).tolist() == [0, 1, 2]


def test_with_transform_keeps_the_original(tmp_path):
    split = get_split(cifar_config(tmp_path, max_per_class=1), "id-test")
    flipped = with_transform(split.dataset, lambda im: im[:, ::-1])
    np.testing.assert_array_equal(flipped[0][0], split.dataset[0][0][:, ::-1])
    assert split.dataset.base.transform is not flipped.base.transform


def test_build_splits_imagenet100(tmp_path):
    write_tiny_imagenet(tmp_path / "imagenet", classes.IMAGENET100_WNIDS, per_class=1)
    make_folder_set(tmp_path / "iNaturalist" / "images", n=6)
    cfg = DataConfig(dataset="imagenet100", root=str(tmp_path / "imagenet"),
                     ood_sets=["inaturalist"],
                     ood_roots={"inaturalist": str(tmp_path / "iNaturalist")},
                     ood_subset_size=4, resize=9, image_size=7)
    train, test, inat = build_splits(cfg)
    assert len(train.dataset) == len(test.dataset) == 100 and len(inat.dataset) == 4
    assert test.classes == classes.IMAGENET100_NAMES
    assert test.dataset.labels.tolist() == list(range(100))
    assert train.describe()["image_shape"] == [7, 7, 3] == inat.describe()["image_shape"]
    with pytest.raises(DataError, match="data.ood_roots.sun"):
        get_split(DataConfig(dataset="imagenet100", root=cfg.root, ood_sets=["sun"], ood_roots={}),
                  "sun")


def test_build_splits_demo_delegates(monkeypatch):
    made = []
    fake = types.ModuleType("ncis_core.data.demo")

    def demo_splits(cfg):
        made.append(cfg)
        return [Split("id-train", "id-train", ImageFolderFiles([], []), ["bear"])]

    fake.demo_splits = demo_splits
    monkeypatch.setitem(sys.modules, "ncis_core.data.demo", fake)
    cfg = DataConfig(dataset="demo", root="", ood_sets=[], ood_roots={})
    assert [s.name for s in build_splits(cfg)] == ["id-train"] and made == [cfg]
    assert get_split(cfg, "id-train").classes == ["bear"]
    with pytest.raises(DataError, match="splits: id-train"):
        get_split(cfg, "digits")


# ---------------------------------------------------------------- README

def test_readme_repeats_the_error_texts():
    readme = (REPO / "data" / "README.md").read_text()
    for text in (CIFAR100_LAYOUT, CIFAR100_SOURCE, IMAGENET100_LAYOUT, IMAGENET100_SOURCE):
        assert text in readme
    for name, spec in OOD_SETS.items():
        assert spec.layout in readme and spec.source in readme, name
        assert f"data.ood_roots.{name}" in readme


def test_places365_names_the_test_images_the_original_evaluates():
    """The original evaluates Places365's test images (its places_test/), not "test or val"."""
    from ncis_core.plan import _NOMINAL_OOD

    spec = OOD_SETS["places365"]
    assert "test_256.tar" in spec.source and "test images" in spec.layout
    assert "or val_256" not in spec.source and "places_test/" in spec.source
    assert _NOMINAL_OOD["places365"] == 328_500  # plan's count when the copy is not on disk
