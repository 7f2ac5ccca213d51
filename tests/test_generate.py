"""Stage 4 (outlier images) on tiny random components: the plan, kill-and-rerun = uninterrupted,
clear errors, and two accelerate processes giving the files of one (stages 1 and 4)."""

import hashlib
import json
import re
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusion_fixtures import ROOT, SMALL, copy_run, subprocess_env, write_outliers

from ncis_core.config import load_config, load_run_config
from ncis_core.embeddings_io import load_embeddings
from ncis_core.runs import RunDir
from ncis_core.stages import embed, generate

NAMES = ["bear", "bird", "cat", "dog", "elephant", "giraffe"]


def outliers(d=32, m=3, seed=0):
    return torch.randn(len(NAMES), m, d, generator=torch.Generator().manual_seed(seed))


def prepared(path, overrides=(), tensor=None):
    cfg = load_config("smoke", list(overrides), out=str(path))
    run = RunDir.create(cfg)
    write_outliers(run, outliers() if tensor is None else tensor, NAMES)
    return cfg, run


def test_paper_batches_draw_their_embedding_uniformly_at_random():
    """The original picks each batch's embedding uniformly from the class's M (with replacement);
    the kit used to take k mod M, so with 400 batches and 100 classes only embeddings 0-3 of the
    100 were ever used."""
    gcfg = load_config("cifar100").generate
    assert (gcfg.embedding_per, gcfg.batch_embedding) == ("batch", "random")
    names = [f"c{i}" for i in range(100)]
    batches = generate.plan(100, 100, gcfg, names)
    for b in batches:
        assert len({im.embedding_index for im in b}) == 1  # still one embedding per batch
    chosen = np.array([b[0].embedding_index for b in batches])
    assert len(set(chosen.tolist())) > 4  # far more than the cyclic rule's embeddings 0–3 ...
    again = generate.plan(100, 100, gcfg, names)  # ... and seeded: the same plan every time
    assert [b[0].embedding_index for b in again] == chosen.tolist()
    # uniform over 0..99: 800 draws, a chi-square test at a generous level
    counts = np.bincount(chosen, minlength=100)
    chi2 = ((counts - 8) ** 2 / 8).sum()
    assert chi2 < 160  # df = 99: P(chi2 > 160) ≈ 1e-4 for a uniform draw
    # with replacement: some class gets the same embedding twice among its 8 batches (birthday odds)
    per_class = chosen.reshape(8, 100).T
    assert any(len(set(row)) < 8 for row in per_class)
    # a longer plan keeps the choices of a shorter one
    short = generate.plan(100, 100, load_config("cifar100", ["generate.num_batches=400",
                                                             "classifier.num_outliers=3200"]).generate, names)
    assert [b[0].embedding_index for b in short] == chosen[:400].tolist()


def test_to_uint8_matches_the_original_resize_and_truncation():
    """512 → 256: the original's bilinear without antialias is the 2 × 2 block mean; then
    (255 · x).astype(uint8) truncates. The kit used to antialias and round."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    out = generate.to_uint8(x, 8)  # the paper's defaults: no antialias, truncation
    box = x.reshape(2, 3, 8, 2, 8, 2).mean(dim=(3, 5))
    expected = (255 * box.permute(0, 2, 3, 1).numpy()).astype(np.uint8)  # numpy's cast truncates
    np.testing.assert_array_equal(out, expected)
    kit = generate.to_uint8(x, 8, antialias=True, quantize="round")
    assert not np.array_equal(kit, out)
    same_size = generate.to_uint8(x, 16, quantize="round")
    np.testing.assert_array_equal(same_size, np.round(255 * x.permute(0, 2, 3, 1).numpy()).astype(np.uint8))
    g = load_config("cifar100").generate
    assert (g.antialias, g.quantize) == (False, "truncate")
    d = load_config("demo").generate
    assert (d.antialias, d.quantize) == (True, "round")  # the demo keeps the kit's choices


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_plan_is_round_robin_with_one_embedding_per_batch_or_per_image():
    gcfg = load_config("cifar100", ["generate.batch_embedding=cyclic"]).generate  # seed 42
    batches = generate.plan(3, 5, gcfg, ["apples", "aquarium fish", "baby"])
    assert len(batches) == 800 and all(len(b) == 8 for b in batches)
    assert [b[0].class_index for b in batches[:7]] == [0, 1, 2, 0, 1, 2, 0]
    assert {im.embedding_index for im in batches[3]} == {1}  # class 0's second batch: embedding 1
    assert batches[1][0].file == "1/aquarium_fish_0.png" and batches[4][7].file == "1/aquarium_fish_15.png"
    assert [im.seed for im in batches[1]] == list(range(50, 58))
    per_image = generate.plan(3, 5, load_config("smoke").generate, ["a", "b", "c"])
    assert [im.embedding_index for im in per_image[0]] == [0, 1, 2, 3]
    assert len({(im.class_index, im.embedding_index) for b in per_image for im in b}) == 12


KILLER = textwrap.dedent("""
    import os, signal, sys
    from ncis_core.config import load_config
    from ncis_core.runs import RunDir
    from ncis_core.stages import generate
    cfg = load_config("smoke", out=sys.argv[1])
    def kill(batch):
        if batch == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, as a real kill
    generate.run(cfg, RunDir(cfg.run.out, cfg), progress=False, on_batch_end=kill)
