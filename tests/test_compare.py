"""`compare` on smoke: stages 1-4 once (the shared `smoke_run_1_to_4`), then every method × 2 seeds, the table, resume."""

import json

import pytest
from diffusion_fixtures import copy_run

from ncis_core.compare import aggregate, compare, format_comparison, format_paired, paired_differences

OVERRIDES = ["classifier.epochs=1", "evaluate.extra_scores=[]"]


@pytest.fixture(scope="module")
def smoke_run(smoke_run_1_to_4, tmp_path_factory):
    # compare writes outliers_<method>/ and compare/ into the run: work on a copy of the shared one
    return copy_run(smoke_run_1_to_4, tmp_path_factory.mktemp("compare") / "run")


@pytest.mark.heavy
def test_compare_on_smoke(smoke_run):
    result = compare("smoke", smoke_run, ["none", "idgen", "linear", "ncis"], [0, 1], OVERRIDES, progress=False)
    table = (smoke_run / "compare" / "table.md").read_text()
    for needle in ["### Near-OOD", "### Far-OOD", "### All OOD sets", "### ID accuracy", "Positive class: ID positive",
                   "Mean ± std over 2 seed(s)", "How far the outlier embeddings moved the images",
                   "### Paired by seed: method − idgen"]:
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
    assert {p["method"] for p in result["paired"]} == {"none", "linear", "ncis"}
    times = json.loads((smoke_run / "compare" / "times.json").read_text())
    assert times["trainings"] == times["evaluations"] == 8 and times["total"] >= times["train"] > 0
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


def _result(near_auroc, far_fpr):
    rows = [{"score": "energy", "set": "mean (near)", "role": "mean", "fpr95": 0.5, "auroc": near_auroc,
             "aupr_in": 0.5, "aupr_out": 0.5},
            {"score": "energy", "set": "mean (far)", "role": "mean", "fpr95": far_fpr, "auroc": 0.5,
             "aupr_in": 0.5, "aupr_out": 0.5}]
    return {"rows": rows, "id_accuracy": 0.9}


