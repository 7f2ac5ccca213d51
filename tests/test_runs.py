"""The run folder: atomic writes, the manifest, skip-when-done, and the stale-input refusal."""

import json
import os

import pytest

import dataclasses
import hashlib

from omegaconf import OmegaConf

from ncis_core import runs
from ncis_core.config import load_config
from ncis_core.runs import (ARTEFACTS, STAGES, MissingArtefactError, RunDir, StaleArtefactError,
                            atomic_path, atomic_write_json, atomic_write_text, content_hash)


@pytest.fixture
def run(tmp_path):
    return RunDir.create(load_config("smoke", out=str(tmp_path / "run")))


def _fake_stage(run, name, payload="x"):
    """Write every output of ``name`` with ``payload`` inside the stage context."""
    with run.stage(name) as rec:
        if not rec.done:
            for artefact in STAGES[name].outputs:
                path = run.path(artefact)
                if artefact.endswith("_dir"):
                    atomic_write_text(path / "0" / "a.txt", payload)
                else:
                    atomic_write_text(path, payload)
    return rec


def test_create_writes_config_and_manifest(run):
    assert run.path("config").read_text().startswith("run:")
    manifest = run.manifest()
    assert manifest["preset"] == "smoke" and manifest["seed"] == 0
    assert manifest["packages"]["torch"].startswith("2.13.0")
    assert "git" in manifest and "created" in manifest
    assert RunDir.open(run.root).cfg == run.cfg


def test_open_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(MissingArtefactError, match="not a run folder"):
        RunDir.open(tmp_path)


def test_every_stage_artefact_has_a_path(run):
    for stage in STAGES.values():
        for artefact in (*stage.inputs, *stage.outputs):
            assert run.path(artefact).relative_to(run.root).as_posix() == ARTEFACTS[artefact]
    with pytest.raises(KeyError, match="known"):
        run.path("nope")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["a.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask_so_a_shared_run_is_readable(tmp_path, umask, mode):
    """mkstemp creates its file 0600 whatever the umask: every artefact of a run was private."""
    previous = os.umask(umask)
    try:
        run = RunDir.create(load_config("smoke", out=str(tmp_path / "run")))
        with atomic_path(run.path("cvpn_best")) as tmp:
            tmp.write_bytes(b"weights")  # a library writing to the path it is given
    finally:
        os.umask(previous)
    for path in (run.path("config"), run.path("manifest"), run.path("cvpn_best")):
        assert oct(path.stat().st_mode & 0o777) == oct(mode), path.name


def test_content_hash_of_files_and_folders(tmp_path):
    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "s" / "f.png").write_bytes(b"abc")
    h = content_hash(tmp_path / "d")
    (tmp_path / "d" / ".x.png.1.tmp").write_bytes(b"in flight")
    assert content_hash(tmp_path / "d") == h
    (tmp_path / "d" / "s" / "f.png").write_bytes(b"abd")
    assert content_hash(tmp_path / "d") != h
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")


def test_stage_records_times_and_hashes_and_skips_when_done(run):
    rec = _fake_stage(run, "embed")
    assert not rec.done
    entry = run.manifest()["stages"]["embed"]
    assert entry["status"] == "complete" and entry["started"] <= entry["ended"]
    assert entry["outputs"]["embeddings"] == content_hash(run.path("embeddings"))
    assert {"config:run.seed", "config:embed", "config:diffusion", "config:data"} <= set(entry["inputs"])
    assert _fake_stage(run, "embed").done
    assert run.manifest()["stages"]["embed"]["runs"] == 1


def test_missing_input_names_the_stage_to_run(run):
    with pytest.raises(MissingArtefactError, match=r"embeddings.safetensors .* run stage 1 \(embed\)"):
        with run.stage("cvpn"):
            pass


def test_failed_stage_is_recorded_and_not_complete(run):
    with pytest.raises(ValueError):
        with run.stage("embed"):
            raise ValueError("boom")
    assert run.manifest()["stages"]["embed"]["status"] == "failed"
    with pytest.raises(MissingArtefactError):
        run.require("embeddings")


def test_stage_that_forgets_an_output_is_an_error(run):
    with pytest.raises(RuntimeError, match="without writing embeddings.safetensors"):
        with run.stage("embed"):
            pass