""")


@pytest.mark.heavy
def test_killed_run_rerun_equals_an_uninterrupted_run(tmp_path):
    cfg, run = prepared(tmp_path / "killed")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(run.root)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = run.path("outliers_dir")
    assert len(list(out.rglob("*.png"))) == 8 and not run.path("outliers_index").exists()
    (out / "0" / ".bear_0.png.abc.tmp").write_bytes(b"half")  # a half-written file of the kill
    index = generate.run(cfg, run, progress=False)

    cfg2, run2 = prepared(tmp_path / "whole")
    assert generate.run(cfg2, run2, progress=False) == index
    assert tree(out) == tree(run2.path("outliers_dir"))
    assert len(index["images"]) == 12 and index["embedding_per"] == "image"
    entry = index["images"][5]
    assert entry == {"file": "1/bird_1.png", "class": 1, "class_name": "bird", "embedding_index": 1,
                     "seed": 47, "batch": 1,
                     "sha256": hashlib.sha256((out / "1" / "bird_1.png").read_bytes()).hexdigest()}
    assert run.manifest()["stages"]["generate"]["status"] == "complete"


def test_injected_embeddings_change_the_image(tmp_path):
    cfg = load_config("smoke")
    pipe, tokens = generate.prepare(cfg, NAMES)
    seeds = [1, 1]
    plain = generate.ordinary_images(pipe, tokens, 2, seeds, cfg.generate)
    vectors = outliers(m=2)[2] * 5
    injected = generate.generate_images(pipe, tokens, 2, vectors, seeds, cfg.generate)
    assert plain.shape == (2, 32, 32, 3) and plain.dtype.name == "uint8"
    assert (plain[0] == plain[1]).all() and not (injected[0] == injected[1]).all()


@pytest.mark.parametrize("tensor, needle", [
    (outliers(d=16), "width D=16 but the text encoder .* has input-embedding width 32"),
    (torch.zeros(6, 0, 32), "holds no outlier embeddings"),
])
def test_bad_outlier_files_are_refused(tmp_path, tensor, needle):
    cfg, run = prepared(tmp_path / "bad", tensor=tensor)
    with pytest.raises(ValueError, match=needle):
        generate.run(cfg, run, progress=False)
    assert not run.path("outliers_index").exists()


LAUNCHED = textwrap.dedent("""
    import sys
    from ncis_core.stages import embed, generate
    embed_out, generate_out, *sets = sys.argv[1:]
    flags = [x for s in sets for x in ("--set", s)]
    embed.main(["--preset", "smoke", "--out", embed_out, "--no-progress", *flags])
    generate.main(["--preset", "smoke", "--out", generate_out, "--no-progress"])
