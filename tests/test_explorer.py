"""The class explorer on the shared smoke run (stages 1-4): its data functions against the
artefacts read directly, the widget driven from Python, and the static twins' files."""

import json
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest
from diffusion_fixtures import copy_run

from ncis_core.embeddings_io import load_embeddings
from ncis_core.runs import MissingArtefactError, RunDir
from ncis_core.outliers.files import load_outliers
from ncis_core.viz import explorer


@pytest.fixture(scope="module")
def data(smoke_run_1_to_4):
    return explorer.ExplorerData.load(RunDir.open(smoke_run_1_to_4))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _index(run_root):
    return json.loads((run_root / "outliers" / "index.json").read_text())["images"]


def test_outlier_images_of_a_class_carry_minus_the_log_density_of_their_embedding(data, smoke_run_1_to_4):
    index = _index(smoke_run_1_to_4)
    log_density = load_outliers(smoke_run_1_to_4 / "outlier_embeddings.safetensors")["log_density"]
    with_images = explorer.classes_with_images(data)
    assert with_images == sorted({e["class"] for e in index}) and with_images
    for c in with_images:
        found = explorer.outlier_images(data, c, "ncis")
        entries = {e["file"]: e for e in index if e["class"] == c}
        assert {o.file for o in found} == set(entries)
        for o in found:
            assert o.class_index == c and o.class_name == data.class_names[c]
            assert o.embedding_index == entries[o.file]["embedding_index"]
            assert o.energy == pytest.approx(-float(log_density[c, o.embedding_index]))
            assert o.path == smoke_run_1_to_4 / "outliers" / o.file and o.path.exists()
        energies = [o.energy for o in found]
        assert energies == sorted(energies, reverse=True)  # highest energy first
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
    assert data.methods == ["ncis", "linear", "knn_boundary"] and data.index("linear") is None
    view = explorer.class_view(data, 0, "linear", n=3)
    assert not view.rendered and view.outliers == [] and "run `python -m ncis_core compare" in view.message
    assert len(view.id_pixels) == 8  # the real images are shown all the same
    with pytest.raises(ValueError, match="unknown outlier method"):
        explorer.outlier_images(data, 0, "vos")


def test_linear_images_once_rendered_carry_the_linear_energies(smoke_run_1_to_4, tmp_path):
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
    _, linear_log_density = data.outlier_embeddings("linear")
    found = explorer.outlier_images(data, 1, "linear")
    assert len(found) == sum(e["class"] == 1 for e in index)
    for o in found:
        assert o.path.parent.parent == linear_dir
        assert o.energy == pytest.approx(-float(linear_log_density[1, o.embedding_index]))
    view = explorer.class_view(data, 1, "linear", n=2)
    assert view.rendered and len(view.outliers) == 2


def test_widget_builds_and_follows_the_class_dropdown(data):
    app = explorer.class_explorer(data, class_index=0, gallery_size=3, neighbours=2, thumbnail=48)
    assert app.count_slider.value == 3 and "ncis-class-dropdown" in app.class_dropdown._dom_classes

    def gallery():
        items = app.gallery.children
        assert all("ncis-outlier" in item._dom_classes for item in items)
        images = [item.children[0] for item in items]
        assert all("ncis-outlier-image" in im._dom_classes and im.format == "png" for im in images)
        return [bytes(im.value) for im in images], [item.children[1].tooltip for item in items]

    pngs, tooltips = gallery()
    assert len(pngs) == 3 and all(t.startswith("ncis/0/") for t in tooltips)
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    assert len(app.id_gallery.children) == 8 and bytes(app.map_image.value).startswith(b"\x89PNG")
    first_map = bytes(app.map_image.value)

    app.class_dropdown.value = 1
    new_pngs, new_tooltips = gallery()
    assert len(new_pngs) == 3 and all(t.startswith("ncis/1/") for t in new_tooltips)
    assert new_pngs != pngs and bytes(app.map_image.value) != first_map
    assert app.view.class_index == 1 and {o.class_index for o in app.view.outliers} == {1}

    app.count_slider.value = 2
    assert len(gallery()[0]) == 2
    app.class_dropdown.value = explorer.ALL_CLASSES
    assert len(gallery()[0]) == 2 and app.view.title == "all classes"

    # a click on an outlier's energy button shows it with its nearest ID images
    second = app.view.outliers[1]
    app.gallery.children[1].children[1].click()
    assert app.detail_view.outlier == second and len(app.detail_view.neighbours) == 2
    assert "ncis-detail" in app.detail._dom_classes
    detail_images = app.detail.children[1].children
    assert "ncis-detail-image" in detail_images[0]._dom_classes

    app.method_toggle.value = "linear"  # not rendered on this run: a message instead of a gallery
    assert [c._dom_classes for c in app.gallery.children] == [("ncis-gallery-empty",)]
    assert "compare" in app.gallery.children[0].value and app.detail_view is None


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
