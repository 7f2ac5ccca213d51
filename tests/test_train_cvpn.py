"""Stage 2 (stages/train_cvpn.py): schedule, checks, a short training run, resume, the smoke stand-in."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from ncis_core.config import CVPNConfig, load_config
from ncis_core.embeddings_io import load_embeddings, save_embeddings, synthetic_embeddings
from ncis_core.models.cvpn import CVPN
from ncis_core.runs import MissingArtefactError, RunDir
from ncis_core.stages import train_cvpn
from ncis_core.checkpoints import load_cvpn
from ncis_core.embeddings_io import holdout_split, validate_embeddings
from ncis_core.stages.train_cvpn import fit, lr_factor, selection_indices, selection_score, train_step


def test_lr_factor_decays_linearly_per_step_to_a_tenth():
    total = 782 * 200                                     # the paper's 156 400 steps
    assert lr_factor(0, total) == 1.0
    assert lr_factor(total - 1, total) == pytest.approx(0.1)
    assert lr_factor((total - 1) // 2, total) == pytest.approx(0.55, abs=1e-5)
    assert lr_factor(10 * total, total) == pytest.approx(0.1)
    assert lr_factor(0, 1) == 1.0


def test_selection_subset_is_strided_and_at_most_the_limit():
    idx = selection_indices(50_000, 1000)
    assert len(idx) == 1000 and idx[1] - idx[0] == 50 and idx[-1] == 49_950
    assert torch.equal(selection_indices(30, 1000), torch.arange(30))


def test_class_balanced_selection_strides_over_class_grouped_rows():
    """The original strides over embeddings grouped by class, so every class gets its share; over
    an interleaved dataset order the stride can hit one class only (here: stride 2 over 0,1,0,1…)."""
    labels = torch.arange(1000) % 2
    interleaved = selection_indices(1000, 500)
    assert torch.bincount(labels[interleaved], minlength=2).tolist() == [500, 0]
    balanced = selection_indices(1000, 500, labels)
    assert torch.bincount(labels[balanced], minlength=2).tolist() == [250, 250]
    grouped = torch.cat([torch.nonzero(labels == c).flatten() for c in (0, 1)])  # the original's order
    assert torch.equal(balanced, grouped[::2])


def test_selection_score_on_the_original_scale(small_data):
    """Sum over the k invariants, mean over points (ignite's MeanSquaredError): k × the element mean."""
    x, y = small_data["embeddings"], small_data["labels"]
    torch.manual_seed(0)
    model = CVPN(16, 3, num_layers=2).eval()
    with torch.no_grad():
        z = model(x, y)[:, -5:].double()
    summed = selection_score(model, x, y, 5, reduce="sum")
    assert summed == pytest.approx(float(z.pow(2).sum(1).mean()), rel=1e-9)
    assert summed == pytest.approx(5 * selection_score(model, x, y, 5, reduce="mean"), rel=1e-9)
    c = load_config("cifar100").cvpn
    assert (c.selection_subset, c.selection_reduce) == ("class_balanced", "sum")


def test_holdout_split_is_seeded_per_class_and_keeps_two():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 2)
    train, held = holdout_split(labels, 0.3, seed=1)
    assert torch.bincount(labels[held], minlength=3).tolist() == [3, 0, 0]
    assert sorted(torch.cat([train, held]).tolist()) == list(range(15))
    assert torch.equal(holdout_split(labels, 0.3, seed=1)[1], held)
    assert len(holdout_split(labels, 0.0, seed=1)[1]) == 0


