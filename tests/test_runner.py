"""The papermill runner and the command line, including the notebook series on `smoke`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ncis_core.__main__ import main
from ncis_core.notebook import write_notebook
from ncis_core.runner import NOTEBOOK_DIR, NotebookFailed, notebook_series, parse_stages, run_series

ROOT = Path(__file__).resolve().parent.parent


def test_parse_stages():
    assert parse_stages(None) is None and parse_stages("all") is None
    assert parse_stages("1-6") == {1, 2, 3, 4, 5, 6}
    assert parse_stages("0,2-3") == {0, 2, 3}
    for bad in ["a", "3-1", "1-"]:
        with pytest.raises(ValueError, match="--stages"):
            parse_stages(bad)


def test_notebook_series_is_numbered_and_ordered(tmp_path):
    for name in ["10_late.ipynb", "02_b.ipynb", "00_a.ipynb", "notes.ipynb", "3_bad.ipynb"]:
        (tmp_path / name).write_text("{}")
    assert [(n, p.name) for n, p in notebook_series(tmp_path)] == [
        (0, "00_a.ipynb"), (2, "02_b.ipynb"), (10, "10_late.ipynb")]
    assert notebook_series(NOTEBOOK_DIR)[0][1].name == "00_data.ipynb"


def _params_cell():
    return ("code", 'preset = "smoke"\nrun_dir = "x"\noverrides = []', ["parameters"])


@pytest.mark.heavy
def test_first_failing_notebook_stops_the_series_and_names_the_cell(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder / "00_ok.ipynb", [_params_cell(), ("code", "x = 1")])
    write_notebook(folder / "01_fails.ipynb", [_params_cell(), ("code", "y = 2"),
                                               ("code", "raise ValueError('the reason')")])
    write_notebook(folder / "02_never.ipynb", [_params_cell(), ("code", "open('ran', 'w')")])
    out = tmp_path / "run"
    with pytest.raises(NotebookFailed) as err:
        run_series("smoke", out, notebooks=folder, progress=False)
    message = str(err.value)
    assert "01_fails.ipynb failed in cell 4 of the executed copy" in message
    assert "(starting `raise ValueError('the reason')`)" in message
    assert "ValueError: the reason" in message
    assert (out / "notebooks" / "00_ok.ipynb").exists() and (out / "notebooks" / "01_fails.ipynb").exists()
    assert not (out / "notebooks" / "02_never.ipynb").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["notebooks"]["00_ok.ipynb"]["status"] == "complete"
    assert manifest["notebooks"]["01_fails.ipynb"]["status"] == "failed"


@pytest.mark.heavy
def test_parameters_reach_the_notebook(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder / "00_echo.ipynb", [
        _params_cell(),
        ("code", "import json\nfrom ncis_core.notebook import start\ncfg, run = start(preset, run_dir, overrides)\n"
                 "(run.root / 'seen.json').write_text(json.dumps([preset, run_dir, overrides, cfg.cvpn.epochs]))")])
    run_series("smoke", tmp_path / "run", ["cvpn.epochs=3"], notebooks=folder, progress=False)
    # run_dir: the run folder the executed copy sits in (start() resolves it), never an absolute path
    assert json.loads((tmp_path / "run" / "seen.json").read_text()) == ["smoke", "..", ["cvpn.epochs=3"], 3]


_WHERE = ("code", "from ncis_core.notebook import start\ncfg, run = start(preset, run_dir, overrides)\n"
                  "(run.root / 'where.txt').write_text(str(run.root))\n"
                  "(run.root / 'config.yaml').read_text()  # reads it too")


@pytest.mark.heavy
def test_an_executed_notebook_reads_and_writes_the_run_folder_it_sits_in_after_a_copy_or_move(tmp_path):
    """The runner used to inject the absolute run_dir: re-running an executed copy inside a copied
    run folder wrote into the original run."""
    import shutil

    import papermill

    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder / "00_where.ipynb", [_params_cell(), _WHERE])
    run = tmp_path / "run"
    run_series("smoke", run, notebooks=folder, progress=False)
    assert (run / "where.txt").read_text() == str(run)

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    executed = copy / "notebooks" / "00_where.ipynb"
    # as JupyterLab or `jupyter nbconvert --execute` would: the kernel starts in the notebook's folder
    papermill.execute_notebook(str(executed), str(executed), cwd=str(executed.parent), progress_bar=False)
    assert (copy / "where.txt").read_text() == str(copy)
    assert (run / "where.txt").read_text() == str(run)  # the original is untouched

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    run.rename(moved)
    executed = moved / "notebooks" / "00_where.ipynb"
    papermill.execute_notebook(str(executed), str(executed), cwd=str(executed.parent), progress_bar=False)
    assert (moved / "where.txt").read_text() == str(moved)

    # where the notebook's folder cannot be known, ".." is refused, not guessed
    with pytest.raises(papermill.PapermillExecutionError, match=r"run_dir='\.\.' is the run folder an executed"):
        papermill.execute_notebook(str(executed), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                                   progress_bar=False)


def test_cli_presets_lists_the_four(capsys):
    assert main(["presets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["cifar100", "demo", "imagenet100", "smoke"]


@pytest.mark.parametrize("argv, needle", [
    (["run", "--preset", "nope", "--out", "{tmp}"], "unknown preset 'nope'"),
    (["run", "--preset", "smoke", "--out", "{tmp}", "--set", "cvpn.bogus=1"], "cvpn.num_layers"),
    (["datasets", "--preset", "cifar100", "--set", "data.root={tmp}/no-cifar"], "cifar-100-python"),
])
@pytest.mark.heavy
def test_cli_errors_are_one_clear_message(tmp_path, argv, needle):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "ncis_core", *argv], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error:") == 1


def test_cli_datasets_reports_every_split(capsys):
    assert main(["datasets", "--preset", "smoke"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["role"] for r in rows[:2]] == ["id-train", "id-test"]
    assert {r["name"] for r in rows} >= {"demo_near", "digits", "texture_crops", "faces"}
    assert all(r["image_shape"] == [32, 32, 3] for r in rows)


@pytest.mark.parametrize("notebook", [p.name for _, p in notebook_series(NOTEBOOK_DIR)])
def test_series_notebooks_read_well_when_executed(notebook, caplog):
    """What papermill sees and what a cell leaves behind: a parameters cell declaring preset,
    run_dir and overrides in a form papermill parses (02/03's comments after the values made it warn
    "Passed unknown parameter: overrides"), an id on every cell (06 lacked them: nbformat's
    MissingIDFieldWarning), and no cell ending in a bare call whose value is printed under it
    (`save_figure(...)` returns a path: a `PosixPath(...)` line under every figure)."""
    import ast
    import logging

    import nbformat
    from papermill.translators import PythonTranslator

    path = NOTEBOOK_DIR / notebook
    assert all("id" in cell for cell in json.loads(path.read_text())["cells"])
    nb = nbformat.read(str(path), as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    with caplog.at_level(logging.WARNING, logger="papermill"):
        names = {p.name for p in PythonTranslator.inspect(params)}
    assert {"preset", "run_dir", "overrides"} <= names
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("papermill")]
    for cell in nb.cells:
        body = ast.parse(cell.source).body if cell.cell_type == "code" else []
        last = body[-1].value if body and isinstance(body[-1], ast.Expr) else None
        shown = isinstance(last, ast.Name) or (  # a widget on purpose, or display()/print() (None)
            isinstance(last, ast.Call) and getattr(last.func, "id", None) in ("display", "print"))
        if last is not None and not shown:
            assert cell.source.rstrip().endswith(";"), \
                f"{notebook}: `{cell.source.strip().splitlines()[-1]}` ends a cell: its value is printed; end it with ';'"


def _outputs(notebook: Path) -> list[tuple[int, dict]]:
    cells = json.loads(notebook.read_text())["cells"]
    return [(i, o) for i, c in enumerate(cells) if c["cell_type"] == "code" for o in c.get("outputs", [])]


@pytest.mark.heavy
def test_notebook_series_runs_end_to_end_on_smoke(tmp_path, caplog):
    """The path `make demo` takes, on the smoke preset: every notebook present, through papermill.
    The executed copies read well (no frozen progress bars, no log boxes, no stray return values,
    no papermill warnings; the log in RUN/logs/) and one of them, re-run in a copy of the run
    folder, works on the copy."""
    import logging
    import shutil

    import papermill

    out = tmp_path / "smoke"
    with caplog.at_level(logging.WARNING, logger="papermill"):
        executed = run_series("smoke", out, progress=False)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("papermill")]
    for notebook in executed:
        outputs = _outputs(notebook)
        widgets = [i for i, o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        # a progress bar is a widget saved at its first frame; the explorer (07) is the one widget
        assert widgets == [] or (notebook.name == "07_explore.ipynb" and len(widgets) == 1), notebook.name
        streams = "".join("".join(o["text"]) for _, o in outputs if o["output_type"] == "stream")
        assert "INFO" not in streams and "%|" not in streams, notebook.name
        assert not [o for _, o in outputs if "PosixPath(" in "".join(o.get("data", {}).get("text/plain", ""))]
        log_file = out / "logs" / f"{notebook.stem}.log"
        assert f"log: {log_file}" in streams and log_file.exists(), notebook.name
    assert "INFO ncis_core.stages.generate: stage 4: 12 images" in (out / "logs" / "04_generate_outliers.log").read_text()

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (out / "figures" / "00_counts.png").stat().st_mtime_ns
    rerun = copy / "notebooks" / "00_data.ipynb"
    papermill.execute_notebook(str(rerun), str(rerun), cwd=str(rerun.parent), progress_bar=False)
    assert (copy / "figures" / "00_counts.png").stat().st_mtime_ns > before
    assert (out / "figures" / "00_counts.png").stat().st_mtime_ns == before
    present = [p.name for _, p in notebook_series(NOTEBOOK_DIR)]
    assert (out / "config.yaml").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    status = {name: manifest["notebooks"][name]["status"] for name in present}
    # every notebook ran, except those waiting for a stage that has no notebook yet
    assert set(status.values()) <= {"complete", "skipped"}
    assert [p.name for p in executed] == [n for n in present if status[n] == "complete"]
    assert status["00_data.ipynb"] == "complete"
    assert manifest["stages"]["data"]["status"] == "complete"
    summary = json.loads((out / "data" / "summary.json").read_text())
    assert summary[0]["name"] == "id-train" and summary[0]["count"] == 6 * 8
    for figure in ["00_counts.png", "00_id_examples.png", "00_ood_examples.png"]:
        assert (out / "figures" / figure).stat().st_size > 1000
    # the explorer (a view, after the stages) ran on what stages 1-4 made; its static twins remain
    assert status["07_explore.ipynb"] == "complete"
    assert (out / "figures" / "07_all_classes_ncis.png").stat().st_size > 1000


@pytest.mark.heavy
def test_stage_whose_input_stage_has_no_notebook_is_skipped(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder / "00_ok.ipynb", [_params_cell(), ("code", "x = 1")])
    write_notebook(folder / "02_needs_embeddings.ipynb", [_params_cell(), ("code", "raise SystemExit(3)")])
    write_notebook(folder / "03_needs_cvpn.ipynb", [_params_cell(), ("code", "raise SystemExit(3)")])
    executed = run_series("smoke", tmp_path / "run", notebooks=folder, progress=False)
    assert [p.name for p in executed] == ["00_ok.ipynb"]
    notes = json.loads((tmp_path / "run" / "manifest.json").read_text())["notebooks"]
    assert notes["02_needs_embeddings.ipynb"]["status"] == "skipped"
    assert "stage 1 (embed)" in notes["02_needs_embeddings.ipynb"]["reason"]
    # stage 2 has a notebook, but it was skipped: stage 3 waits too
    assert notes["03_needs_cvpn.ipynb"]["status"] == "skipped"


def test_view_notebook_waits_for_the_stages_it_reads(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    write_notebook(folder / "07_view.ipynb", [_params_cell(), ("code", "raise SystemExit(3)")])
    assert run_series("smoke", tmp_path / "run", notebooks=folder, progress=False) == []
    note = json.loads((tmp_path / "run" / "manifest.json").read_text())["notebooks"]["07_view.ipynb"]
    assert note["status"] == "skipped" and "stage 1 (embed)" in note["reason"]


@pytest.mark.heavy
def test_classifier_notebooks_run_without_generated_outliers(tmp_path):
    """Notebooks 05 and 06 through papermill, with the plain cross-entropy baseline (no stage 4)."""
    out = tmp_path / "run"
    executed = run_series("smoke", out, ["classifier.outliers=none", "classifier.epochs=1",
                                         "evaluate.extra_scores=[msp]"], stages="5-6", progress=False)
    assert [p.name for p in executed] == ["05_train_classifier.ipynb", "06_evaluate.ipynb"]
    for figure in ["05_training.png", "06_histograms.png", "06_roc_energy.png", "06_roc_msp.png"]:
        assert (out / "figures" / figure).stat().st_size > 1000
    assert "Positive class: ID positive" in (out / "results" / "table.md").read_text()


def _cli(*argv, cwd=ROOT, prefix=()):
    from diffusion_fixtures import subprocess_env

    return subprocess.run([*prefix, sys.executable, "-m", "ncis_core", *argv], capture_output=True, text=True,
                          cwd=cwd, env=subprocess_env(), timeout=600)


# root writes into a chmod-0500 folder (CAP_DAC_OVERRIDE); without that capability it cannot
_NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.heavy
@pytest.mark.parametrize("case", ["not creatable", "a file", "under a file", "read-only folder"])
def test_an_unusable_out_is_one_line_naming_it_and_nothing_is_written(tmp_path, case):
    """`--out` that cannot be a run folder used to end in a traceback (FileExistsError,
    NotADirectoryError, PermissionError) or a bare `[Errno 2] ... '/proc/x'`."""
    import shutil

    afile = tmp_path / "afile"
    afile.write_text("mine")
    prefix = ()
    if case == "read-only folder":
        if os.geteuid() == 0:  # as root, chmod 0500 stops writes only without CAP_DAC_OVERRIDE
            if not shutil.which("setpriv"):
                pytest.skip("as root, chmod 0500 does not stop writes, and there is no setpriv to drop "
                            "CAP_DAC_OVERRIDE (root's case: the EACCES test below)")
            prefix = _NO_DAC
        (tmp_path / "ro").mkdir(mode=0o500)
    out, needle = {"not creatable": ("/proc/x", "cannot be created there"),
                   "a file": (afile, "is a file, not a folder"),
                   "under a file": (afile / "run", "a part of the path is a file"),
                   "read-only folder": (tmp_path / "ro" / "run", "permission denied")}[case]
    try:
        line = _one_error_line(_cli("run", "--preset", "smoke", "--out", str(out), "--stages", "0", "--quiet",
                                    prefix=prefix))
    finally:
        if case == "read-only folder":
            (tmp_path / "ro").chmod(0o700)
    assert str(out) in line and needle in line and "--out" in line
    assert afile.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) in (
        ["afile"], ["afile", "ro"])
    assert not any((tmp_path / "ro").iterdir()) if case == "read-only folder" else True


def test_a_folder_the_process_cannot_write_is_one_line_also_as_root(tmp_path, monkeypatch, capsys):
    """The writability check writes a file (permission bits say nothing for root or a read-only
    mount); here that write fails as it would in a read-only folder."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert main(["run", "--preset", "smoke", "--out", str(tmp_path / "run"), "--stages", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot write the run folder {tmp_path / 'run'}: permission denied; choose a folder "
                   f"you can write for --out, or make it writable (chmod u+w)")


