"""Stage 5 for many classifiers at once (`ncis_core.stages.train_many`) against one at a time
(`train_classifier.train`), and the outlier images decoded once per run."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ncis_core.config import load_config
from ncis_core.data.folders import ImageFolderFiles, list_images
from ncis_core.runs import RunDir
from ncis_core.stages import train_classifier as stage5


# ----------------------------------------------------------------------------- the decode cache
def test_decoded_outliers_are_the_decoded_files_and_cached_per_content(tmp_path):
    folder = tmp_path / "images"
    (folder / "0").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / "0" / f"x_{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(folder / "0" / "grey.png")  # L mode
    cfg = load_config("smoke", ["classifier.outliers=folder", f"classifier.outlier_folder={folder}",
                                "classifier.num_outliers=null"], out=str(tmp_path / "run"))
    run = RunDir(tmp_path / "run", cfg)
    paths = list_images(folder)
    files = ImageFolderFiles(paths, [-1] * len(paths))
    cached = stage5.outlier_dataset(cfg, run)
    assert type(cached).__name__ == "ArrayDataset" and len(cached) == len(files) == 6
    for i in range(len(files)):
        (a, la), (b, lb) = cached[i], files[i]
        assert la == lb == -1 and a.dtype == np.uint8 and np.array_equal(a, b)
    entries = list((tmp_path / "run" / "cache" / "outlier_images").iterdir())
    assert len(entries) == 1
    # read back from the cache (no decoding), the same arrays
    again = stage5.outlier_dataset(cfg, run)
    assert all(np.array_equal(again[i][0], files[i][0]) for i in range(len(files)))
    # a changed image is a new key
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(folder / "0" / "x_0.png")
    changed = stage5.outlier_dataset(cfg, run)
    assert np.array_equal(changed[1][0], np.zeros((12, 12, 3), np.uint8))  # sorted: grey.png first
    assert len(list((tmp_path / "run" / "cache" / "outlier_images").iterdir())) == 2
    # images of several sizes, or no run folder: read from the files
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(folder / "0" / "small.png")
    assert type(stage5.outlier_dataset(cfg, run)).__name__ == "ImageFolderFiles"
    assert stage5.decoded_images(folder, list_images(folder), None) is None


# ----------------------------------------------------------------------------- packing, exactly
def test_packed_net_is_the_networks_side_by_side():
    """In float64 (no rounding to hide behind): the packed forward, every gradient and the unpacked
    weights are each network's own."""
    from ncis_core.models.resnet import SmallNet, resnet18
    from ncis_core.stages.train_many import PackedNet

    torch.manual_seed(0)
    for nets, size in [([SmallNet(6, 4).double() for _ in range(3)], 16),
                       ([resnet18(5).double() for _ in range(2)], 8)]:
        g = len(nets)
        x = torch.randn(g, 4, 3, size, size, dtype=torch.float64)
        y = torch.randint(0, 5, (g, 4))
        packed = PackedNet(nets)
        for i, net in enumerate(nets):
            assert all(torch.equal(v, net.state_dict()[k]) for k, v in packed.unpacked_state(i).items())
        out = packed(x)
        sum(torch.nn.functional.cross_entropy(out[i], y[i]) for i in range(g)).backward()
        grads = dict(packed.inner.named_parameters())
        for i, net in enumerate(nets):
            ref = net(x[i])
            torch.nn.functional.cross_entropy(ref, y[i]).backward()
            assert torch.allclose(out[i], ref, rtol=0, atol=1e-12)
            for name, p in net.named_parameters():
                assert torch.allclose(packed.unpacked_parameter(name, grads[name].grad, i), p.grad,
                                      rtol=1e-9, atol=1e-12), name
        # BatchNorm's running statistics moved per model, as each network's own did
        for i, net in enumerate(nets):
            for k, v in packed.unpacked_state(i).items():
                if "running" in k:
                    assert torch.allclose(v, net.state_dict()[k], rtol=1e-12, atol=1e-12), k


