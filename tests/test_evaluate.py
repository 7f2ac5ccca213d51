"""Stage 6: tables, conventions, the energy sign, scores as plug-ins, and a case whose answer is known."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from ncis_core.config import load_config
from ncis_core.metrics import ood_metrics
from ncis_core.models.resnet import EnergyHead
from ncis_core.runs import RunDir
from ncis_core.scores import SCORES, Score, register_score, unregister_score
from ncis_core.stages import evaluate as stage6
from ncis_core.stages import train_classifier as stage5
from ncis_core.checkpoints import ClassifierBundle


class Brightness(nn.Module):
    """An 'oracle' for the demo world: silhouettes lie on a pure black background (≥ 35 % of the
    pixels of every ID image), textures and faces only have the 2-px black frame (23.4 %).

    Logit of every class = 10 · fraction of black pixels, so logsumexp ranks every ID test image
    above every texture crop and face: FPR95 = 0 and AUROC = 1 are known in advance.
    """

    def __init__(self, classes=6):
        super().__init__()
        self.classes = classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, return_features=False):
        black = (x == -1).all(dim=1).float().mean(dim=(1, 2))[:, None]  # Normalize(0.5, 0.5): 0 → −1
        logits = 10 * black.repeat(1, self.classes) + self.dummy
        logits = logits + torch.arange(self.classes) * 1e-3  # argmax: the last class
        return (logits, x.flatten(1)[:, :8]) if return_features else logits


def _cfg(tmp_path, *overrides):
    return load_config("smoke", ["data.ood_sets=[texture_crops,faces]", "data.ood_subset_size=16",
                                 "evaluate.extra_scores=[msp,maxlogit,mahalanobis,knn]", *overrides],
                       out=str(tmp_path / "run"))


def test_known_answer_and_all_outputs(tmp_path):
    cfg = _cfg(tmp_path)
    bundle = ClassifierBundle(Brightness(), EnergyHead("monotone"), {"slope": 1.0, "outliers": "folder"})
    results, raw = stage6.evaluate(cfg, bundle, progress=False)
    energy = {r["set"]: r for r in results["rows"] if r["score"] == "energy"}
    for name in ["texture_crops", "faces"]:
        assert energy[name]["fpr95"] == 0.0 and energy[name]["auroc"] == 1.0
    assert energy["mean (far)"]["auroc"] == 1.0
    # rows equal metrics recomputed from the raw scores
    again = ood_metrics(raw["energy/id-test"], raw["energy/faces"])
    assert again == {k: energy["faces"][k] for k in again}
    assert {r["score"] for r in results["rows"]} == {"energy", "msp", "maxlogit", "mahalanobis", "knn"}
    assert results["score_args"] == {"energy": {"temperature": 1.0}, "msp": {}, "maxlogit": {},
                                     "mahalanobis": {}, "knn": {"k": 5}}  # the smoke preset's k
    stage6.write_results(tmp_path / "res", results, raw)
    table = (tmp_path / "res" / "table.md").read_text()
    assert "Positive class: ID positive" in table and "| **mean (far)** |" in table
    assert "Score: **knn** (k=5). Positive class" in table
    rows = list(csv.DictReader(open(tmp_path / "res" / "metrics.csv")))
    assert all(r["positive"] == "id" for r in rows)
    assert set(np.load(tmp_path / "res" / "scores.npz").files) == set(raw)
    assert json.loads((tmp_path / "res" / "metrics.json").read_text())["energy_sign"] == 1.0


def test_negative_slope_flips_the_energy_score_and_says_so(tmp_path):
    cfg = _cfg(tmp_path, "evaluate.extra_scores=[]")
    bundle = ClassifierBundle(Brightness(), EnergyHead("linear"), {"slope": -0.7, "outliers": "ncis"})
    results, raw = stage6.evaluate(cfg, bundle, progress=False)
    assert results["energy_sign"] == -1.0
    assert all(r["auroc"] == 0.0 for r in results["rows"])  # the oracle ranked backwards: reported as such
    assert "−logsumexp: the saved energy head's slope (-0.7 < 0)" in stage6.format_table(results)


def test_ood_positive_convention_changes_only_fpr95(tmp_path):
    cfg_id = _cfg(tmp_path, "evaluate.extra_scores=[odin]", "data.ood_sets=[digits]")
    cfg_ood = _cfg(tmp_path, "evaluate.extra_scores=[odin]", "data.ood_sets=[digits]", "evaluate.positive=ood")
    torch.manual_seed(0)
    net = stage5.build_classifier("small", 6).eval()
    bundle = ClassifierBundle(net, EnergyHead("monotone"), {"slope": 1.0})
    a, _ = stage6.evaluate(cfg_id, bundle, progress=False)
    b, _ = stage6.evaluate(cfg_ood, bundle, progress=False)
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["auroc"] == rb["auroc"] and ra["aupr_in"] == rb["aupr_in"]
    assert {r["score"] for r in a["rows"]} == {"energy", "odin"}
    assert "OOD positive" in stage6.format_table(b)


def test_stage6_in_the_run_folder_after_stage5(tmp_path):
    cfg = _cfg(tmp_path, "classifier.outliers=none", "classifier.epochs=1", "evaluate.extra_scores=[msp]")
    run = RunDir.create(cfg)
    stage5.run(cfg, run, progress=False)
    results = stage6.run(cfg, run, progress=False)
    assert 0 <= results["id_accuracy"] <= 1
    assert run.path("table_md").exists() and run.path("metrics_csv").exists()
    assert stage6.run(cfg, run, progress=False) == json.loads(run.path("metrics_json").read_text())


@pytest.mark.heavy
def test_evaluate_command_on_a_released_style_checkpoint(tmp_path):
    """The shortest path to a table: a checkpoint in the OOD literature's layout, no training."""
    import subprocess
    import sys

    torch.manual_seed(0)
    net = stage5.build_classifier("small", 6)
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, tmp_path / "released.pt")
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "ncis_core", "evaluate", "--preset", "smoke",
                           "--checkpoint", str(tmp_path / "released.pt"), "--out", str(out),
                           "--set", "evaluate.extra_scores=[]"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| **mean (far)** |" in proc.stdout
    assert (out / "results" / "metrics.json").exists()
    bad = subprocess.run([sys.executable, "-m", "ncis_core", "evaluate", "--preset", "smoke",
                          "--checkpoint", str(tmp_path / "released.pt"), "--out", str(out),
                          "--set", "classifier.arch=resnet18"], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not fit classifier.arch=resnet18" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_classifier_of_other_classes_is_refused(tmp_path):
    cfg = _cfg(tmp_path, "evaluate.extra_scores=[]")
    bundle = ClassifierBundle(Brightness(), EnergyHead("monotone"),
                              {"slope": 1.0, "classes": ["apple", "bee", "cat", "dog", "emu", "fox"]})
    with pytest.raises(ValueError, match="trained on the classes"):
        stage6.evaluate(cfg, bundle, progress=False)


def _released_state(net, prefix):
    """A released CIFAR checkpoint's layout: the encoder under ``prefix``, no energy head."""
    state = {}
    for key, value in net.state_dict().items():
        key = key.replace(".downsample.", ".shortcut.")
        state[prefix + key] = value
    return state


@pytest.mark.parametrize("prefix", ["encoder.", "module.encoder."])
def test_a_released_checkpoint_without_head_always_scores_plus_logsumexp(tmp_path, prefix):
    """Before the fix the head was built fresh for such a file and its random slope set the sign
    (−, −, −, +, +, + over six fresh processes); the original scores +logsumexp, always."""
    torch.manual_seed(0)
    net = stage5.build_classifier("resnet34", 100)
    path = tmp_path / "released.pt"
    torch.save(_released_state(net, prefix), path)
    c = load_config("cifar100").classifier
    assert (c.arch, c.energy_head, c.head_hidden) == ("resnet34", "linear", 0)
    signs = set()
    for seed in range(6):
        torch.manual_seed(seed)  # the seed a fresh head would be drawn with
        bundle = stage5.load_classifier(path, c.arch, 100, c.energy_head, c.head_hidden)
        assert bundle.slope is None and bundle.meta["head_saved"] is False
        for rule in ("auto", load_config("cifar100").evaluate.energy_sign):  # the preset's: positive
            sign, source = stage6.energy_sign(rule, bundle.slope)
            signs.add(sign)
            assert "no energy head" in source if rule == "auto" else source == "evaluate.energy_sign=positive"
    assert signs == {1.0}


def test_released_checkpoint_scores_are_plus_logsumexp_end_to_end(tmp_path):
    """Stage 6 on a head-less file, under several torch seeds: raw energy scores = +logsumexp."""
    torch.manual_seed(0)
    net = stage5.build_classifier("small", 6)
    path = tmp_path / "released.pt"
    torch.save(_released_state(net, "module."), path)
    cfg = _cfg(tmp_path, "evaluate.extra_scores=[]", "classifier.energy_head=linear",
               "data.ood_sets=[faces]")
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        bundle = stage5.load_classifier(path, "small", 6, "linear")
        results, raw = stage6.evaluate(cfg, bundle, progress=False)
        assert results["energy_sign"] == 1.0 and "no energy head" in results["energy_sign_source"]
        split = next(s for s in stage6.build_splits(cfg.data) if s.name == "faces")
        images = torch.stack([stage6._Normalised(split, cfg)[i][0] for i in range(4)])
        with torch.no_grad():
            expected = torch.logsumexp(net.eval()(images), dim=1).double().numpy()
        np.testing.assert_allclose(raw["energy/faces"][:4], expected, rtol=1e-5)


def test_a_negative_kit_slope_scores_minus_logsumexp_and_warns(tmp_path, caplog):
    cfg = _cfg(tmp_path, "evaluate.extra_scores=[]", "data.ood_sets=[faces]")
    for outliers in ("ncis", "none"):  # the warning used to fire for outlier-trained files only
        bundle = ClassifierBundle(Brightness(), EnergyHead("linear"), {"slope": -0.5, "outliers": outliers})
        with caplog.at_level("WARNING"):
            caplog.clear()
            results, raw = stage6.evaluate(cfg, bundle, progress=False)
        assert results["energy_sign"] == -1.0
        assert any("slope is negative" in r.message for r in caplog.records)
        split = next(s for s in stage6.build_splits(cfg.data) if s.name == "faces")
        images = torch.stack([stage6._Normalised(split, cfg)[i][0] for i in range(4)])
        with torch.no_grad():
            expected = -torch.logsumexp(Brightness()(images), dim=1).double().numpy()
        np.testing.assert_allclose(raw["energy/faces"][:4], expected, rtol=1e-6)


@pytest.mark.parametrize("rule,sign", [("positive", 1.0), ("negative", -1.0)])
def test_energy_sign_override(tmp_path, rule, sign):
    cfg = _cfg(tmp_path, "evaluate.extra_scores=[]", "data.ood_sets=[faces]", f"evaluate.energy_sign={rule}")
    bundle = ClassifierBundle(Brightness(), EnergyHead("linear"), {"slope": -0.5})
    results, _ = stage6.evaluate(cfg, bundle, progress=False)
    assert results["energy_sign"] == sign and rule in results["energy_sign_source"]


def test_a_score_defined_in_a_test_runs_through_stage6_without_editing_the_package(tmp_path, restore_scores):
    @register_score
    class NegativeL1(Score):
        """Minus the L1 norm of the logits."""
        name = "neg_l1"

        def __call__(self, model, images):
            with torch.no_grad():
                return -model(images).abs().sum(dim=1)

    cfg = _cfg(tmp_path, "evaluate.extra_scores=[neg_l1]", "data.ood_sets=[faces]")
    results, raw = stage6.evaluate(cfg, ClassifierBundle(Brightness(), EnergyHead("monotone"), {"slope": 1.0}),
                                   progress=False)
    assert {r["score"] for r in results["rows"]} == {"energy", "neg_l1"}
    split = next(s for s in stage6.build_splits(cfg.data) if s.name == "faces")
    images = torch.stack([stage6._Normalised(split, cfg)[i][0] for i in range(4)])
    with torch.no_grad():
        expected = -Brightness()(images).abs().sum(dim=1).double().numpy()
    np.testing.assert_allclose(raw["neg_l1/faces"][:4], expected, rtol=1e-6)
    stage6.write_results(tmp_path / "res", results, raw)
    assert "Score: **neg_l1**. Positive class" in (tmp_path / "res" / "table.md").read_text()
    assert {r["score"] for r in csv.DictReader(open(tmp_path / "res" / "metrics.csv"))} == {"energy", "neg_l1"}
    unregister_score("neg_l1")
    assert "neg_l1" not in SCORES


def _id_train_loaders(monkeypatch):
    """Count the loaders stage 6 builds over the ID training split."""
    built = []
    loader = stage6._loader

    def counting(split, cfg):
        if split.role == "id-train":
            built.append(split.name)
        return loader(split, cfg)

    monkeypatch.setattr(stage6, "_loader", counting)
    return built


def test_scores_that_need_setup_share_one_id_train_loader_and_others_build_none(tmp_path, monkeypatch):
    bundle = ClassifierBundle(Brightness(), EnergyHead("monotone"), {"slope": 1.0})
    built = _id_train_loaders(monkeypatch)
    stage6.evaluate(_cfg(tmp_path, "evaluate.extra_scores=[msp,maxlogit]", "data.ood_sets=[faces]"), bundle,
                    progress=False)
    assert built == []
    stage6.evaluate(_cfg(tmp_path, "data.ood_sets=[faces]"), bundle, progress=False)  # mahalanobis and knn
    assert built == ["id-train"]


def test_knn_in_stage6_is_set_up_on_the_training_split_with_the_evaluation_transform(tmp_path):
    cfg = _cfg(tmp_path, "evaluate.extra_scores=[knn]", "evaluate.score_args.knn.k=3", "data.ood_sets=[faces]")
    results, raw = stage6.evaluate(cfg, ClassifierBundle(Brightness(), EnergyHead("monotone"), {"slope": 1.0}),
                                   progress=False)
    assert results["score_args"]["knn"] == {"k": 3}
    splits = {s.role: s for s in stage6.build_splits(cfg.data)}

    def features(split):
        data = stage6._Normalised(split, cfg)
        return Brightness()(torch.stack([data[i][0] for i in range(len(data))]), return_features=True)[1]

    train = features(splits["id-train"]).double().numpy()
    test = features(splits["id-test"]).double().numpy()
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test /= np.linalg.norm(test, axis=1, keepdims=True)
    expected = [-np.sort(((train - q) ** 2).sum(1))[2] for q in test]
    np.testing.assert_allclose(raw["knn/id-test"], expected, rtol=1e-5, atol=1e-6)


class _Counting(nn.Module):
    """A small random CNN (logits and features) that counts its forward passes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        from ncis_core.models.resnet import SmallNet

        self.net, self.calls = SmallNet(6, width=4).eval(), 0

    def forward(self, x, return_features=False):
        self.calls += 1
        return self.net(x, return_features=return_features)


def test_all_scores_of_a_batch_share_one_forward_pass_and_equal_each_score_alone(tmp_path):
    """The fix of stage 6 running the network once per score (and once more for the accuracy):
    every score and the accuracy now come from one forward pass per batch, with the same numbers
    as each score computed on its own over the unshared network, batch by batch (the old way).
    ODIN (gradients, a perturbed input) still runs the network itself."""
    cfg = _cfg(tmp_path, "evaluate.extra_scores=[msp,maxlogit,mahalanobis,knn,odin]", "evaluate.batch_size=7")
    model = _Counting()
    results, raw = stage6.evaluate(cfg, ClassifierBundle(model, EnergyHead("monotone"), {"slope": 1.0}),
                                   progress=False)
    splits = {s.name: s for s in stage6.build_splits(cfg.data)}
    scored = [splits[name] for name in ("id-test", "texture_crops", "faces")]
    batches = sum(-(-len(s.dataset) // 7) for s in scored)
    train_batches = -(-len(splits["id-train"].dataset) // 7)
    # setup: mahalanobis and knn read the training split (one pass each); scoring: one shared pass
    # per batch plus ODIN's own two (perturbation gradient, perturbed input) per batch
    assert model.calls == 2 * train_batches + batches + 2 * batches

    scores = stage6.build_scores(cfg, 1.0)
    loader = stage6._OnDevice(stage6._loader(splits["id-train"], cfg), torch.device("cpu"), "", False)
    for name in ("mahalanobis", "knn"):
        scores[name].setup(model.net, loader)
    correct = total = 0
    for split in scored:
        data = stage6._Normalised(split, cfg)
        images = torch.stack([data[i][0] for i in range(len(data))])
        labels = torch.tensor([data[i][1] for i in range(len(data))])
        for name, score_fn in scores.items():
            alone = torch.cat([score_fn(model.net, images[i:i + 7]).double() for i in range(0, len(images), 7)])
            np.testing.assert_array_equal(raw[f"{name}/{split.name}"], alone.numpy(), err_msg=name)
        if split.name == "id-test":
            with torch.no_grad():
                correct = (model.net(images).argmax(1) == labels).sum().item()
            total = len(labels)
    assert results["id_accuracy"] == correct / total


def test_normalised_splits_give_the_batches_of_the_per_image_loader(monkeypatch):
    """compare normalises each split once for its many evaluations: the same batches, bit for bit,
    as the per-image loader; over the memory budget the splits are left as they are."""
    from ncis_core.data import build_splits

    cfg = load_config("smoke", ["evaluate.batch_size=7"])
    splits = build_splits(cfg.data)
    cached = stage6.normalised_splits(splits, cfg)
    assert [s.name for s in cached] == [s.name for s in splits]
    for plain, fast in zip(splits, cached):
        assert isinstance(fast.dataset, stage6.NormalisedImages) and len(fast.dataset) == len(plain.dataset)
        expected = list(stage6._loader(plain, cfg))
        got = stage6._loader(fast, cfg)
        assert len(got) == len(expected) == -(-len(plain.dataset) // 7)
        for (x, y), (xf, yf) in zip(expected, got):
            assert torch.equal(x, xf) and torch.equal(y, yf)
    monkeypatch.setattr(stage6, "NORMALISED_CACHE_MAX_BYTES", 1000)
    assert stage6.normalised_splits(splits, cfg) is splits


def test_an_as_is_set_of_several_sizes_scores_each_image_as_it_would_alone(tmp_path):
    """LSUN-C / iSUN copies whose files are not all 32 × 32 (METHOD.md: the original scores them
    at their own size): batches are cut where the size changes, in order, and every score equals
    the image's score computed alone."""
    from data_fixtures import write_image

    from ncis_core.data.ood import ood_split

    sizes = [(32, 32), (32, 32), (36, 36), (36, 36), (36, 36), (32, 32), (32, 40)]
    for i, size in enumerate(sizes):
        write_image(tmp_path / "iSUN" / f"{i:02d}.png", size=size, seed=i)
    split = ood_split("isun", tmp_path / "iSUN", resize=32, image_size=32, subset_size=None,
                      subset_seed=0, as_is=True)
    cfg = _cfg(tmp_path, "evaluate.batch_size=2", "classifier.num_workers=0")
    torch.manual_seed(0)
    net = stage5.build_classifier("small", 6).eval()
    score = SCORES["energy"]()
    got = stage6.score_split(net, score, split, cfg, torch.device("cpu"), progress=False)
    with torch.no_grad():
        alone = [score(net, stage6._Normalised(split, cfg)[i][0][None]).item() for i in range(len(sizes))]
    np.testing.assert_allclose(got, alone, rtol=1e-5)
    assert [len(b) for b in stage6.same_size_batches(split.dataset.sizes, 2)] == [2, 2, 1, 1, 1]
    assert stage6.normalised_splits([split], cfg)[0] is split  # compare's cache leaves it alone


def test_the_slope_of_an_mlp_head_is_measured_where_the_id_scores_lie():
    """ImageNet-100's head is Linear(1 → 512) → ReLU → Linear(512 → 2): its slope depends on s.
    This one rises where ID scores lie (s in [0, 5]) and falls steeply past s = 10, so the old
    average over s in [−20, 20] called it negative and `auto` would have flipped the score."""
    head = EnergyHead("linear", hidden=2)
    with torch.no_grad():
        first, _, last = head.net
        first.weight.copy_(torch.tensor([[1.0], [1.0]]))
        first.bias.copy_(torch.tensor([0.0, -10.0]))        # h = relu(s), relu(s − 10)
        last.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -3.0]]))  # margin = h₁ − 3 h₂
        last.bias.zero_()
    assert head.slope() < 0
    quantiles_id = [0.5, 1.0, 2.5, 4.0, 5.0]  # 5/25/50/75/95 % of the epoch's ID training scores
    assert stage5.head_slope(head, quantiles_id) == pytest.approx(1.0, rel=1e-4)  # float32 differences
    linear = EnergyHead("linear")
    assert stage5.head_slope(linear, quantiles_id) == pytest.approx(float(linear.slope()))


def test_a_trained_mlp_head_records_its_slope_over_the_id_training_scores(tmp_path):
    cfg = _cfg(tmp_path, "classifier.outliers=none", "classifier.epochs=1", "classifier.head_hidden=8")
    run = RunDir.create(cfg)
    history = stage5.run(cfg, run, progress=False)
    bundle = stage5.load_classifier(run.require("classifier_best"))
    expected = stage5.head_slope(bundle.head, history["epochs"][-1]["score_quantiles_id"])
    assert history["slope"] == pytest.approx(expected) and bundle.slope == pytest.approx(expected)
