"""The class explorer on the shared smoke run (stages 1-4): its data functions against the
artefacts read directly (the per-outlier measures against simple loops), the widget driven from
Python, and the static twins' files."""

import json
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from diffusion_fixtures import copy_run

from ncis_core.embeddings_io import load_embeddings
from ncis_core.runs import MissingArtefactError, RunDir
from ncis_core.outliers.base import EMBEDDINGS, method_names
from ncis_core.embeddings_io import load_outliers
from ncis_core.stages.train_cvpn import load_result
from ncis_core.viz import explorer


@pytest.fixture(scope="module")
def data(smoke_run_1_to_4):
    return explorer.ExplorerData.load(RunDir.open(smoke_run_1_to_4))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _methods_stage3_first():
    """Every registered method that produces embeddings, the smoke run's stage-3 method (ncis) first."""
    return ["ncis", *[m for m in method_names(EMBEDDINGS) if m != "ncis"]]


def _index(run_root):
    return json.loads((run_root / "outliers" / "index.json").read_text())["images"]


def _loop_measures(run_root, outliers):
    """Each outlier's nearest-ID distance and invariant energy, one outlier at a time: the distance
    to every stage-1 row of its class by hand, the cVPN applied to one row (notebooks 02/03's
    ``invariant_energy(model, x - mean, labels, k)``, written out)."""
    emb = load_embeddings(run_root / "embeddings.safetensors")
    x, labels = emb["embeddings"].numpy().astype(np.float64), emb["labels"].numpy()
    run = RunDir.open(run_root)
    cvpn = load_result(run.cfg, run, device="cpu")
    distance, energy = np.zeros(outliers.shape[:2]), np.zeros(outliers.shape[:2])
    for c in range(outliers.shape[0]):
        for m in range(outliers.shape[1]):
            point = outliers[c, m]
            distance[c, m] = min(np.sqrt(((row - point.numpy().astype(np.float64)) ** 2).sum())
                                 for row in x[labels == c])
            with torch.no_grad():
                z = cvpn.model((point - cvpn.mean)[None], torch.tensor([c]))[0]
            energy[c, m] = float((z[-cvpn.k:].double() ** 2).mean())
    return distance, energy


def test_every_method_has_both_measures_equal_to_a_loop(data, smoke_run_1_to_4):
    seen = {}
    for method in data.methods:  # every method of the registry that produces embeddings
        outliers, _ = data.outlier_embeddings(method)
        distance, energy = data.measures(method)
        assert distance.shape == energy.shape == (outliers.shape[0] * outliers.shape[1],)
        expected_distance, expected_energy = _loop_measures(smoke_run_1_to_4, outliers)
        assert distance == pytest.approx(expected_distance.reshape(-1), rel=1e-9, abs=1e-12)
        assert energy == pytest.approx(expected_energy.reshape(-1), rel=1e-5, abs=1e-9)
        assert np.isfinite(distance).all() and np.isfinite(energy).all() and (distance > 0).all()
        seen[method] = distance
        # a subset, asked for in any order, is the same numbers (smoke: rows 1, 3, 1 of M = 4)
        last = outliers.shape[1] - 1
        some_c, some_m = np.array([2, 0, 2]), np.array([min(1, last), last, min(1, last)])
        part = data.measures(method, some_c, some_m)
        assert part[0] == pytest.approx(expected_distance[some_c, some_m].tolist(), rel=1e-9)
    assert data.methods == _methods_stage3_first()
    # unlike stage 3's log-densities, the measures tell NCIS and the linear baseline apart
    assert np.abs(seen["ncis"] - seen["linear"]).max() > 1e-3