@pytest.mark.parametrize("head_kind,with_outliers", [("monotone", True), ("linear", True), ("linear", False)])
def test_grouped_engine_steps_are_train_steps_in_float64(tmp_path, monkeypatch, head_kind, with_outliers):
    """The grouped engine (one packed step, vmapped heads, one SGD over packed tensors) against
    ``train()``'s step line by line (the threaded engine's `_step_one`), two steps, float64."""
    import contextlib
    from types import SimpleNamespace

    from ncis_core.models.resnet import EnergyHead, SmallNet
    from ncis_core.stages import train_many as many

    monkeypatch.setattr(torch.Tensor, "float", lambda self: self)  # the energy term's .float() keeps float64

    cfg = load_config("smoke", [f"classifier.energy_head={head_kind}"])
    torch.manual_seed(1)
    members = [SimpleNamespace(model=SmallNet(6, 4).double(), head=EnergyHead(head_kind).double(), cfg=cfg,
                               outliers=[0] if with_outliers else None, folder=tmp_path / f"m{i}")
               for i in range(3)]
    alone = [SimpleNamespace(**{**vars(m), "model": copy.deepcopy(m.model), "head": copy.deepcopy(m.head)})
             for m in members]
    acc = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext,
                          backward=lambda loss: loss.backward())
    grouped, threaded = many._Grouped(members, acc, channels_last=False), many._Threaded(alone, acc, threads=1)
    grouped.train(), threaded.train()
    for step, lr in enumerate((0.1, 0.07)):
        n_in, n_id, n = 8, 12, 16 if with_outliers else 8
        batches = [(torch.randn(n, 3, 16, 16, dtype=torch.float64), torch.randint(0, 6, (n_in,)), n_in,
                    n_id if with_outliers else n_in) for _ in members]
        a, b = grouped.step(batches, lr), threaded.step(batches, lr)
        for ra, rb in zip(a, b):
            assert ra["correct"] == rb["correct"] and ra["ce"] == pytest.approx(rb["ce"], rel=1e-12)
            assert (ra["energy"] is None) == (rb["energy"] is None)
            assert torch.allclose(ra["s"], rb["s"], rtol=1e-12)
    for g in range(3):
        model, head = grouped.modules(g)
        for k, v in model.state_dict().items():
            assert torch.allclose(v, alone[g].model.state_dict()[k], rtol=1e-10, atol=1e-12), k
        for k, v in head.state_dict().items():
            assert torch.allclose(v, alone[g].head.state_dict()[k], rtol=1e-10, atol=1e-12), k


# ----------------------------------------------------------------------------- against train()
OVERRIDES = ["classifier.id_generated=vae_recon", "classifier.outlier_batch_size=8"]


def _cfg(run: Path, method: str, seed: int, extra=()):
    return load_config("smoke", [*OVERRIDES, *extra, f"classifier.outliers={method}", f"classifier.seed={seed}"],
                       out=str(run))


def _train_alone(cfg, run, folder, monkeypatch, **kwargs):
    """``train()``, keeping its model and head (it returns neither when stopped after some steps)."""
    got = {}
    real_init, real_head = stage5._init_model, stage5.EnergyHead

    def init(*args):
        got["model"] = real_init(*args)
        return got["model"]

    class Head(real_head):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            got["head"] = self

    with monkeypatch.context() as m:
        m.setattr(stage5, "_init_model", init)
        m.setattr(stage5, "EnergyHead", Head)
        stage5.train(cfg, RunDir(run, cfg), folder=folder, progress=False, **kwargs)
    return got["model"], got["head"]


def _max_relative_difference(pairs) -> float:
    worst = 0.0
    for (ma, ha), (mb, hb) in pairs:
        for a, b in [(ma.state_dict(), mb.state_dict()), (ha.state_dict(), hb.state_dict())]:
            for k in a:
                x, y = a[k].double(), b[k].double()
                worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)))
    return worst


