"""Every benchmark runs in its smoke mode, so a crash fails the suite (their timings are
only printed, never asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script, *args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


@pytest.mark.heavy
def test_rehearse_paper_smoke_runs_every_stage(tmp_path):
    out = _run("rehearse_paper.py", "--preset", "cifar100", "--smoke", tmp_path=tmp_path)
    assert out["shapes_ok"], out["problems"]
    assert set(out["stages"]) == {"embed", "cvpn", "sample", "generate", "classifier", "evaluate"}
    for stage in out["stages"].values():
        assert stage["seconds"] > 0 and stage["peak_rss_gib"] > 0 and stage["plan_flops"] > 0
    assert out["stages"]["embed"]["artefacts"]["embeddings"][0] == [2, 32]
    assert out["stages"]["evaluate"]["artefacts"]["sets"]["svhn"] == 8


@pytest.mark.heavy
def test_gpu_check_quick_runs_every_section_on_a_cpu(tmp_path):
    out = _run("gpu_check.py", "--quick", "--json-out", str(tmp_path / "gpu_check.json"), tmp_path=tmp_path)
    assert out["errors"] == {}, out["errors"]
    assert {"stage1_fp32", "stage1_bf16", "stage1_rows_by_precision", "stage4_fp16", "stage4_bf16",
            "stage5_fp32", "stage5_bf16", "projection"} <= set(out["results"])
    rows = out["results"]["stage1_rows_by_precision"]
    assert 0 <= rows["bf16"]["mean_rel_diff"] <= rows["bf16"]["max_rel_diff"]
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == out


@pytest.mark.heavy
def test_knn_boundary_smoke_times_the_sampler_and_the_demo_setting(tmp_path):
    out = _run("bench_knn_boundary.py", "--smoke", tmp_path=tmp_path)
    assert out["benchmark"] == "knn_boundary" and out["threads"] == 1 and out["machine"]
    paper = out["paper"]
    assert {"seconds_per_round_per_class", "rounds_timed", "gflops", "projected_cpu_hours_100_classes",
            "projected_h100_minutes", "reject_none_seconds_per_round", "peak_round_bytes",
            "fp32_vs_fp64_same_selection", "h100_assumption"} <= set(paper)
    assert len(paper["seconds"]) == len(paper["rounds_timed"]) == len(paper["reject_none_seconds"]) >= 2
    assert all(s > 0 for s in paper["seconds"] + paper["reject_none_seconds"])
    for key in ("seconds_per_round_per_class", "gflops", "projected_cpu_hours_100_classes",
                "projected_h100_minutes", "projected_h100_memory_floor_minutes", "reject_none_seconds_per_round",
                "candidate_tensor_bytes", "distance_block_bytes", "flops_per_round_per_class"):
        assert paper[key] > 0, key
    assert paper["peak_round_bytes"] is None or paper["peak_round_bytes"] >= 0
    assert 0 <= paper["fp32_vs_fp64_same_selection"] <= 1 and 0 <= paper["boundary_same_fp32_fp64"] <= 1
    demo = out["demo"]
    assert demo["seconds_total"] > 0 and demo["gflops"] > 0
    assert demo["params"]["k"] < demo["rows_per_class"] and demo["outliers_per_class"] == (
        demo["params"]["rounds"] * demo["params"]["select"] * demo["params"]["keep"])


@pytest.mark.heavy
def test_compare_smoke_times_one_at_a_time_and_side_by_side(tmp_path):
    out = _run("bench_compare.py", "--smoke", "--with-threads", tmp_path=tmp_path)
    assert out["benchmark"] == "compare" and out["smoke"]
    assert out["one_at_a_time"]["trainings"] == out["side_by_side"]["trainings"] == 4
    assert out["one_at_a_time"]["seconds"] > 0 and out["side_by_side"]["seconds"] > 0 and out["speedup"] > 0
    assert out["on_threads"]["trainings"] == 4 and out["on_threads"]["seconds"] > 0
    # two worker processes of one intra-op thread against one thread (OMP_NUM_THREADS=1): the same
    # classifier files, byte for byte
    assert (out["side_by_side"]["workers"], out["side_by_side"]["threads_per_worker"]) == (2, 1)
    assert out["identical_classifier_files"] == 4
    # the roofline's arithmetic by hand: 48 ID images in batches of 16 -> 3 steps of one epoch;
    # none steps 16 images, folder 16 + 8 outliers; per image a width-32 small net's training FLOPs
    from ncis_core.flops import classifier_flops

    per_image = classifier_flops("small", 6, 32, 32, training=True)
    per_image = per_image["forward"] + per_image["backward"]
    roof = out["roofline"]
    assert roof["one_at_a_time"]["training_gflop"] == round(2 * 3 * (16 + 24) * per_image / 1e9, 1)
    assert roof["peak_gflops_per_thread"] > 0 and out["best_possible_speedup"] > 0
    for block in ("one_at_a_time", "side_by_side", "on_threads"):  # no run beats the bound
        assert 0 < roof[block]["share_of_peak"] <= 1


@pytest.mark.heavy
def test_seed_spread_smoke_runs_compare_per_training_length(smoke_run_1_to_4, tmp_path):
    out = _run("seed_spread.py", "--smoke", "--run", str(smoke_run_1_to_4), "--work", str(tmp_path / "work"),
               tmp_path=tmp_path)
    assert out["benchmark"] == "seed_spread" and set(out["by_epochs"]) == {"1", "2"}
    for entry in out["by_epochs"].values():
        assert entry["seconds"] > 0 and entry["seconds_per_training"] > 0
        assert set(entry["methods"]) == {"none", "ncis"}
        row = entry["paired"]["ncis - none"]["mean (all)"]
        assert row["std"] >= 0 and row["detectable_at_plan_seeds"] >= 0 and row["efficiency"] >= 0
    # a second look reads the results the first left, running nothing
    again = _run("seed_spread.py", "--smoke", "--run", str(smoke_run_1_to_4), "--work", str(tmp_path / "work"),
                 "--read-only", tmp_path=tmp_path)
    for e, v in again["by_epochs"].items():
        assert v["methods"] == out["by_epochs"][e]["methods"] and v["seconds"] is None
        first = out["by_epochs"][e]["paired"]["ncis - none"]
        assert {k: (r["mean"], r["std"]) for k, r in v["paired"]["ncis - none"].items()} == \
            {k: (r["mean"], r["std"]) for k, r in first.items()}


SMOKE = {
    "bench_classifier.py": "classifier",
    "bench_cvpn.py": "cvpn",
    "bench_embed.py": "embed",
    "bench_generate.py": "generate",
    "bench_umap.py": "umap",
    "generator_quality.py": "generator_quality",
}


def test_every_benchmark_has_a_smoke_mode_that_a_test_runs():
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")}
    assert scripts == set(SMOKE) | {"rehearse_paper.py", "gpu_check.py", "bench_knn_boundary.py",
                                    "bench_compare.py", "seed_spread.py"}
    for name in scripts:
        assert "--smoke" in (ROOT / "benchmarks" / name).read_text(), name


@pytest.mark.heavy
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_mode_runs(script, tmp_path):
    out = _run(script, "--smoke", tmp_path=tmp_path)
    assert out["benchmark"] == SMOKE[script]