def test_the_nearest_id_distance_is_exact_per_class():
    rows = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1e4, 1e4], [-5.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    # a point 1e-3 from a row of norm 1.4e4: the ‖a‖² + ‖b‖² − 2ab shortcut would lose it
    points = torch.tensor([[0.0, 4.0], [1e4, 1e4 + 1e-3], [-2.0, 4.0], [3.0, 0.0]], dtype=torch.float64)
    out = explorer.nearest_id_distance(points, torch.tensor([0, 1, 2, 3]), rows, labels)
    assert out.dtype == torch.float64 and out[:3].tolist() == pytest.approx([4.0, 1e-3, 5.0], rel=1e-9)
    assert torch.isnan(out[3])  # class 3 has no embeddings


def test_outlier_images_of_a_class_carry_their_measures_largest_distance_first(data, smoke_run_1_to_4):
    index = _index(smoke_run_1_to_4)
    outliers = load_outliers(smoke_run_1_to_4 / "outlier_embeddings.safetensors")["outliers"]
    expected_distance, expected_energy = _loop_measures(smoke_run_1_to_4, outliers)
    with_images = explorer.classes_with_images(data)
    assert with_images == sorted({e["class"] for e in index}) and with_images
    for c in with_images:
        found = explorer.outlier_images(data, c, "ncis")
        entries = {e["file"]: e for e in index if e["class"] == c}
        assert {o.file for o in found} == set(entries)
        for o in found:
            assert o.class_index == c and o.class_name == data.class_names[c]
            assert o.embedding_index == entries[o.file]["embedding_index"]
            assert o.nearest_id_distance == pytest.approx(expected_distance[c, o.embedding_index], rel=1e-9)
            assert o.invariant_energy == pytest.approx(expected_energy[c, o.embedding_index], rel=1e-5)
            assert o.path == smoke_run_1_to_4 / "outliers" / o.file and o.path.exists()
            # the caption: name + value + unit of each
            assert o.caption() == (f"nearest-ID distance {o.nearest_id_distance:.3g} (L2)\n"
                                   f"invariant energy {o.invariant_energy:.3g} (mean z²)")
        distances = [o.nearest_id_distance for o in found]
        assert distances == sorted(distances, reverse=True)  # furthest from the class first
    assert len(explorer.outlier_images(data, explorer.ALL_CLASSES, "ncis")) == len(index)
    empty = next(c for c in range(len(data.class_names)) if c not in with_images)  # smoke: 3 of 6 classes
    assert explorer.outlier_images(data, empty) == []
    assert "no NCIS outlier images" in explorer.class_view(data, empty).message


def test_nearest_id_images_equal_a_brute_force_search(data, smoke_run_1_to_4):
    emb = load_embeddings(smoke_run_1_to_4 / "embeddings.safetensors")
    x = emb["embeddings"].numpy().astype(np.float64)
    outliers = load_outliers(smoke_run_1_to_4 / "outlier_embeddings.safetensors")["outliers"].numpy()
    for outlier in explorer.outlier_images(data)[:5]:
        query = outliers[outlier.class_index, outlier.embedding_index].astype(np.float64)
        distance = np.sqrt(((x - query) ** 2).sum(axis=1))
        expected = np.argsort(distance, kind="stable")[:4]
        found = explorer.nearest_id_images(data, outlier, k=4)
        assert [n.image_id for n in found] == emb["image_ids"].numpy()[expected].tolist()
        assert [n.class_index for n in found] == emb["labels"].numpy()[expected].tolist()
        assert [n.distance for n in found] == pytest.approx(distance[expected].tolist())


def test_id_examples_are_seeded_images_of_the_class(data):
    labels = np.asarray(data.id_split.dataset.labels)
    for c in range(len(data.class_names)):
        ids = explorer.id_examples(data, c, n=3, seed=0)
        assert len(ids) == 3 and set(labels[ids]) == {c}
        assert ids == explorer.id_examples(data, c, n=3, seed=0)
    assert len(explorer.id_examples(data, explorer.ALL_CLASSES, n=100)) == len(labels)


def test_the_linear_baseline_without_images_says_to_run_compare(data):
    assert data.methods == _methods_stage3_first() and data.index("linear") is None
    view = explorer.class_view(data, 0, "linear", n=3)
    assert not view.rendered and view.outliers == [] and "run `python -m ncis_core compare" in view.message
    assert len(view.id_pixels) == 8  # the real images are shown all the same
    with pytest.raises(ValueError, match="unknown outlier method"):
        explorer.outlier_images(data, 0, "vos")


def test_linear_images_once_rendered_carry_their_own_measures(smoke_run_1_to_4, tmp_path):
    run = RunDir.open(copy_run(smoke_run_1_to_4, tmp_path / "run"))
    # stand-in for `compare`'s render: the same plan, files and seeds as stage 4 (its index format)
    linear_dir = run.root / "outliers_linear"
    linear_dir.mkdir()
    index = _index(run.root)
    for e in index:
        (linear_dir / e["file"]).parent.mkdir(exist_ok=True)
        (linear_dir / e["file"]).write_bytes((run.root / "outliers" / e["file"]).read_bytes())
    (linear_dir / "index.json").write_text(json.dumps({"method": "linear", "images": [
        {k: e[k] for k in ("file", "class", "embedding_index", "seed")} for e in index]}))
    data = explorer.ExplorerData.load(run)
    linear_outliers, _ = data.outlier_embeddings("linear")
    expected_distance, expected_energy = _loop_measures(run.root, linear_outliers)
    found = explorer.outlier_images(data, 1, "linear")
    assert len(found) == sum(e["class"] == 1 for e in index)
    for o in found:
        assert o.path.parent.parent == linear_dir
        assert o.nearest_id_distance == pytest.approx(expected_distance[1, o.embedding_index], rel=1e-9)
        assert o.invariant_energy == pytest.approx(expected_energy[1, o.embedding_index], rel=1e-5)
    view = explorer.class_view(data, 1, "linear", n=2)
    assert view.rendered and len(view.outliers) == 2


def test_widget_builds_and_follows_the_class_dropdown(data):
    app = explorer.class_explorer(data, class_index=0, gallery_size=3, neighbours=2, thumbnail=48)
    assert app.count_slider.value == 3 and "ncis-class-dropdown" in app.class_dropdown._dom_classes

    def gallery():
        items = app.gallery.children
        assert all("ncis-outlier" in item._dom_classes for item in items)
        # each item: the image with a transparent button over it (one grid cell), then the caption
        images = [item.children[0].children[0] for item in items]
        buttons = [item.children[0].children[1] for item in items]
        assert all("ncis-outlier-image" in im._dom_classes and im.format == "png" for im in images)
        assert all("ncis-outlier-select" in b._dom_classes and b.layout.grid_area == im.layout.grid_area
                   for b, im in zip(buttons, images))
        for item, outlier in zip(items, app.view.outliers):
            assert item.children[1].value == outlier.caption(sep="<br>")
            assert "nearest-ID distance" in item.children[1].value and "(L2)" in item.children[1].value
        return [bytes(im.value) for im in images], [b.tooltip for b in buttons]

    pngs, tooltips = gallery()
    assert len(pngs) == 3 and all(t.startswith("ncis/0/") for t in tooltips)
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    assert len(app.id_gallery.children) == 8 and bytes(app.map_image.value).startswith(b"\x89PNG")
    first_map = bytes(app.map_image.value)
    # the map keeps its own size and aspect ratio beside a tall gallery (no stretch to the row)
    assert app.map_image.layout.align_self == "flex-start" and app.map_image.layout.height == "auto"
    assert app.map_image.layout.object_fit == "contain"

    app.class_dropdown.value = 1
    new_pngs, new_tooltips = gallery()
    assert len(new_pngs) == 3 and all(t.startswith("ncis/1/") for t in new_tooltips)
    assert new_pngs != pngs and bytes(app.map_image.value) != first_map
    assert app.view.class_index == 1 and {o.class_index for o in app.view.outliers} == {1}

    app.count_slider.value = 2
    assert len(gallery()[0]) == 2
    app.class_dropdown.value = explorer.ALL_CLASSES
    assert len(gallery()[0]) == 2 and app.view.title == "all classes"

    # a click on an outlier's image (the button over it) shows it with its nearest ID images, frames
    # it in the gallery and rings it on the map
    assert "ncis-selected" in app.gallery.children[0]._dom_classes
    map_with_first = bytes(app.map_image.value)
    second = app.view.outliers[1]
    app.gallery.children[1].children[0].children[1].click()
    assert app.detail_view.outlier == second and len(app.detail_view.neighbours) == 2
    assert ["ncis-selected" in item._dom_classes for item in app.gallery.children] == [False, True]
    assert bytes(app.map_image.value) != map_with_first
    assert second.caption(sep=", ") in app.detail.children[0].value
    assert "ncis-detail" in app.detail._dom_classes
    detail_images = app.detail.children[1].children
    assert "ncis-detail-image" in detail_images[0]._dom_classes

    app.method_toggle.value = "linear"  # not rendered on this run: a message instead of a gallery
    assert [c._dom_classes for c in app.gallery.children] == [("ncis-gallery-empty",)]
    assert "compare" in app.gallery.children[0].value and app.detail_view is None


def test_the_map_rings_the_selected_outlier_where_umap_placed_it(data):
    from ncis_core.viz.maps import umap_map

    for class_index in (1, explorer.ALL_CLASSES):
        view = explorer.class_view(data, class_index, "ncis", n=3)
        chosen = view.outliers[2]
        umap = umap_map(data.run, classes=None if class_index == explorer.ALL_CLASSES else [class_index],
                        methods=tuple(data.methods), progress=False)
        # the method's outliers of the mapped classes, class by class, M per class
        mapped = umap.classes.index(chosen.class_index) * data.outlier_embeddings("ncis")[0].shape[1]
        expected = umap.outlier_coords["ncis"][mapped + chosen.embedding_index]
        assert explorer.map_position(data.class_umap(class_index), chosen) == pytest.approx(expected)
        fig = explorer.class_map(data, class_index, selected=chosen)
        rings = [a for a in fig.axes[0].collections if a.get_gid() == "ncis-selected"]
        assert len(rings) == 1 and rings[0].get_offsets()[0].tolist() == pytest.approx(expected.tolist())
        assert not [a for a in explorer.class_map(data, class_index).axes[0].collections
                    if a.get_gid() == "ncis-selected"]


def test_static_twins_write_their_files(data, smoke_run_1_to_4):
    view = explorer.class_view(data, 2, "ncis", n=3)
    fig, path = explorer.save_class_view(data, view)
    assert path == smoke_run_1_to_4 / "figures" / "07_cat_ncis.png" and path.stat().st_size > 1000
    assert len(fig.axes) >= 1 + 2 * 3  # map, outlier row, real-image row
    detail = explorer.outlier_detail(data, view.outliers[0], k=3)
    assert [n.image_id for n in detail.neighbours] == [
        n.image_id for n in explorer.nearest_id_images(data, view.outliers[0], k=3)]
    _, path = explorer.save_outlier_detail(data, detail)
    assert path.name == f"07_detail_ncis_2_{view.outliers[0].path.stem}.png" and path.stat().st_size > 1000
    # the widget's "save figures" button writes the twins of what it shows
    app = explorer.class_explorer(data, class_index=2, gallery_size=3, neighbours=2)
    for file in app.save():
        assert file.parent == smoke_run_1_to_4 / "figures" and file.stat().st_size > 1000


def test_a_run_without_stage_4_names_the_stage(smoke_run_1_to_4, tmp_path):
    run = RunDir.open(copy_run(smoke_run_1_to_4, tmp_path / "run"))
    shutil.rmtree(run.path("outliers_dir"))
    with pytest.raises(MissingArtefactError, match="generate"):
        explorer.ExplorerData.load(run)


def test_without_a_current_cvpn_the_distance_stays_and_the_view_says_why_there_is_no_invariant_energy(
        smoke_run_1_to_4, monkeypatch):
    from ncis_core.stages import train_cvpn

    def missing(cfg, run, device=None):
        raise MissingArtefactError("cvpn/best.safetensors is missing: run stage 2 (cvpn) first")

    monkeypatch.setattr(train_cvpn, "load_result", missing)
    data = explorer.ExplorerData.load(RunDir.open(smoke_run_1_to_4))
    view = explorer.class_view(data, 0, "ncis", n=2)
    assert all(o.nearest_id_distance > 0 and np.isnan(o.invariant_energy) for o in view.outliers)
    assert view.outliers[0].caption().endswith("invariant energy n/a")
    assert "no invariant energy: cvpn/best.safetensors is missing: run stage 2" in view.message
