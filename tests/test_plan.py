"""``plan``: what it says a run will do against what the stages did, the paper's stage-1 cost,
the preflight's messages and exit codes."""

import json
import subprocess
import sys

import pytest
import torch

from ncis_core.config import load_config
from ncis_core.embeddings_io import load_embeddings
from ncis_core.plan import CARDS, parse_card, plan
from ncis_core.runs import RunDir
from ncis_core.stages import generate


def test_plan_counts_match_what_the_smoke_stages_did(smoke_run_0_to_6):
    cfg = load_config("smoke", out=str(smoke_run_0_to_6))
    run = RunDir.open(smoke_run_0_to_6)
    results = json.loads(run.path("metrics_json").read_text())  # what stage 6 returned
    report = plan(cfg, card="cpu")
    work = {name: st["work"] for name, st in report["stages"].items()}

    embeddings = load_embeddings(run.path("embeddings"))
    assert work["embed"]["images"] == len(embeddings["labels"])
    assert work["embed"]["unet_forward_backward"] == len(embeddings["labels"]) * cfg.embed.steps * \
        cfg.embed.noise_batch
    history = json.loads(run.path("cvpn_history").read_text())
    assert work["cvpn"]["steps"] == history["total_steps"]
    outliers = generate.load_outlier_embeddings(run.path("outlier_embeddings"))["outliers"]
    assert work["sample"]["kept"] == outliers.shape[0] * outliers.shape[1]
    index = generate.load_index(run.path("outliers_index"))
    assert work["generate"]["images"] == len(index["images"])
    assert work["generate"]["unet_evaluations"] == len(index["images"]) * cfg.generate.steps * 2
    last = json.loads((run.path("classifier_dir") / "last.json").read_text())
    assert work["classifier"]["steps"] == last["step"]
    assert work["evaluate"]["images_scored"] == sum(s["count"] for s in results["sets"].values())
    assert report["preflight"]["ok"], report["preflight"]["problems"]
    # the disk plan covers the artefacts the stages wrote, to within the PNG assumption
    embed_bytes = report["stages"]["embed"]["disk_bytes"]["embeddings.safetensors"]
    assert 0.5 < run.path("embeddings").stat().st_size / embed_bytes < 2


def test_cifar100_stage1_is_the_papers_8_eflop():
    """METHOD.md: ≈ 8 EFLOP for stage 1 on CIFAR-100, ≥ 2.8 H100-hours at full bf16 rate."""
    report = plan(load_config("cifar100"), card="h100", fraction=1.0)
    embed = report["stages"]["embed"]
    assert embed["work"]["images"] == 50_000 and embed["work"]["unet_forward_backward"] == 50_000 * 3 * 32
    assert embed["flops"] == pytest.approx(8.0e18, rel=0.02)
    # 8.07e18 / 989 TFLOP/s = 2.27 h at the SXM card's dense rate (METHOD.md's 2.8 h ≈ 800 TFLOP/s)
    assert embed["gpu_hours_bf16"] == pytest.approx(2.27, rel=0.02)
    # fp32, the original's precision: matrix products at the plain fp32 rate cost far more
    assert embed["precision"] == "fp32" and embed["gpu_hours"] > 5 * embed["gpu_hours_bf16"]
    assert report["stages"]["generate"]["work"]["images"] == 6_400


def test_memory_the_card_lacks_is_a_preflight_problem_with_a_hint_that_works():
    problems = plan(load_config("cifar100"), card="h100")["preflight"]["problems"]
    memory = [p for p in problems if p.startswith("stage embed needs")]
    assert memory and "embed.micro_batch" in memory[0]
    fixed = plan(load_config("cifar100", ["embed.micro_batch=1"]), card="h100")["preflight"]["problems"]
    assert memory[0].endswith("set embed.micro_batch (images per UNet call; the result does not change)")
    assert not [p for p in fixed if p.startswith("stage ") and "more than the" in p]


def test_gpus_divide_the_sharded_stages_only():
    one = plan(load_config("cifar100"), card="h200", gpus=1)["stages"]
    eight = plan(load_config("cifar100"), card="h200", gpus=8)["stages"]
    assert eight["embed"]["hours_per_process"] == pytest.approx(one["embed"]["gpu_hours"] / 8)
    assert eight["cvpn"]["hours_per_process"] == one["cvpn"]["gpu_hours"]
    # stage 5 splits every step's images between processes: the memory hint "more processes" works
    inet = load_config("imagenet100", ["embed.micro_batch=1"])
    alone = [p for p in plan(inet, card="h100")["preflight"]["problems"] if p.startswith("stage classifier")]
    assert alone and "more processes" in alone[0]
    two = [p for p in plan(inet, card="h100", gpus=2)["preflight"]["problems"] if p.startswith("stage classifier")]
    assert not two


def test_cards():
    assert parse_card("h100")[1] is CARDS["h100"]
    assert parse_card("L40S:362")[1].bf16 == 362.0
    with pytest.raises(ValueError, match="NAME:TFLOPS"):
        parse_card("tpu")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "ncis_core", "plan", *args], capture_output=True, text=True)


@pytest.mark.heavy
def test_plan_command_smoke_passes_and_paper_preset_fails_with_the_stages_messages(tmp_path):
    ok = _cli("--preset", "smoke", "--gpu", "cpu", "--out", str(tmp_path / "smoke"))
    assert ok.returncode == 0, ok.stderr
    assert "| embed |" in ok.stdout and "Preflight: ok" in ok.stdout
    bad = _cli("--preset", "cifar100", "--json", "--out", str(tmp_path / "c100"),
               "--set", "data.root=" + str(tmp_path / "nowhere"))
    assert bad.returncode == 2
    report = json.loads(bad.stdout)  # one JSON line
    assert len(bad.stdout.strip().splitlines()) == 1
    assert set(report["stages"]) == {"data", "embed", "cvpn", "sample", "generate", "classifier", "evaluate"}
    assert {"flops", "gpu_hours"} <= set(report["stages"]["embed"]) and report["total"]["flops"] > 0
    problems = "\n".join(report["preflight"]["problems"])
    assert "CIFAR-100 not found" in problems and "data.root" in problems
    assert "OOD set 'svhn' not found" in problems
    assert "diffusion.pipeline='CompVis/stable-diffusion-v1-4'" in problems
    assert "Traceback" not in bad.stderr


def test_an_output_path_that_is_a_file_is_a_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    report = plan(load_config("smoke", out=str(tmp_path / "file")), card="cpu")
    assert any("is a file, not a folder" in p for p in report["preflight"]["problems"])


@pytest.mark.heavy
def test_a_config_the_checks_refuse_exits_2_with_one_line():
    proc = _cli("--preset", "cifar100", "--set", "generate.num_batches=10")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "classifier.num_outliers=6400" in proc.stderr


def test_peak_memory_formula_counts_activations_not_weights():
    from ncis_core.plan import saved_activation_bytes
    from ncis_core.models.resnet import build_classifier

    # a linear layer keeps its input (B × 8 floats), not its weight
    kept = saved_activation_bytes(lambda: torch.nn.Linear(8, 4), lambda: (torch.zeros(3, 8, requires_grad=True),))
    assert kept == 3 * 8 * 4
    resnet = saved_activation_bytes(lambda: build_classifier("resnet18", 10).train(),
                                    lambda: (torch.zeros(1, 3, 32, 32),))
    assert 1e6 < resnet < 2e7  # megabytes per 32 × 32 image, far below the 45 MB of weights