def test_vectorised_pass_reaches_train_weights_after_two_steps(smoke_run_1_to_4, tmp_path, monkeypatch):
    """G = 3 outlier models (ncis, three seeds, generated-looking ID images) in one pass on two
    threads, and two without outliers in another, against five ``train()`` calls: the same weights
    after two optimizer steps (max relative difference printed; the same kernels on one intra-op
    thread each, so 0 — another thread count changes the rounding, which a ReLU or max-pool kink can
    turn into differences of 1e-3 after two steps, for ``train()`` against itself too)."""
    from ncis_core.stages.train_many import PASS_STATS, train_many

    run = smoke_run_1_to_4
    spec = [("ncis", 0), ("ncis", 1), ("ncis", 2), ("none", 0), ("none", 1)]
    alone = [_train_alone(_cfg(run, m, s), run, tmp_path / f"alone-{m}{s}", monkeypatch, stop_after_steps=2)
             for m, s in spec]  # one thread (the suite's fixture)
    torch.set_num_threads(2)  # two workers of one intra-op thread each (the fixture restores one)
    together = train_many([(_cfg(run, m, s), RunDir(run, _cfg(run, m, s)), tmp_path / f"many-{m}{s}")
                           for m, s in spec], progress=False, stop_after_steps=2)
    assert [(p["models"], p["workers"], p["intra_threads"]) for p in PASS_STATS] == [(3, 2, 1), (2, 2, 1)]
    worst = _max_relative_difference(zip(alone, together))
    print(f"max relative difference after 2 steps: {worst:.3g}")
    assert worst <= 1e-5
    # and the models really differ from each other (own seeds, own data)
    assert _max_relative_difference([(alone[0], alone[1])]) > 1e-3


def test_vectorised_pass_writes_train_files_and_resumes(smoke_run_1_to_4, tmp_path, monkeypatch):
    """Two epochs: uninterrupted ``train()`` against a pass stopped after epoch 1 and resumed — by
    the pass for one model, by ``train()`` alone for the other (the checkpoints are ``train()``'s) —
    the same best.safetensors bytes and history."""
    from ncis_core.stages.train_many import train_many

    run = smoke_run_1_to_4
    spec = [("ncis", 3), ("ncis", 4)]
    extra = ["classifier.epochs=2"]
    for m, s in spec:
        cfg = _cfg(run, m, s, extra)
        stage5.train(cfg, RunDir(run, cfg), folder=tmp_path / f"alone{s}", progress=False)
    torch.set_num_threads(2)  # the pass: two workers of one intra-op thread each
    jobs = [(_cfg(run, m, s, extra), RunDir(run, _cfg(run, m, s, extra)), tmp_path / f"many{s}") for m, s in spec]
    assert train_many(jobs, progress=False, stop_after=1) is None
    assert json.loads((tmp_path / "many3" / "last.json").read_text())["epoch"] == 1
    torch.set_num_threads(1)  # a pass of one model runs on all threads: one, as train() did
    histories = train_many(jobs[:1], progress=False)
    cfg = jobs[1][0]
    stage5.train(cfg, RunDir(run, cfg), folder=tmp_path / "many4", progress=False)
    assert histories[0] == json.loads((tmp_path / "many3" / "history.json").read_text())
    for s in (3, 4):
        assert (tmp_path / f"many{s}" / "best.safetensors").read_bytes() == \
            (tmp_path / f"alone{s}" / "best.safetensors").read_bytes()
        assert json.loads((tmp_path / f"many{s}" / "history.json").read_text()) == \
            json.loads((tmp_path / f"alone{s}" / "history.json").read_text())
    bundle = stage5.load_classifier(tmp_path / "many3" / "best.safetensors")
    assert bundle.meta["seed"] == 3 and bundle.meta["outliers"] == "ncis"


