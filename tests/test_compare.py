"""`compare` on smoke: stages 1-4 once, then every method × 2 seeds, the table, resume."""

import json

import pytest

from ncis_core.compare import aggregate, compare, format_comparison
from ncis_core.config import load_config
from ncis_core.runs import RunDir

OVERRIDES = ["classifier.epochs=1", "evaluate.extra_scores=[]"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    from ncis_core.stages import embed, generate, sample, train_cvpn

    out = tmp_path_factory.mktemp("compare") / "run"
    cfg = load_config("smoke", OVERRIDES, out=str(out))
    run = RunDir.create(cfg)
    for stage in (embed, train_cvpn, sample, generate):
        stage.run(cfg, run, progress=False)
    return out


@pytest.mark.slow
def test_compare_on_smoke(smoke_run):
    result = compare("smoke", smoke_run, ["none", "idgen", "linear", "ncis"], [0, 1], OVERRIDES, progress=False)
    table = (smoke_run / "compare" / "table.md").read_text()
    for needle in ["### Near-OOD", "### Far-OOD", "### All OOD sets", "### ID accuracy", "Positive class: ID positive",
                   "Mean ± std over 2 seed(s)", "How far the outlier embeddings moved the images"]:
        assert needle in table
    for method in ["none", "idgen", "linear", "ncis"]:
        assert f"| **mean (far)** | {method} |" in table
        for seed in (0, 1):
            assert (smoke_run / "compare" / method / f"seed{seed}" / "results" / "metrics.json").exists()
    # the baselines were rendered with NCIS's plan: same files, same seeds
    ncis = json.loads((smoke_run / "outliers" / "index.json").read_text())["images"]
    for method in ("linear", "idgen"):
        other = json.loads((smoke_run / f"outliers_{method}" / "index.json").read_text())["images"]
        assert [(i["file"], i["seed"]) for i in other] == [(i["file"], i["seed"]) for i in ncis]
    assert {s["method"] for s in result["pixel_shift"]} == {"linear", "ncis"}
    # rerun: every (method, seed) is complete and current, nothing is retrained
    mtime = (smoke_run / "compare" / "ncis" / "seed0" / "best.safetensors").stat().st_mtime
    again = compare("smoke", smoke_run, ["none", "idgen", "linear", "ncis"], [0, 1], OVERRIDES, progress=False)
    assert again["rows"] == result["rows"]
    assert (smoke_run / "compare" / "ncis" / "seed0" / "best.safetensors").stat().st_mtime == mtime


def test_aggregate_mean_and_sample_std():
    def res(fpr):
        rows = [{"score": "energy", "set": "a", "role": "ood-far", "fpr95": fpr, "auroc": 0.5,
                 "aupr_in": 0.5, "aupr_out": 0.5}]
        return {"rows": rows, "id_accuracy": 0.9}

    rows = aggregate({"m": [res(0.1), res(0.3)]}, "energy")
    assert rows[0]["fpr95_mean"] == pytest.approx(0.2) and rows[0]["fpr95_std"] == pytest.approx(0.1414, abs=1e-4)
    assert "| a | m | 20.0 ± 14.1 |" in format_comparison(rows, "ID positive", "energy")


def test_unknown_method_and_no_seeds_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        compare("smoke", tmp_path, ["ncis", "vos"], [0])
    with pytest.raises(ValueError, match="at least one seed"):
        compare("smoke", tmp_path, ["ncis"], [])