def test_paired_differences_match_a_seed_by_seed_computation():
    from scipy import stats

    ref_near, ncis_near = [0.60, 0.55, 0.70, 0.52], [0.63, 0.57, 0.74, 0.53]
    ref_far, ncis_far = [0.30, 0.90, 0.10, 0.50], [0.35, 0.60, 0.20, 0.40]
    per_run = {"idgen": [_result(a, f) for a, f in zip(ref_near, ref_far)],
               "ncis": [_result(a, f) for a, f in zip(ncis_near, ncis_far)]}
    paired = paired_differences(per_run, "energy", "idgen", sets=("mean (near)", "mean (far)"))
    near = next(p for p in paired if p["set"] == "mean (near)" and p["metric"] == "auroc")
    # one at a time: the differences, their mean, sample std and t-interval
    diffs = [b - a for a, b in zip(ref_near, ncis_near)]
    mean = sum(diffs) / 4
    std = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5
    half = stats.t.ppf(0.975, 3) * std / 2
    assert near["mean"] == pytest.approx(mean) and near["std"] == pytest.approx(std)
    assert (near["low"], near["high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert near["better"] == 4 and near["separated"]  # +1 to +4 points on every seed
    far = next(p for p in paired if p["set"] == "mean (far)" and p["metric"] == "fpr95")
    assert far["better"] == 2 and not far["separated"]  # lower FPR95 is better: 2 of 4 seeds
    assert all(p["method"] == "ncis" and p["reference"] == "idgen" for p in paired)
    table = format_paired(paired)
    assert "| mean (near) | AUROC ↑ | ncis | +2.5 ± 1.3 |" in table and "| 4/4 | yes |" in table


def test_paired_t_test_is_scipys_and_the_former_hand_written_one():
    """p and the 95 % interval come from ``scipy.stats.ttest_rel``; on a fixed example they are what
    the hand-written formulas gave (two-sided ``t.sf`` of mean / (std / √n), ``t.ppf(0.975)`` · std /
    √n, df = n − 1) to float64 rounding."""
    import numpy as np
    from scipy import stats

    ref = [0.612, 0.587, 0.701, 0.524, 0.583, 0.655, 0.598, 0.641, 0.570, 0.619]
    other = [0.634, 0.571, 0.748, 0.533, 0.579, 0.690, 0.622, 0.640, 0.602, 0.611]
    per_run = {"idgen": [_result(a, 0.5) for a in ref], "ncis": [_result(a, 0.5) for a in other]}
    row = next(p for p in paired_differences(per_run, "energy", "idgen") if p["set"] == "mean (near)"
               and p["metric"] == "auroc")
    d = np.asarray(other) - np.asarray(ref)
    n, mean, std = len(d), d.mean(), d.std(ddof=1)
    half = stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)
    old_p = 2 * stats.t.sf(abs(mean) / (std / np.sqrt(n)), n - 1)
    assert row["p"] == pytest.approx(old_p, rel=1e-12, abs=0)
    assert row["low"] == pytest.approx(mean - half, rel=1e-12, abs=0)
    assert row["high"] == pytest.approx(mean + half, rel=1e-12, abs=0)
    assert (row["mean"], row["std"]) == (mean, std)
    # no spread: no p-value, the interval is the mean
    flat = {"idgen": [_result(a, 0.5) for a in ref], "ncis": [_result(a + 0.25, 0.5) for a in ref]}
    row = next(p for p in paired_differences(flat, "energy", "idgen") if p["set"] == "mean (near)"
               and p["metric"] == "auroc")
    assert row["p"] is None and row["low"] == row["high"] == row["mean"]


def test_paired_differences_without_reference_or_with_one_seed():
    assert paired_differences({"ncis": [_result(0.6, 0.4)]}, "energy", "idgen") == []
    one = paired_differences({"idgen": [_result(0.5, 0.4)], "ncis": [_result(0.6, 0.4)]}, "energy", "idgen")
    assert one and all(p["low"] is None and not p["separated"] for p in one)


def test_compare_reuses_the_runs_own_stage5_training(smoke_run_1_to_4, tmp_path, monkeypatch):
    from ncis_core.compare import stage5_twin
    from ncis_core.config import load_config
    from ncis_core.runs import RunDir
    from ncis_core.stages import train_classifier

    out = copy_run(smoke_run_1_to_4, tmp_path / "run")
    cfg = load_config("smoke", OVERRIDES, out=str(out))
    run = RunDir.create(cfg)
    train_classifier.run(cfg, run, progress=False)  # stage 5: ncis outliers, seed = run.seed = 0
    assert stage5_twin(cfg, run, "ncis", 0) == run.path("classifier_dir")
    assert stage5_twin(cfg, run, "ncis", 1) is None and stage5_twin(cfg, run, "idgen", 0) is None
    real_train, trained = train_classifier.train, []
    monkeypatch.setattr(train_classifier, "train", lambda c, *a, **k: trained.append(c.classifier.seed)
                        or real_train(c, *a, **k))
    compare("smoke", out, ["ncis"], [0, 1], OVERRIDES, progress=False)
    assert trained == [1]  # seed 0 is stage 5's own training: copied, not trained again
    copied = out / "compare" / "ncis" / "seed0" / "best.safetensors"
    assert copied.read_bytes() == run.path("classifier_best").read_bytes()
    # a changed classifier config makes stage 5 stale for it: nothing is reused
    other = load_config("smoke", [*OVERRIDES, "classifier.lr=0.05"], out=str(out))
    assert stage5_twin(other, RunDir(out, other), "ncis", 0) is None


@pytest.mark.heavy
def test_compare_on_a_new_folder_runs_stages_1_to_4_first(tmp_path, caplog):
    import logging

    from ncis_core.runs import RunDir

    out = tmp_path / "new"
    with caplog.at_level(logging.INFO, logger="ncis_core.compare"):
        compare("smoke", out, ["idgen"], [0], OVERRIDES, progress=False)
    assert "running stages 1-4 first" in caplog.text
    states = {st.stage: st.state for st in RunDir.open(out).status()}
    assert all(states[s] == "current" for s in ("embed", "cvpn", "sample", "generate")), states
    assert (out / "compare" / "table.md").exists() and (out / "notebooks" / "04_generate_outliers.ipynb").exists()


def test_paired_p_values_and_holm_match_independent_computations():
    from itertools import permutations

    from scipy import stats

    from ncis_core.compare import detectable_difference, holm

    ref = [0.60, 0.55, 0.70, 0.52, 0.58]
    other = [0.63, 0.57, 0.74, 0.53, 0.57]
    per_run = {"idgen": [_result(a, 0.5) for a in ref], "ncis": [_result(a, 0.5) for a in other]}
    row = next(p for p in paired_differences(per_run, "energy", "idgen") if p["set"] == "mean (near)"
               and p["metric"] == "auroc")
    assert row["p"] == pytest.approx(stats.ttest_rel(other, ref).pvalue)
    assert next(p for p in paired_differences(per_run, "energy", "idgen") if p["set"] == "mean (far)")["p"] is None

    # Holm, by its definition: the k-th smallest p is multiplied by (m - k + 1), made monotone, capped at 1
    ps = [0.004, 0.03, 0.02, 0.5, 0.011]
    got = [r["holm_p"] for r in holm([{"p": p, "std": 0.1, "seeds": 5} for p in ps])]
    order = sorted(range(5), key=lambda i: ps[i])
    want = [0.0] * 5
    for k, i in enumerate(order):
        want[i] = min(1.0, max((5 - j) * ps[order[j]] for j in range(k + 1)))
    assert got == pytest.approx(want)
    assert [r["told_apart"] for r in holm([{"p": p, "std": 0.1, "seeds": 5} for p in ps])] == \
        [w < 0.05 for w in want]
    # holm adjusts p-values only; the order of the rows does not matter
    for perm in list(permutations(range(5)))[:10]:
        again = holm([{"p": ps[i], "std": 0.1, "seeds": 5} for i in perm])
        assert [r["holm_p"] for r in again] == pytest.approx([want[i] for i in perm])


def test_detectable_difference_has_the_power_it_claims():
    """Simulated paired experiments with a true difference of exactly the detectable size: about 80 %
    of them reject at the level used (the formula is the usual t approximation, so allow a few points)."""
    import numpy as np
    from scipy import stats

    from ncis_core.compare import detectable_difference

    rng = np.random.default_rng(0)
    n, sd, alpha = 10, 0.03, 0.05 / 6
    delta = detectable_difference(sd, n, alpha)
    d = rng.normal(delta, sd, size=(20000, n))
    p = 2 * stats.t.sf(np.abs(d.mean(1)) / (d.std(1, ddof=1) / np.sqrt(n)), n - 1)
    assert 0.74 < np.mean(p < alpha) < 0.86
    assert detectable_difference(sd, 1, alpha) is None


def test_forest_plot_and_method_gallery(tmp_path):
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from ncis_core.compare import holm
    from ncis_core.viz.compare import method_gallery_rows, plot_method_gallery, plot_paired_forest

    per_run = {"idgen": [_result(a, f) for a, f in [(0.6, 0.3), (0.55, 0.9), (0.7, 0.1)]],
               "ncis": [_result(a, f) for a, f in [(0.63, 0.35), (0.57, 0.6), (0.74, 0.2)]]}
    paired = holm(paired_differences(per_run, "energy", "idgen", sets=("mean (near)", "mean (far)")))
    fig = plot_paired_forest(paired)
    assert [ax.get_xlabel().split()[0] for ax in fig.axes] == ["AUROC", "FPR95"]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["ncis − idgen · (near)", "ncis − idgen · (far)"]
    folders = {}
    for method, shade in (("idgen", 40), ("ncis", 200)):
        folder = tmp_path / method
        images = []
        for seed in (5, 6, 7):
            (folder / "0").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), shade + seed, np.uint8)).save(folder / "0" / f"a_{seed}.png")
            images.append({"file": f"0/a_{seed}.png", "class": 0, "seed": seed})
        images.append({"file": "1/b.png", "class": 1, "seed": 9})  # another class: not shown
        (folder / "index.json").write_text(json.dumps({"images": images if method == "ncis" else images[1:]}))
        folders[method] = folder
    methods, rows, seeds = method_gallery_rows(folders, 0, n=5)
    assert methods == ["idgen", "ncis"] and seeds == [6, 7]  # only the seeds both methods have
    assert rows[1][0][0, 0, 0] == 206 and rows[0][1][0, 0, 0] == 47
    assert len(plot_method_gallery(methods, rows, seeds).axes) == 4
    plt.close("all")


