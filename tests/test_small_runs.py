"""The notebook series on runs with one and two stage-1 embeddings per class (a quick check at a
paper preset's shapes embeds that few): every view with too little data to draw says so in its
notebook and the series goes on; a stage that cannot work on that little refuses in one line that
names the key to change."""

import json

import nbformat
import pytest

from ncis_core.runner import NotebookFailed, notebook_series, run_series


def _notes(executed_notebook) -> str:
    """Every markdown output of the executed notebook's code cells, joined."""
    nb = nbformat.read(str(executed_notebook), as_version=4)
    return "\n".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))


@pytest.mark.heavy
def test_one_embedding_per_class_draws_what_it_can_and_stage_2_refuses_naming_the_key(tmp_path):
    out = tmp_path / "tiny"
    with pytest.raises(NotebookFailed) as failure:
        run_series("smoke", out, ["embed.max_per_class=1"], progress=False)
    message = str(failure.value)
    assert message.startswith("02_train_cvpn.ipynb failed")
    assert "class 0 has 1 embeddings (need at least 2 for a class covariance)" in message
    assert "embed.max_per_class" in message
    status = json.loads((out / "manifest.json").read_text())["notebooks"]
    assert status["00_data.ipynb"]["status"] == status["01_embed.ipynb"]["status"] == "complete"
    # notebook 01: six embeddings make the all-classes map; one per class makes no per-class map
    assert (out / "figures" / "01_umap.png").exists() and not (out / "figures" / "01_umap_per_class.png").exists()
    notes = _notes(out / "notebooks" / "01_embed.ipynb")
    assert "per-class UMAP maps not drawn: no class has the 5 embeddings a UMAP map needs" in notes
    assert "embed.max_per_class" in notes


@pytest.mark.heavy
def test_two_embeddings_per_class_run_the_whole_series(tmp_path):
    out = tmp_path / "tiny"
    executed = run_series("smoke", out, ["embed.max_per_class=2"], progress=False)
    assert [p.name for p in executed] == [p.name for _, p in notebook_series()]  # 00 … 07, all ran
    for notebook in ("01_embed.ipynb", "03_sample_outliers.ipynb"):
        assert "per-class UMAP maps not drawn" in _notes(out / "notebooks" / notebook)
    # knn_boundary (smoke: k = 3) cannot sample two rows per class: left off 03's class map, said so
    notes = _notes(out / "notebooks" / "03_sample_outliers.ipynb")
    assert "kNN boundary: class 0 has 2 training embeddings" in notes
    for figure in ("01_umap.png", "03_umap.png", "03_class_map.png", "06_histograms.png",
                   "07_all_classes_ncis.png"):
        assert (out / "figures" / figure).stat().st_size > 1000, figure
