"""Notebooks 02 and 03 on the smoke preset, through the papermill runner.

Until stage 1 has a notebook the runner skips 02/03 in a plain series (their input has no producer
notebook), so this test first puts the smoke preset's synthetic stand-in embeddings into the run
folder, exactly as notebook 02 itself would, and then runs stages 2-3.
"""

import json

import nbformat
import pytest

from ncis_core.config import load_config
from ncis_core.runner import run_series
from ncis_core.runs import RunDir
from ncis_core.stages.train_cvpn import ensure_smoke_embeddings


@pytest.mark.heavy
def test_notebooks_02_and_03_run_on_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")   # the kernels' tiny tensors gain nothing from threads
    out = tmp_path / "smoke"
    cfg = load_config("smoke", out=str(out))
    assert "SYNTHETIC" in ensure_smoke_embeddings(cfg, RunDir.create(cfg))
    executed = run_series("smoke", out, stages="2-3", progress=False)
    assert [p.name for p in executed] == ["02_train_cvpn.ipynb", "03_sample_outliers.ipynb"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert {manifest["stages"][s]["status"] for s in ("embed", "cvpn", "sample")} == {"complete"}
    for figure in ["02_losses.png", "02_pca_spectrum.png", "02_invariant_energy.png",
                   "03_invariant_energy.png", "03_class_map.png"]:
        assert (out / "figures" / figure).stat().st_size > 1000
    text = json.dumps(nbformat.read(str(executed[0]), as_version=4).cells)
    assert "SYNTHETIC" in text                                  # said loudly in the notebook
