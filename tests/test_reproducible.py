"""Reproducible bytes (issue 15, item 6): the same preset and seed write the same artefact files, so
the content hashes in two runs' manifests match. What may differ, and only outside the hashed
artefacts: ``config.yaml`` (``run.out``), ``manifest.json`` (times, runs) and ``cvpn/times.json``
(seconds per epoch)."""

import json
import subprocess
import sys

import pytest
import torch
from diffusion_fixtures import ROOT, subprocess_env
from safetensors import safe_open

from ncis_core.runs import STAGES, RunDir, atomic_write_safetensors, content_hash

# stages 0-6 of a fresh smoke run, as plain functions (no notebooks), on one thread
_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from ncis_core.config import load_config
from ncis_core.runs import RunDir
from ncis_core.stages import data_summary, embed, evaluate, generate, sample, train_classifier, train_cvpn
cfg = load_config("smoke", out=sys.argv[1])
run = RunDir.create(cfg)
data_summary.run(cfg, run)
for stage in (embed, train_cvpn, sample, generate, train_classifier, evaluate):
    stage.run(cfg, run, progress=False)
"""


def test_safetensors_bytes_do_not_depend_on_the_metadata_order(tmp_path):
    """``save_file`` keeps the metadata in a Rust HashMap: the header's key order changed from call
    to call (19 of 20 files differed), so equal checkpoints had different hashes."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.arange(4), "c": torch.zeros(0)}
    meta = {f"key{i}": json.dumps({"value": i, "name": "é"}) for i in range(8)}
    files = [atomic_write_safetensors(tmp_path / f"{i}.safetensors", tensors,
                                      dict(sorted(meta.items(), reverse=i % 2 == 1))) for i in range(12)]
    assert len({f.read_bytes() for f in files}) == 1
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == ["a", "b", "c"]
        for name, value in tensors.items():
            assert torch.equal(f.get_tensor(name), value)
    assert len(files[0].read_bytes()[8:8 + int.from_bytes(files[0].read_bytes()[:8], "little")]) % 8 == 0


@pytest.mark.heavy
def test_two_fresh_smoke_runs_write_the_same_artefact_bytes(smoke_run_0_to_6, tmp_path):
    """Stages 0-6 twice on ``smoke``, seed 0: once in this process (the shared finished smoke run),
    once in a child process with another string-hash seed; every output the manifests record, and
    stage 6's ``scores.npz``, hash the same."""
    run_a = RunDir.open(smoke_run_0_to_6)
    cfg = run_a.cfg

    second = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(second)], cwd=ROOT, capture_output=True, text=True,
                          env={**subprocess_env(), "PYTHONHASHSEED": "12345"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_b = RunDir.open(second)

    outputs_a = {name: entry["outputs"] for name, entry in run_a.manifest()["stages"].items()}
    outputs_b = {name: entry["outputs"] for name, entry in run_b.manifest()["stages"].items()}
    assert set(outputs_a) == set(outputs_b) == set(STAGES)
    for name, stage in STAGES.items():
        assert set(outputs_a[name]) == set(stage.outputs), name
        different = [a for a in stage.outputs if outputs_a[name][a] != outputs_b[name][a]]
        assert not different, f"stage {stage.number} ({name}) wrote different bytes: {different}"
    assert content_hash(run_a.path("scores_npz")) == content_hash(run_b.path("scores_npz"))
    # the timings are kept, beside the hashed history
    times = json.loads((run_b.path("cvpn_dir") / "times.json").read_text())["seconds_per_epoch"]
    assert len(times) == cfg.cvpn.epochs and all(s >= 0 for s in times)
    assert all("seconds" not in e for e in json.loads(run_b.path("cvpn_history").read_text())["per_epoch"])