@pytest.mark.parametrize("change, message", [
    (lambda x, y: x.__setitem__((3, 1), float("nan")), "NaN or Inf"),
    (lambda x, y: x.__setitem__((0, 0), float("inf")), "NaN or Inf"),
    (lambda x, y: y.__setitem__(5, 7), r"label 7 .* outside \[0, 3\)"),
    (lambda x, y: y.__setitem__(5, -1), r"outside \[0, 3\)"),
    (lambda x, y: y.__setitem__(slice(0, 9), 1), "class 0 has 1 embeddings"),
])
def test_bad_embeddings_are_refused_with_one_message(change, message):
    data = synthetic_embeddings(3, 10, 8, seed=0)
    x, y = data["embeddings"].clone(), data["labels"].clone()
    change(x, y)
    with pytest.raises(ValueError, match=message):
        validate_embeddings(x, y, 3)
    with pytest.raises(ValueError, match="8-dimensional but the cVPN checkpoint expects 12"):
        validate_embeddings(data["embeddings"], data["labels"], 3, dim=12)


def test_train_step_is_invariance_update_then_reconstruction_through_the_updated_inverse():
    torch.manual_seed(0)
    net = CVPN(8, 2, num_layers=1).double()
    ref = copy.deepcopy(net)
    x, labels, k = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1] * 3), 3
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    inv, rec = train_step(net, opt, x, labels, k)
    # the same by hand
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    z = ref(x, labels)
    loss = z[:, -k:].pow(2).mean()
    inv_ref = loss.detach()
    opt_ref.zero_grad()
    loss.backward()
    opt_ref.step()
    target = z.detach().clone()
    target[:, -k:] = 0
    loss2 = (ref.inverse(target, labels) - x).pow(2).mean()
    opt_ref.zero_grad()
    loss2.backward()
    opt_ref.step()
    assert inv == pytest.approx(inv_ref.item()) and rec == pytest.approx(loss2.detach().item())
    assert all(s["step"] == 2 for s in opt.state.values())
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.fixture(scope="module")
def small_data():
    return synthetic_embeddings(num_classes=3, per_class=40, dim=16, seed=0, rank=2)


def test_short_training_lowers_invariant_loss_and_keeps_reconstruction_small(small_data):
    cfg = CVPNConfig(epochs=6, batch_size=16, lr=1e-2, num_layers=2, selection_points=60,
                     selection_subset="dataset_order", selection_reduce="mean")
    x, y = small_data["embeddings"], small_data["labels"]
    model, history = fit(x, y, 3, cfg, seed=0, k=14, progress=False)
    epochs = history["per_epoch"]
    assert len(epochs) == 6 and history["total_steps"] == 6 * 8
    assert epochs[-1]["lr"] == pytest.approx(1e-3)
    assert min(e["selection_mse"] for e in epochs) < 0.35 * epochs[0]["selection_mse"]
    assert epochs[-1]["inv_loss"] < 0.35 * epochs[0]["inv_loss"]
    assert epochs[-1]["rec_loss"] < 0.1 * float(x.pow(2).mean())
    best = min(epochs, key=lambda e: e["selection_mse"])
    assert history["best_epoch"] == best["epoch"]
    with torch.no_grad():                                # the returned model is the best one
        z = model(x[::2], y[::2])
        assert float(z[:, -14:].pow(2).mean()) == pytest.approx(best["selection_mse"], rel=1e-4)