""")


@pytest.mark.heavy
def test_two_accelerate_processes_give_the_files_of_one_for_both_stages(tmp_path):
    """`accelerate launch` with two CPU processes (gloo) runs stage 1 and stage 4; each splits its
    shards/batches between the processes, and the main process writes the same files as one process.
    (accelerate's `--cpu` launcher starts one process only; `--multi_gpu` starts torchrun, and the
    stages ask accelerate for its CPU mode when run.device resolves to the CPU.)"""
    script = tmp_path / "both.py"
    script.write_text(LAUNCHED)
    _, two_run = prepared(tmp_path / "gen-two")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           str(tmp_path / "embed-two"), str(two_run.root), *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 processes)" in proc.stderr
    assert RunDir.open(tmp_path / "embed-two").manifest()["stages"]["embed"]["info"]["processes"] == 2

    cfg = load_config("smoke", SMALL, out=str(tmp_path / "embed-one"))
    one = embed.run(cfg, RunDir.create(cfg), progress=False)
    two = load_embeddings(tmp_path / "embed-two" / "embeddings.safetensors")
    assert torch.equal(one["labels"], two["labels"]) and torch.equal(one["image_ids"], two["image_ids"])
    assert (one["embeddings"] - two["embeddings"]).abs().max() <= 1e-6

    cfg1, one_run = prepared(tmp_path / "gen-one")
    generate.run(cfg1, one_run, progress=False)
    assert tree(one_run.path("outliers_dir")) == tree(two_run.path("outliers_dir"))
    assert two_run.manifest()["stages"]["generate"]["info"]["processes"] == 2


def test_comparison_rows_pair_each_outlier_with_the_plain_image_of_its_seed(tmp_path):
    cfg, run = prepared(tmp_path / "cmp")
    index = generate.run(cfg, run, progress=False)
    ordinary, outliers = generate.comparison_rows(cfg, run, index, [0, 1], per_class=2)
    assert [len(r) for r in ordinary] == [2, 2] and [len(r) for r in outliers] == [2, 2]
    entries = [e for e in index["images"] if e["class"] == 1][:2]
    from PIL import Image
    assert np.array_equal(outliers[1][0], np.asarray(Image.open(run.path("outliers_dir") / entries[0]["file"]).convert("RGB")))
    pipe, tokens = generate.prepare(cfg, index["classes"])
    again = generate.ordinary_images(pipe, tokens, 1, [e["seed"] for e in entries], cfg.generate)
    assert np.array_equal(np.stack(ordinary[1]), again)


def _pngs(folder):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*.png"))}


def test_a_damaged_outlier_image_is_redrawn_by_rerunning_stage_4(smoke_run_1_to_4, tmp_path):
    """A truncated PNG: stage 5 refuses the tree and names stage 4; rerunning stage 4 redraws exactly
    that file, byte for byte (the others are not rewritten), and stage 5 then trains. Stage 4 used
    to find every file present, call all batches done and record the broken tree as current."""
    from ncis_core.runs import StaleArtefactError
    from ncis_core.stages import train_classifier

    root = copy_run(smoke_run_1_to_4, tmp_path / "run")
    cfg = load_run_config("smoke", out=str(root))
    run = RunDir.create(cfg)
    out = run.path("outliers_dir")
    entry = generate.load_index(run.path("outliers_index"))["images"][5]
    damaged = out / entry["file"]
    original = damaged.read_bytes()
    others = {p: v for p, v in _pngs(out).items() if p != damaged}
    damaged.write_bytes(original[: len(original) // 2])
    with pytest.raises(StaleArtefactError, match=r"rerun stage 4 \(generate\)") as err:
        train_classifier.run(cfg, run, progress=False)
    assert f"--out {root} --stages 4-" in str(err.value)

    generate.run(cfg, run, progress=False)
    assert damaged.read_bytes() == original
    assert {p: v for p, v in _pngs(out).items() if p != damaged} == others
    assert run.stage_state("generate").state == "current"
    assert train_classifier.run(cfg, run, progress=False)["num_outliers"] == 12
    # what made the repair possible: every image's hash in the index
    assert entry["sha256"] == hashlib.sha256(original).hexdigest()


def test_a_damaged_or_missing_image_of_another_methods_render_is_redrawn(smoke_run_1_to_4, tmp_path):
    """compare's renders (outliers_<method>/, stage 4's render_batches) are repaired alike: a rerun
    used to see an index of the same inputs and return the damaged folder as complete."""
    from ncis_core.compare import render_outliers

    root = copy_run(smoke_run_1_to_4, tmp_path / "run")
    cfg = load_run_config("smoke", out=str(root))
    run = RunDir.create(cfg)
    folder = render_outliers(cfg, run, "idgen", progress=False)
    before = _pngs(folder)
    images = json.loads((folder / "index.json").read_text())["images"]
    truncated, deleted = folder / images[3]["file"], folder / images[7]["file"]
    truncated.write_bytes(truncated.read_bytes()[:40])
    deleted.unlink()
    assert render_outliers(cfg, run, "idgen", progress=False) == folder
    after = _pngs(folder)
    assert {p: v[1] for p, v in after.items()} == {p: v[1] for p, v in before.items()}
    assert {p: v for p, v in after.items() if p not in (truncated, deleted)} == \
        {p: v for p, v in before.items() if p not in (truncated, deleted)}
    assert images[3]["sha256"] == hashlib.sha256(before[truncated][1]).hexdigest()


@pytest.mark.heavy
def test_every_hint_for_a_damaged_outlier_image_works_when_followed(smoke_run_1_to_4, tmp_path):
    """End to end through the command line: stage 5 on a tree with a truncated PNG prints one error
    with a command; that command regenerates the image (byte-identical) and runs stages 4 onwards."""
    root = copy_run(smoke_run_1_to_4, tmp_path / "run")
    entry = generate.load_index(root / "outliers" / "index.json")["images"][2]
    damaged = root / "outliers" / entry["file"]
    original = damaged.read_bytes()
    damaged.write_bytes(original[:100])
    cli = [sys.executable, "-m", "ncis_core"]
    first = subprocess.run([*cli, "run", "--preset", "smoke", "--out", str(root), "--stages", "5", "--quiet"],
                           cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 2 and "Traceback" not in first.stderr, first.stderr[-3000:]
    assert "rerun stage 4 (generate)" in first.stderr
    hint = re.search(r"`python -m ncis_core ([^`]+)`", first.stderr).group(1)
    second = subprocess.run([*cli, *shlex.split(hint)], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert damaged.read_bytes() == original
    run = RunDir.open(root)
    assert {s.stage: s.state for s in run.status()}["classifier"] == "current"


def test_batches_drawn_side_by_side_equal_one_thread_drawing_them_in_turn(tmp_path, monkeypatch):
    """On the CPU a small pipeline's batches are drawn on worker threads, each with its own copy of
    the pipeline (sharing one races: the scheduler's step, the class token's rows). The files equal,
    byte for byte, those of one thread drawing the batches in turn, and each batch is reported in plan
    order after its files are written."""
    import threading

    from ncis_core.device import intra_op_threads

    calls, reported = [], []
    real = generate.generate_images

    def spy(pipe, *args, **kwargs):
        calls.append((threading.current_thread().name, id(pipe)))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_images", spy)
    trees = {}
    for threads in (1, 2):
        cfg, run = prepared(tmp_path / f"threads{threads}")
        calls.clear()
        with intra_op_threads(threads):
            pipe, _ = generate.prepare(cfg, NAMES)
            assert generate.render_workers(pipe, 3) == threads
            generate.run(cfg, run, progress=False, on_batch_end=lambda b: reported.append(
                (threads, b, len(list(run.path("outliers_dir").rglob("*.png"))))))
        trees[threads] = {p.relative_to(run.root).as_posix(): p.read_bytes()
                          for p in sorted(run.path("outliers_dir").rglob("*.png"))}
        assert len({pipe_id for _, pipe_id in calls}) == threads  # one pipeline per worker
        assert all(name.startswith("render") for name, _ in calls) == (threads == 2)
    assert len(trees[1]) == 12 and trees[1] == trees[2]
    assert reported == [(t, b, 4 * (b + 1)) for t in (1, 2) for b in range(3)]
