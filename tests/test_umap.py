"""UMAP maps (viz/maps.py): the exact kNN graph, seeding, the run-folder cache, outliers
placed by UMAP's transform, class selection, and the linear baseline shared with `compare`."""

import shutil
import warnings

import numpy as np
import pytest
import torch
import umap

from ncis_core.config import load_config
from ncis_core.embeddings_io import load_embeddings, save_embeddings, synthetic_embeddings
from ncis_core.errors import TooLittleData
from ncis_core.outliers.base import EMBEDDINGS, get_method, method_names
from ncis_core.embeddings_io import load_outliers
from ncis_core.runs import MissingArtefactError, RunDir
from ncis_core.stages import sample, train_cvpn
from ncis_core.viz import maps as viz_maps

PER_CLASS, CLASSES, DIM = 8, 3, 10


@pytest.fixture(scope="module")
def stage3_run(tmp_path_factory):
    """Stages 1-3 on synthetic embeddings (3 classes × 8, D = 10) with the smoke preset's cVPN."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the function-scoped `one_thread`
    try:
        out = tmp_path_factory.mktemp("umap") / "run"
        cfg = load_config("smoke", ["sample.draws_per_round=20"], out=str(out))
        run = RunDir.create(cfg)
        with run.stage("embed") as rec:
            if not rec.done:
                save_embeddings(run.path("embeddings"),
                                **synthetic_embeddings(CLASSES, PER_CLASS, DIM, seed=0, rank=2))
        train_cvpn.run(cfg, run, progress=False)
        sample.run(cfg, run, progress=False)
        return run
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def run(stage3_run, tmp_path):
    """A private copy of the stage-3 run (maps write their cache into the run folder)."""
    shutil.copytree(stage3_run.root, tmp_path / "run")
    return RunDir.open(tmp_path / "run")


class RecordingUMAP(umap.UMAP):
    """umap.UMAP that remembers its constructor arguments and counts transform calls."""

    made: list = []
    transforms = 0

    def __init__(self, **kwargs):
        RecordingUMAP.made.append(kwargs)
        super().__init__(**kwargs)

    def transform(self, X, *args, **kwargs):
        RecordingUMAP.transforms += 1
        return super().transform(X, *args, **kwargs)


@pytest.fixture
def recording(monkeypatch):
    RecordingUMAP.made, RecordingUMAP.transforms = [], 0
    monkeypatch.setattr(umap, "UMAP", RecordingUMAP)
    return RecordingUMAP


def _mapped_methods(stage3=True):
    """Every registered method that produces embeddings, stage 3's (smoke: ncis) first; without a
    stage 3, the others that need no cVPN."""
    others = [m for m in method_names(EMBEDDINGS) if m != "ncis"]
    return ("ncis", *others) if stage3 else tuple(m for m in others if "cvpn" not in get_method(m).needs)


def _brute_force_knn(x: np.ndarray, k: int):
    d = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


def test_the_knn_handed_to_umap_is_the_exact_one_self_included(run, recording):
    m = viz_maps.umap_map(run, cache=False, progress=False)
    x = load_embeddings(run.path("embeddings"))["embeddings"].numpy()
    k = min(15, len(x) - 1)
    indices, distances, index = recording.made[0]["precomputed_knn"]
    expected_indices, expected_distances = _brute_force_knn(x, k)
    assert indices.shape == (len(x), k) and m.params["n_neighbors"] == k
    assert np.array_equal(indices, expected_indices)
    assert np.allclose(distances, expected_distances, atol=1e-4)
    assert np.array_equal(indices[:, 0], np.arange(len(x)))           # the first neighbour is the point
    # the search index UMAP's transform queries answers with the same exact neighbours
    q_idx, q_dist = index.query(x[:4] + 0.01, 5)
    e_idx = np.argsort(((x[:4, None] + 0.01 - x[None]) ** 2).sum(-1), axis=1)[:, :5]
    assert np.array_equal(q_idx, e_idx) and q_dist.dtype == np.float32


def test_same_seed_same_map_other_seed_other_map(run):
    a = viz_maps.umap_map(run, cache=False, progress=False)
    b = viz_maps.umap_map(run, cache=False, progress=False)
    c = viz_maps.umap_map(run, seed=7, cache=False, progress=False)
    assert a.params["seed"] == run.cfg.run.seed and c.params["seed"] == 7
    assert np.array_equal(a.coords, b.coords)
    for method in a.methods:
        assert np.array_equal(a.outlier_coords[method], b.outlier_coords[method])
    assert not np.allclose(a.coords, c.coords)


def test_outliers_are_placed_with_transform(run, recording):
    m = viz_maps.umap_map(run, cache=False, progress=False)
    per_class = run.cfg.sample.rounds * run.cfg.sample.keep_per_round
    # every registered method that produces embeddings, stage 3's first; one transform per method
    assert m.methods == _mapped_methods() and recording.transforms == len(m.methods)
    assert m.coords.shape == (CLASSES * PER_CLASS, 2) and np.isfinite(m.coords).all()
    stored = load_outliers(run.path("outlier_embeddings"))
    for method in m.methods:
        per_class = len(m.outlier_labels[method]) // CLASSES
        if method in ("ncis", "linear"):  # the tail sampler's M = rounds × keep, as stage 3 wrote
            assert per_class == stored["outliers"].shape[1]
        assert m.outlier_coords[method].shape == (CLASSES * per_class, 2)
        assert np.isfinite(m.outlier_coords[method]).all()
        assert np.array_equal(m.outlier_labels[method], np.repeat(np.arange(CLASSES), per_class))
    assert np.allclose(m.outlier_log_density["ncis"], stored["log_density"].numpy().reshape(-1))


def test_a_per_class_map_holds_only_that_class(run):
    m = viz_maps.umap_map(run, classes=[1], progress=False)
    assert m.classes == [1] and m.coords.shape == (PER_CLASS, 2)
    assert set(m.labels.tolist()) == {1} and m.params["n_neighbors"] == PER_CLASS - 1   # clipped
    ids = load_embeddings(run.path("embeddings"))["image_ids"].numpy()[PER_CLASS:2 * PER_CLASS]
    assert np.array_equal(np.sort(m.image_ids), np.sort(ids))
    for method in m.methods:
        assert set(m.outlier_labels[method].tolist()) == {1}
    with pytest.raises(ValueError, match="not class indices"):
        viz_maps.umap_map(run, classes=[CLASSES], progress=False)


def test_the_cache_is_reused_and_follows_the_embeddings(run, monkeypatch):
    first = viz_maps.umap_map(run, progress=False)
    assert not first.from_cache and (viz_maps.umap_cache_dir(run) / f"{first.params['key']}.npz").exists()

    class Refuse:
        def __init__(self, **kwargs):
            raise AssertionError("UMAP refitted although the map is cached")

    monkeypatch.setattr(umap, "UMAP", Refuse)
    again = viz_maps.umap_map(RunDir.open(run.root), progress=False)        # as a fresh process would
    assert again.from_cache and again.methods == first.methods and again.class_names == first.class_names
    assert np.array_equal(again.coords, first.coords) and np.array_equal(again.image_ids, first.image_ids)
    for method in first.methods:
        assert np.array_equal(again.outlier_coords[method], first.outlier_coords[method])
        assert np.array_equal(again.outlier_log_density[method], first.outlier_log_density[method],
                              equal_nan=True)  # NaN: knn_boundary draws from no Gaussian
    # other settings: another key, so a refit
    with pytest.raises(AssertionError, match="refitted"):
        viz_maps.umap_map(run, min_dist=0.3, progress=False)
    # stage 1 redone with other embeddings: the cached map no longer applies
    cfg2 = load_config("smoke", ["sample.draws_per_round=20", "embed.lr=0.5"], out=str(run.root))
    run2 = RunDir.create(cfg2)
    with run2.stage("embed"):
        save_embeddings(run2.path("embeddings"),
                        **synthetic_embeddings(CLASSES, PER_CLASS, DIM, seed=1, rank=2))
    with pytest.raises(AssertionError, match="refitted"):
        viz_maps.umap_map(run2, methods=("linear",), progress=False)


def test_linear_outliers_are_those_compare_renders(run, monkeypatch):
    from ncis_core.outliers.linear import sample_linear
    from ncis_core.compare import render_outliers
    from ncis_core.stages.sample import method_outlier_embeddings, sample_inputs
    from ncis_core.stages import generate as stage4

    rendered = {}
    monkeypatch.setattr(stage4, "prepare", lambda cfg, names, device: (None, None))
    def record(pipe, tokens, batches, todo, outliers, *args, **kwargs):  # no images: keep the embeddings
        rendered["outliers"] = outliers

    monkeypatch.setattr(stage4, "render_batches", record)
    render_outliers(run.cfg, run, "linear", progress=False)
    shared = method_outlier_embeddings(run.cfg, run, "linear", progress=False)
    assert torch.equal(rendered["outliers"], shared["outliers"])
    # … which are stage 3's tail sampling in embedding space on stage 3's training rows
    direct = sample_linear(sample_inputs(run.cfg, run), progress=False)
    assert torch.equal(shared["outliers"], direct["outliers"].float()) and shared["method"] == "linear"
    m = viz_maps.umap_map(run, methods=("linear",), progress=False)
    assert np.array_equal(m.outlier_log_density["linear"], shared["log_density"].numpy().reshape(-1))


def test_missing_stage_1_is_a_clear_error_and_missing_stage_3_a_warning(tmp_path):
    cfg = load_config("smoke", out=str(tmp_path / "empty"))
    with pytest.raises(MissingArtefactError, match=r"stage 1 \(embed\)"):
        viz_maps.umap_map(RunDir.create(cfg), progress=False)
    run = RunDir.create(load_config("smoke", out=str(tmp_path / "only1")))
    with run.stage("embed"):
        save_embeddings(run.path("embeddings"), **synthetic_embeddings(2, 6, DIM, seed=0, rank=2))
    with pytest.warns(UserWarning, match=r"no ncis outlier embeddings to map .*stage 3"):
        m = viz_maps.umap_map(run, progress=False)
    assert m.methods == _mapped_methods(stage3=False) and m.coords.shape == (12, 2)
    with pytest.raises(ValueError, match="unknown outlier methods"):
        viz_maps.umap_map(run, methods=("pca",), progress=False)


def test_too_few_points_is_clear_and_small_classes_are_left_out(tmp_path):
    run = RunDir.create(load_config("smoke", out=str(tmp_path / "run")))
    data = synthetic_embeddings(2, 6, DIM, seed=0, rank=2)
    keep = torch.cat([torch.arange(6), torch.arange(6, 9)])                # class 1 keeps 3 rows
    data = {**data, "embeddings": data["embeddings"][keep], "labels": data["labels"][keep],
            "image_ids": data["image_ids"][keep]}
    with run.stage("embed"):
        save_embeddings(run.path("embeddings"), **data)
    with pytest.raises(viz_maps.TooFewEmbeddings, match="3 embedding\\(s\\) of class_1: a UMAP map needs at least 5"):
        viz_maps.umap_map(run, classes=[1], methods=(), progress=False)
    with pytest.warns(UserWarning, match="class 1 left out"):
        maps = viz_maps.umap_maps_per_class(run, [0, 1], methods=(), progress=False)
    assert [m.classes for m in maps] == [[0]] and maps[0].params["n_neighbors"] == 5
    # every class left out: one TooLittleData (a notebook shows it as a note) naming the key
    every_class_too_small = r"no class has the 5 embeddings .*classes 1: 3; .*embed.max_per_class"
    with pytest.warns(UserWarning, match="class 1 left out"), \
            pytest.raises(TooLittleData, match=every_class_too_small):
        viz_maps.umap_maps_per_class(run, [1], methods=(), progress=False)
    with pytest.raises(TooLittleData, match="embed.max_per_class"):
        viz_maps.plot_umap_per_class([])
    with pytest.raises(TooLittleData, match="embed.max_per_class"):
        viz_maps.umap_map(run, classes=[1], methods=(), progress=False)


def test_pictures(run):
    import matplotlib.pyplot as plt

    m = viz_maps.umap_map(run, progress=False)
    fig = viz_maps.plot_umap_map(m)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "class_0 (8)" in labels and any(lab.startswith("NCIS outliers") for lab in labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # nothing to complain about
        maps = viz_maps.umap_maps_per_class(run, range(CLASSES), progress=False)
    grid = viz_maps.plot_umap_per_class(maps)
    assert len([ax for ax in grid.axes if ax.has_data()]) == CLASSES
    plt.close("all")


def test_a_method_that_refuses_this_few_rows_is_left_off_the_map_with_a_warning(run, monkeypatch):
    """knn_boundary needs more rows per class than its k: on a quick run (two embeddings per class)
    the map shows the other methods instead of stopping the notebook."""
    from ncis_core.outliers import knn_boundary

    with pytest.raises(TooLittleData, match="knn_boundary needs more than k = 3"):
        knn_boundary.sample_class(torch.randn(2, DIM), 1.0, knn_boundary.KnnBoundaryParams(k=3, select=2),
                                  seed=0, cls=0)
    real = knn_boundary.sample_class

    def too_few(x, *args, **kwargs):
        return real(x[:2], *args, **kwargs)  # as if the class had two embeddings

    monkeypatch.setattr(knn_boundary, "sample_class", too_few)
    with pytest.warns(UserWarning, match=r"no knn_boundary outlier embeddings to map \(class 0 has 2"):
        m = viz_maps.umap_map(run, progress=False)
    assert m.methods == tuple(x for x in _mapped_methods() if x != "knn_boundary")


def test_outlier_markers_are_drawn_above_the_id_dots(run):
    """On a many-class map UMAP lays a class's outliers onto its own cluster: markers under the dots
    were invisible (the explorer's "all classes" map of the demo showed none)."""
    import matplotlib.pyplot as plt

    for classes in (None, [1]):
        m = viz_maps.umap_map(run, classes=classes, progress=False)
        ax = viz_maps.plot_umap_map(m).axes[0]
        names = tuple(m.class_names)
        dots = [c for c in ax.collections if c.get_label().startswith(names)]
        markers = [c for c in ax.collections if not c.get_label().startswith(names) and len(c.get_offsets())]
        assert len(dots) == len(m.classes) and len(markers) == len(m.methods) >= 2
        assert min(c.get_zorder() for c in markers) > max(c.get_zorder() for c in dots)
    plt.close("all")


def test_other_methods_outlier_embeddings_are_computed_once_per_inputs(run, monkeypatch):
    from ncis_core.stages import sample as sources

    first = sources.method_outlier_embeddings(run.cfg, run, "linear", progress=False)
    real = sources.sample_method
    calls = []
    monkeypatch.setattr(sources, "sample_method", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = sources.method_outlier_embeddings(run.cfg, run, "linear", progress=False)
    assert calls == []  # read back from RUN/cache/outlier_embeddings
    assert torch.equal(again["outliers"], first["outliers"]) and again["method"] == "linear"
    assert torch.equal(again["log_density"], first["log_density"])
    # another tail depth is another result: sampled anew
    deeper = load_config("smoke", ["sample.draws_per_round=40"], out=str(run.root))
    other = sources.method_outlier_embeddings(deeper, RunDir(run.root, deeper), "linear", progress=False)
    assert calls == [1] and not torch.equal(other["outliers"], first["outliers"])


def test_the_setup_warm_up_compiles_the_argument_types_a_map_passes(run, monkeypatch):
    """numba compiles per argument type: ``compile_umap_kernels`` (``make setup``) must hand UMAP's
    fit and transform what ``umap_map`` hands them, or the first real map compiles again."""
    seen = {}
    real = viz_maps._fit_and_place

    def recording(x, outliers, *args, **kwargs):
        seen.setdefault("calls", []).append(
            (x.dtype, x.ndim, x.flags.c_contiguous, sorted({(o.dtype, o.ndim, o.flags.c_contiguous)
                                                            for o in outliers.values()}, key=str)))
        return real(x, outliers, *args, **kwargs)

    monkeypatch.setattr(viz_maps, "_fit_and_place", recording)
    viz_maps.umap_map(run, cache=False, progress=False)
    seconds = viz_maps.compile_umap_kernels(points=40, dim=4)
    map_types, warm_types = seen["calls"]
    assert map_types == warm_types
    assert map_types[0] == np.float32 and seconds > 0