@pytest.mark.heavy
def test_evaluations_on_worker_threads_equal_the_one_at_a_time_results(smoke_run, tmp_path):
    """compare evaluates its classifiers side by side on threads (one intra-op thread each, the
    datasets built once): the same numbers as each evaluated alone."""
    import shutil

    import torch

    from ncis_core import compare as compare_module
    from ncis_core.config import load_run_config

    if not (smoke_run / "compare" / "none" / "seed1" / "best.safetensors").exists():
        compare("smoke", smoke_run, ["none", "ncis"], [0, 1], OVERRIDES, progress=False)
    jobs, alone = [], []
    for method in ("none", "ncis"):
        for seed in (0, 1):
            source = smoke_run / "compare" / method / f"seed{seed}"
            folder = tmp_path / method / f"seed{seed}"
            folder.mkdir(parents=True)
            shutil.copy2(source / "best.safetensors", folder)
            cfg = load_run_config("smoke", [*OVERRIDES, f"classifier.outliers={method}", f"classifier.seed={seed}"],
                                  out=str(smoke_run))
            jobs.append((cfg, folder))
            alone.append(compare_module._evaluate(cfg, source, progress=False))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = compare_module._evaluate_many(jobs, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    for a, b in zip(alone, together):
        assert a["rows"] == b["rows"] and a["id_accuracy"] == b["id_accuracy"]
    for _, folder in jobs:
        assert (folder / "results" / "metrics.json").exists()


@pytest.mark.heavy
def test_a_moved_run_folder_keeps_its_compare_results(smoke_run, tmp_path, monkeypatch):
    """The results' fingerprint held run.out, so a copied or moved folder retrained every (method,
    seed) of compare; where the folder lies is not what a training computes."""
    import shutil

    from ncis_core.stages import train_classifier as stage5

    if not (smoke_run / "compare" / "ncis" / "seed1" / "results" / "metrics.json").exists():
        compare("smoke", smoke_run, ["none", "ncis"], [0, 1], OVERRIDES, progress=False)
    before = compare("smoke", smoke_run, ["none", "ncis"], [0, 1], OVERRIDES, progress=False)
    moved = tmp_path / "elsewhere"
    shutil.copytree(smoke_run, moved)

    def refuse(*args, **kwargs):
        raise AssertionError("compare retrained a finished (method, seed) of the moved folder")

    monkeypatch.setattr(stage5, "train", refuse)
    after = compare("smoke", moved, ["none", "ncis"], [0, 1], OVERRIDES, progress=False)
    assert after["rows"] == before["rows"]


@pytest.mark.heavy
def test_trainings_side_by_side_are_the_bytes_of_one_at_a_time(smoke_run_1_to_4, tmp_path):
    """Three smoke trainings (ncis with generated-looking ID images on two seeds, none) side by side in
    two worker processes, and one after another in this process, one intra-op thread each either way:
    every checkpoint tensor equal bit for bit (the per-epoch one too), the same histories."""
    import torch
    from safetensors.torch import load_file

    from ncis_core.compare import side_by_side, train_side_by_side
    from ncis_core.config import load_config
    from ncis_core.runs import RunDir

    extra = ["classifier.id_generated=vae_recon", "classifier.outlier_batch_size=8"]

    def jobs(where):
        out = []
        for method, seed in [("ncis", 0), ("ncis", 1), ("none", 2)]:
            cfg = load_config("smoke", [*OVERRIDES, *extra, f"classifier.outliers={method}",
                                        f"classifier.seed={seed}"], out=str(smoke_run_1_to_4))
            out.append((cfg, RunDir(smoke_run_1_to_4, cfg), tmp_path / where / f"{method}{seed}"))
        return out

    alone, together = jobs("alone"), jobs("together")
    assert side_by_side(alone[0][0], 3) == 1  # the suite's one thread: one at a time, in this process
    train_side_by_side(alone, progress=False)
    torch.set_num_threads(2)  # two workers of 2 // 2 = 1 intra-op thread (the fixture restores one)
    assert side_by_side(together[0][0], 3) == 2
    train_side_by_side(together, progress=False)
    for (_, _, a), (_, _, b) in zip(alone, together):
        for name in ("best.safetensors", "last.safetensors"):
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), (b, name)
        for name in ("history.json", "last.json"):
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), (b, name)
        assert (a / "best.safetensors").read_bytes() == (b / "best.safetensors").read_bytes()
    # the trainings differ from each other (own seeds, own outliers)
    first, second = (load_file(str(f / "best.safetensors")) for _, _, f in alone[:2])
    assert not all(torch.equal(first[k], second[k]) for k in first)