def test_refuses_an_artefact_built_from_different_inputs(run):
    _fake_stage(run, "embed", "v1")
    _fake_stage(run, "cvpn", "model-from-v1")
    _fake_stage(run, "sample", "outliers-from-v1")
    run.require("outlier_embeddings")
    # Stage 2 is rerun with a new config: the cVPN changes, the outlier embeddings are now stale.
    run2 = RunDir.create(load_config("smoke", ["cvpn.epochs=9"], out=str(run.root)))
    _fake_stage(run2, "cvpn", "model-from-v1-9-epochs")
    with pytest.raises(StaleArtefactError, match=r"rerun stage 3 \(sample\)") as err:
        run2.require("outlier_embeddings")
    assert "cvpn/best.safetensors" in str(err.value)
    with pytest.raises(StaleArtefactError, match="stage 3"):
        with run2.stage("generate"):
            pass


def test_refuses_an_artefact_edited_after_its_stage(run):
    _fake_stage(run, "embed", "v1")
    run.path("embeddings").write_text("edited by hand")
    with pytest.raises(StaleArtefactError, match=r"changed after stage 1 \(embed\) wrote it"):
        run.require("embeddings")


def test_config_change_makes_a_stage_rerun_and_not_resumable(run):
    _fake_stage(run, "embed", "v1")
    run2 = RunDir.create(load_config("smoke", ["embed.lr=0.5"], out=str(run.root)))
    with run2.stage("embed") as rec:
        assert not rec.done and not rec.resumable
        atomic_write_text(run2.path("embeddings"), "v2")
    assert run2.manifest()["stages"]["embed"]["runs"] == 2


def test_section_hashes_are_the_manifest_s_whatever_the_memo_holds():
    """The memoised section hash is the hash of the section's YAML, as manifests record it (so run
    folders written before the memo stay current), for every section, on equal and changed configs."""
    def direct(cfg, dotted):
        node = OmegaConf.select(OmegaConf.structured(cfg), dotted)
        text = OmegaConf.to_yaml(node) if OmegaConf.is_config(node) else repr(node)
        return hashlib.sha256(text.encode()).hexdigest()

    for cfg in (load_config("demo"), load_config("demo"), load_config("demo", ["classifier.epochs=5"])):
        for dotted in ("run.seed", "run.device", *(f.name for f in dataclasses.fields(cfg))):
            assert runs._section_hash(cfg, dotted) == direct(cfg, dotted), dotted
    assert runs._section_hash(load_config("demo"), "classifier") != \
        runs._section_hash(load_config("demo", ["classifier.epochs=5"]), "classifier")


def test_interrupted_stage_is_resumable_with_same_inputs(run):
    with pytest.raises(KeyboardInterrupt):
        with run.stage("embed"):
            raise KeyboardInterrupt
    with run.stage("embed") as rec:
        assert not rec.done and rec.resumable
        atomic_write_text(run.path("embeddings"), "v1")


def test_stage_inputs_can_depend_on_the_config_and_outside_folders(run, tmp_path):
    outside = tmp_path / "my_outliers"
    outside.mkdir()
    (outside / "a.png").write_bytes(b"1")
    with run.stage("classifier", inputs=(), extra=(outside,)) as rec:
        assert not rec.done
        for artefact in STAGES["classifier"].outputs:
            atomic_write_text(run.path(artefact), "w")
    assert f"path:{outside.resolve()}" in run.manifest()["stages"]["classifier"]["inputs"]
    run.require("classifier_best")  # no outliers_dir needed: it was not an input of this run
    with run.stage("classifier", inputs=(), extra=(outside,)) as rec:
        assert rec.done
    (outside / "b.png").write_bytes(b"2")
    with pytest.raises(StaleArtefactError, match=r"my_outliers.*rerun stage 5 \(classifier\)"):
        run.require("classifier_best")


def test_every_stage_declares_its_contract_next_to_its_run():
    """STAGES is assembled from the stage modules' own declarations, in stage order."""
    import importlib

    assert [s.number for s in STAGES.values()] == list(range(7))
    for module, name in [("data_summary", "data"), ("embed", "embed"), ("train_cvpn", "cvpn"),
                         ("sample", "sample"), ("generate", "generate"),
                         ("train_classifier", "classifier"), ("evaluate", "evaluate")]:
        stage_module = importlib.import_module(f"ncis_core.stages.{module}")
        assert stage_module.STAGE is STAGES[name]


def test_stage_inputs_and_sections_follow_the_config():
    from ncis_core.config import load_config
    from ncis_core.runs import stage_inputs, stage_sections

    ncis = load_config("smoke")
    assert stage_inputs(ncis, "sample") == ("embeddings", "cvpn_best")
    assert stage_inputs(load_config("smoke", ["sample.method=linear"]), "sample") == ("embeddings",)
    assert "diffusion" in stage_sections(load_config("smoke", ["sample.method=knn_boundary"]), "sample")
    assert stage_inputs(ncis, "classifier") == ("outliers_dir",)
    assert stage_inputs(load_config("smoke", ["classifier.outliers=none"]), "classifier") == ()
    # stage 5 makes its generated-looking ID images with the generator: changing it makes stage 5 stale
    with_recon = load_config("smoke", ["classifier.id_generated=vae_recon"])
    assert {"diffusion", "embed.resolution"} <= set(stage_sections(with_recon, "classifier"))
    assert "diffusion" not in stage_sections(ncis, "classifier")