def test_the_lambdalr_schedule_gives_every_step_lr_times_lr_factor_bit_for_bit(small_data, monkeypatch):
    """Stage 2's schedule is torch's LambdaLR over lr_factor: base lr × factor, the very product the
    hand-set rates were, so every step's rate (and so the trained cVPN) is unchanged."""
    cfg = CVPNConfig(epochs=3, batch_size=16, lr=3e-3, final_lr_factor=0.2, num_layers=2, selection_points=60)
    rates, real = [], train_cvpn.train_step

    def recording(model, optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return real(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_cvpn, "train_step", recording)
    _, history = fit(small_data["embeddings"], small_data["labels"], 3, cfg, seed=0, k=14, progress=False)
    total = history["total_steps"]
    assert len(rates) == total == 3 * 8
    assert rates == [cfg.lr * lr_factor(step, total, cfg.final_lr_factor) for step in range(total)]
    assert [e["lr"] for e in history["per_epoch"]] == [rates[8 * e - 1] for e in (1, 2, 3)]


def _run_with_embeddings(tmp_path, name, data, overrides=()):
    cfg = load_config("smoke", ["cvpn.epochs=3", "cvpn.lr=0.01", *overrides], out=str(tmp_path / name))
    run = RunDir.create(cfg)
    with run.stage("embed") as rec:
        if not rec.done:
            save_embeddings(run.path("embeddings"), **data)
    return cfg, run


def test_resume_after_interruption_reaches_the_same_state(tmp_path, small_data):
    cfg, straight = _run_with_embeddings(tmp_path, "straight", small_data)
    train_cvpn.run(cfg, straight, progress=False)

    cfg, broken = _run_with_embeddings(tmp_path, "broken", small_data)

    def interrupt(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cvpn.run(cfg, broken, progress=False, on_epoch_end=interrupt)
    assert broken.manifest()["stages"]["cvpn"]["status"] == "failed"
    assert (broken.path("cvpn_dir") / "last.safetensors").exists()
    epochs_seen = []
    result = train_cvpn.run(cfg, broken, progress=False, on_epoch_end=lambda e, r: epochs_seen.append(e))
    assert epochs_seen == [3]                             # continued after epoch 2
    assert not (broken.path("cvpn_dir") / "last.safetensors").exists()
    a, b = load_file(straight.path("cvpn_best")), load_file(broken.path("cvpn_best"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h["per_epoch"]]  # noqa: E731
    h_a = json.loads(straight.path("cvpn_history").read_text())
    assert strip(h_a) == strip(result.history)
    assert broken.manifest()["stages"]["cvpn"]["info"]["k"] == h_a["k"]
    assert train_cvpn.run(cfg, broken, progress=False).history == result.history   # done: skipped


def test_bad_embeddings_in_the_stage_write_nothing(tmp_path, small_data):
    data = dict(small_data, labels=small_data["labels"].clone())
    data["labels"][:39] = 1                               # class 0 keeps a single embedding
    cfg, run = _run_with_embeddings(tmp_path, "bad", data)
    with pytest.raises(ValueError, match="class 0 has 1 embeddings"):
        train_cvpn.run(cfg, run, progress=False)
    assert not run.path("cvpn_dir").exists()
    assert "cvpn" not in run.manifest()["stages"]


def test_checkpoint_round_trip(tmp_path, small_data):
    cfg, run = _run_with_embeddings(tmp_path, "rt", small_data, ["cvpn.center=true"])
    result = train_cvpn.run(cfg, run, progress=False)
    model, meta, mean = load_cvpn(run.path("cvpn_best"))
    assert meta["dim"] == 16 and meta["num_classes"] == 3 and meta["k"] == result.k
    assert torch.allclose(mean, small_data["embeddings"][result.train_index].mean(0))
    x, y = small_data["embeddings"][:5], small_data["labels"][:5]
    with torch.no_grad():
        assert torch.equal(model(x, y), result.model(x, y))


def test_smoke_preset_gets_synthetic_embeddings_others_fail_clearly(tmp_path):
    cfg = load_config("smoke", out=str(tmp_path / "smoke"))
    run = RunDir.create(cfg)
    message = train_cvpn.ensure_smoke_embeddings(cfg, run)
    assert "SYNTHETIC" in message
    data = load_embeddings(run.require("embeddings"))
    assert data["metadata"]["source"] == "synthetic" and data["embeddings"].shape[1] == 32
    assert run.manifest()["stages"]["embed"]["info"]["synthetic"] is True
    assert "SYNTHETIC" in train_cvpn.ensure_smoke_embeddings(cfg, run)   # said again, not rewritten
    assert run.manifest()["stages"]["embed"]["runs"] == 1
    demo = RunDir.create(load_config("demo", out=str(tmp_path / "demo")))
    with pytest.raises(MissingArtefactError, match=r"run stage 1 \(embed\) first"):
        train_cvpn.ensure_smoke_embeddings(demo.cfg, demo)
    with pytest.raises(MissingArtefactError, match=r"run stage 1 \(embed\) first"):
        train_cvpn.run(demo.cfg, demo, progress=False)
