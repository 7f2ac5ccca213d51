"""Stage 5 for many classifiers at once (`ncis_core.stages.train_many`) against one at a time
(`train_classifier.train`), and the outlier images decoded once per run."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncis_core.config import load_config
from ncis_core.data.folders import ImageFolderFiles, list_images
from ncis_core.runs import RunDir
from ncis_core.stages import train_classifier as stage5


# ----------------------------------------------------------------------------- the decode cache
def test_decoded_outliers_are_the_decoded_files_and_cached_per_content(tmp_path):
    folder = tmp_path / "images"
    (folder / "0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / "0" / f"x_{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / "0" / "grey.png")  # L mode
    cfg = load_config("smoke", ["classifier.outliers=folder", f"classifier.outlier_folder={folder}",
                                "classifier.num_outliers=null"], out=str(tmp_path / "run"))
    run = RunDir(tmp_path / "run", cfg)
    paths = list_images(folder)
    files = ImageFolderFiles(paths, [-1] * len(paths))
    cached = stage5.outlier_dataset(cfg, run)
    assert type(cached).__name__ == "ArrayDataset" and len(cached) == len(files) == 6
    for i in range(len(files)):
        (a, la), (b, lb) = cached[i], files[i]
        assert la == lb == -1 and a.dtype == np.uint8 and np.array_equal(a, b)
    entries = list((tmp_path / "run" / "cache" / "outlier_images").iterdir())
    assert len(entries) == 1
    # read back from the cache (no decoding), the same arrays
    again = stage5.outlier_dataset(cfg, run)
    assert all(np.array_equal(again[i][0], files[i][0]) for i in range(len(files)))
    # a changed image is a new key
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(folder / "0" / "x_0.png")
    changed = stage5.outlier_dataset(cfg, run)
    assert np.array_equal(changed[1][0], np.zeros((12, 12, 3), np.uint8))  # sorted: grey.png first
    assert len(list((tmp_path / "run" / "cache" / "outlier_images").iterdir())) == 2
    # images of several sizes, or no run folder: read from the files
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "0" / "small.png")
    assert type(stage5.outlier_dataset(cfg, run)).__name__ == "ImageFolderFiles"
    assert stage5.decoded_images(folder, list_images(folder), None) is None