def test_trainings_that_cannot_share_a_pass_are_refused(smoke_run_1_to_4, tmp_path):
    from ncis_core.stages.train_many import NotPackable, train_many

    run = smoke_run_1_to_4
    jobs = [(c, RunDir(run, c), tmp_path / str(i))
            for i, c in enumerate([_cfg(run, "ncis", 0), _cfg(run, "ncis", 1, ["classifier.lr=0.05"])])]
    with pytest.raises(NotPackable, match="differ beyond the per-model fields"):
        train_many(jobs, progress=False)


@pytest.mark.slow
def test_compare_vectorised_gives_the_tables_of_one_at_a_time(smoke_run_1_to_4, tmp_path, monkeypatch):
    """Full smoke trainings through ``compare``: one at a time (``compare.max_parallel=1``, one
    thread) and vectorised (two workers of one thread): the same classifier files, byte for byte, and
    the same tables; the vectorised copy never calls ``train()``."""
    import shutil

    from diffusion_fixtures import copy_run

    from ncis_core.compare import compare
    from ncis_core.stages import train_many as many_module

    methods, seeds = ["none", "linear", "ncis"], [0, 1]
    overrides = ["classifier.epochs=1", "evaluate.extra_scores=[]", *OVERRIDES]
    one = copy_run(smoke_run_1_to_4, tmp_path / "one")
    compare("smoke", one, methods, seeds, [*overrides, "compare.max_parallel=1"], progress=False)
    many = copy_run(one, tmp_path / "many")  # the same renders and caches, no trainings
    shutil.rmtree(many / "compare")
    calls, passes = [], []
    real, real_many = stage5.train, many_module.train_many

    def on_two_threads(*args, **kwargs):  # two workers of one thread; the rest (renders, scores) as `one`
        torch.set_num_threads(2)
        try:
            passes.append(len(args[0]))
            return real_many(*args, **kwargs)
        finally:
            torch.set_num_threads(1)

    monkeypatch.setattr(stage5, "train", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr(many_module, "train_many", on_two_threads)
    # (the copied folder's config says max_parallel=1, and a folder's config is the default)
    compare("smoke", many, methods, seeds, [*overrides, "compare.max_parallel=null"], progress=False)
    assert calls == [] and passes == [6]
    # the 6 in two passes: none × 2 seeds | linear, ncis × 2 seeds
    assert sorted(p["models"] for p in many_module.PASS_STATS) == [2, 4]
    for method in methods:
        for seed in seeds:
            a, b = (root / "compare" / method / f"seed{seed}" for root in (one, many))
            assert (a / "best.safetensors").read_bytes() == (b / "best.safetensors").read_bytes(), (method, seed)
            assert json.loads((a / "history.json").read_text()) == json.loads((b / "history.json").read_text())
    assert (one / "compare" / "table.md").read_text() == (many / "compare" / "table.md").read_text()
    assert (one / "compare" / "table.csv").read_text() == (many / "compare" / "table.csv").read_text()
    # max_parallel is not part of what a result was computed from: nothing is retrained
    mtime = (many / "compare" / "ncis" / "seed0" / "best.safetensors").stat().st_mtime
    compare("smoke", many, methods, seeds, [*overrides, "compare.max_parallel=1"], progress=False)
    assert (many / "compare" / "ncis" / "seed0" / "best.safetensors").stat().st_mtime == mtime


def test_models_per_pass_packs_where_it_pays():
    from ncis_core.stages.train_many import models_per_pass

    small = load_config("demo", ["run.device=cpu"])
    assert models_per_pass(small, 12) == 12 and models_per_pass(small, 100) == 64
    assert models_per_pass(load_config("demo", ["run.device=cpu", "classifier.arch=resnet34"]), 12) == 1
    assert models_per_pass(load_config("demo", ["run.device=cpu", "compare.max_parallel=5"]), 12) == 5
    assert models_per_pass(load_config("demo", ["run.device=cpu", "compare.max_parallel=1"]), 12) == 1
    assert models_per_pass(load_config("demo", ["run.device=cpu", "classifier.arch=resnet34",
                                                "compare.max_parallel=4"]), 3) == 3