@pytest.mark.heavy
def test_a_stage_module_command_line_reports_a_fault_in_one_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ncis_core.stages.embed", "--preset", "smoke", "--out",
                           str(tmp_path / "run"), "--set", "diffusion.pipeline=/nonexistent/sd"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diffusion.pipeline='/nonexistent/sd'" in errors[0]
    assert "Traceback" not in proc.stderr


def _chain(run, names=("embed", "cvpn", "sample", "generate", "classifier", "evaluate")):
    for name in names:
        _fake_stage(run, name, payload=name)


def test_staleness_reaches_all_the_way_down_and_names_the_earliest_stage(tmp_path):
    """Stage 2 redone with other settings: stage 6 is stale because of stage 3, not 'current'."""
    run = RunDir.create(load_config("smoke", out=str(tmp_path / "run")))
    _chain(run)
    assert [st.state for st in run.status()] == ["missing"] + ["current"] * 6  # stage 0 never ran
    other = RunDir.create(load_config("smoke", ["cvpn.epochs=3"], out=str(run.root)))
    with other.stage("cvpn"):
        atomic_write_text(other.path("cvpn_best"), "retrained")
        atomic_write_text(other.path("cvpn_history"), "retrained")
    states = {st.stage: st for st in other.status()}
    assert states["cvpn"].state == "current" and states["sample"].state == "stale"
    for name in ("generate", "classifier", "evaluate"):
        assert states[name].state == "stale" and states[name].earliest == "sample"
        assert "stage 3 (sample) upstream is stale" in states[name].reason
    # stage 6 needs the classifier: refused, naming stage 3 and the command that reruns the chain
    with pytest.raises(StaleArtefactError, match=r"rerun stage 3 \(sample\) and the stages after it: "
                                                 r"`python -m ncis_core run --preset smoke --out .* --stages 3-6`"):
        other.stage("evaluate").__enter__()
    manifest = json.loads(other.path("manifest").read_text())
    assert manifest["status"]["evaluate"]["state"] == "stale"
    assert "stage 3 (sample)" in other.format_status()


def test_replaced_embeddings_make_every_later_stage_stale_naming_stage_2(tmp_path):
    run = RunDir.create(load_config("smoke", out=str(tmp_path / "run")))
    _chain(run)
    with run.stage("embed") as rec:  # stage 1 again with the same config: done, so rewrite by hand
        pass
    manifest = run.manifest()
    atomic_write_text(run.path("embeddings"), "new embeddings")
    manifest["stages"]["embed"]["outputs"]["embeddings"] = content_hash(run.path("embeddings"))
    run._write_manifest(manifest)  # as if stage 1 had rerun and written other embeddings
    with pytest.raises(StaleArtefactError, match=r"rerun stage 2 \(cvpn\) and the stages after it"):
        run.require("outliers_dir")


@pytest.mark.heavy
def test_status_command_prints_the_table(tmp_path):
    import subprocess
    import sys

    run = RunDir.create(load_config("smoke", out=str(tmp_path / "run")))
    _chain(run, ("embed", "cvpn"))
    proc = subprocess.run([sys.executable, "-m", "ncis_core", "status", "--out", str(run.root)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| 2 cvpn | current |" in proc.stdout and "| 3 sample | missing | not run |" in proc.stdout
    assert "--stages 0-6" in proc.stdout  # stage 0 never ran: the whole chain


@pytest.mark.heavy
def test_one_writer_per_run_folder_and_a_dead_holder_s_lock_is_taken_over(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from ncis_core.runs import RunFolderBusy, write_lock

    root = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ncis_core.runs import write_lock\n"
        f"with write_lock({str(root)!r}, 'run --stages 1-4 (the first)'):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "ncis_core", "run", "--preset", "smoke", "--out", str(root),
                               "--stages", "0"], capture_output=True, text=True)
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"PID {holder.pid}" in errors[0] and "the first" in errors[0]
        assert "Traceback" not in proc.stderr and time.monotonic() - started < 60  # at once, not after the holder
        with pytest.raises(RunFolderBusy, match=f"PID {holder.pid}"):
            with write_lock(root, "a second writer"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: no clean release
        holder.wait()
    with write_lock(root, "after the crash"):  # the OS dropped the dead process's lock
        with write_lock(root, "nested in the same process"):
            pass
    assert not (root / ".run.lock.json").exists()