def test_a_full_disk_leaves_no_half_written_notebook_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """papermill writes the executed copy itself, in place: a full disk used to leave
    `00_data.ipynb` as truncated JSON (and a traceback). Now it executes into a hidden file next to
    it, renamed when done: the previous copy stays as it was, nothing else is left behind."""
    import errno

    from papermill.iorw import LocalHandler

    def full_disk(self, buf, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(buf[: len(buf) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    previous = b'{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}\n'
    (out / "notebooks").mkdir(parents=True)
    (out / "notebooks" / "00_data.ipynb").write_bytes(previous)
    monkeypatch.setattr(LocalHandler, "write", full_disk)
    assert main(["run", "--preset", "smoke", "--out", str(out), "--stages", "0", "--quiet"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [f"error: cannot write {out / 'notebooks' / '00_data.ipynb'}: no space left on the device; "
                   f"free some space (or choose --out on another disk) and rerun the same command: "
                   f"finished work is kept"]
    assert [p.name for p in (out / "notebooks").iterdir()] == ["00_data.ipynb"]
    assert (out / "notebooks" / "00_data.ipynb").read_bytes() == previous


@pytest.mark.heavy
def test_an_unreadable_image_in_a_loader_worker_is_one_line(tmp_path):
    """torch re-raises a worker's DataError with the worker's whole traceback as its message (30
    lines under `error:`); the kit's message is cut back to the worker's own."""
    import numpy as np
    from diffusion_fixtures import subprocess_env
    from PIL import Image

    folder = tmp_path / "outliers"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):  # two sizes: read from the files, in the loader's worker
        Image.fromarray(rng.integers(0, 255, (48 if i == 0 else 40, 40, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png")
    bad = folder / "011.png"
    bad.write_bytes(bad.read_bytes()[:200])
    proc = subprocess.run(
        [sys.executable, "-m", "ncis_core.stages.train_classifier", "--preset", "smoke", "--out",
         str(tmp_path / "run"), "--no-progress", "--set", "classifier.outliers=folder", "--set",
         f"classifier.outlier_folder={folder}", "--set", "classifier.num_workers=1"],
        capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600)
    line = _one_error_line(proc)
    assert line.startswith(f"error: cannot read image file {bad}: ") and "data.skip_unreadable=true" in line
    assert "DataLoader worker" not in proc.stderr


def test_a_headless_kernel_logs_into_the_run_folder_shows_one_line_and_draws_no_bars(tmp_path, monkeypatch,
                                                                                     capsys):
    """What the runner's kernels do ($NCIS_HEADLESS): INFO records went to the notebook's stderr
    (pink boxes) and every bar was saved frozen at its first frame."""
    import logging

    from ncis_core import notebook
    from ncis_core.progress import bar_options

    assert bar_options(True) == {} and bar_options(False) == {"disable": True}
    run_dir = tmp_path / "run"
    monkeypatch.setenv("NCIS_HEADLESS", "1")
    monkeypatch.setenv("NCIS_NOTEBOOK", str(run_dir / "notebooks" / "04_generate_outliers.ipynb"))
    monkeypatch.chdir(Path.cwd())  # start() enters the project folder; back afterwards
    assert bar_options(True) == {"disable": True}
    root = logging.getLogger()
    level = root.level
    try:
        notebook.start("smoke", str(run_dir))
        logging.getLogger("ncis_core.stages.generate").info("an info line")
        logging.getLogger("ncis_core.stages.generate").warning("a warning")
        logging.getLogger("transformers").warning("a library's warning")
    finally:
        for handler in notebook._HANDLERS:
            handler.close()
            root.removeHandler(handler)
            logging.getLogger("ncis_core").removeHandler(handler)
        notebook._HANDLERS.clear()
        root.setLevel(level)
    shown = capsys.readouterr()
    log_file = run_dir / "logs" / "04_generate_outliers.log"
    assert shown.out == f"preset smoke, run folder {run_dir}; log: {log_file}\n"
    assert "a warning" in shown.err and "an info line" not in shown.err and "library" not in shown.err
    text = log_file.read_text()
    # (a library's own records reach the log only while its logger propagates: transformers stops
    # propagating once it configured its logging, so whether earlier tests imported it decides)
    assert "INFO ncis_core.stages.generate: an info line" in text and "WARNING ncis_core.stages.generate" in text


def test_the_kernel_is_told_the_executed_copy_s_absolute_path(tmp_path, monkeypatch):
    """`make demo` runs with --out outputs/demo (relative): the copy's path must reach the kernel
    absolute, or start() cannot tell the run folder it sits in (make demo failed in notebook 00)."""
    import os

    from ncis_core.notebook import NOTEBOOK_ENV
    from ncis_core.runner import _kernel_environment

    monkeypatch.chdir(tmp_path)
    with _kernel_environment(Path("outputs/demo/notebooks/00_data.ipynb")):
        assert os.environ[NOTEBOOK_ENV] == str(tmp_path / "outputs/demo/notebooks/00_data.ipynb")
