"""Score functions against independent computations; the registry and its config checks."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from ncis_core import scores as registry
from ncis_core.__main__ import main
from ncis_core.config import ConfigError, load_config
from ncis_core.scores import (SCORES, EnergyScore, KNNScore, MahalanobisScore, MaxLogitScore, MSPScore,
                              ODINScore, Score, build_score, register_score, score_arguments,
                              unregister_score)


class Linear(nn.Module):
    """A tiny classifier: features = flattened input, logits = W·features + b."""

    def __init__(self, dim=12, classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x, return_features=False):
        feats = x.flatten(1)
        logits = self.fc(feats)
        return (logits, feats) if return_features else logits


@pytest.fixture
def model_and_x():
    torch.manual_seed(1)
    return Linear(), torch.randn(5, 3, 2, 2)


def _batches(x, y, size=16):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_energy_msp_maxlogit_against_numpy(model_and_x):
    model, x = model_and_x
    logits = model(x).detach().double().numpy()
    lse = np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(EnergyScore()(model, x).numpy(), lse, rtol=1e-5)
    np.testing.assert_allclose(EnergyScore(sign=-1)(model, x).numpy(), -lse, rtol=1e-5)
    t = 2.0
    np.testing.assert_allclose(EnergyScore(temperature=t)(model, x).numpy(),
                               t * np.log(np.exp(logits / t).sum(1)), rtol=1e-5)
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(MSPScore()(model, x).numpy(), soft.max(1), rtol=1e-5)
    np.testing.assert_allclose(MaxLogitScore()(model, x).numpy(), logits.max(1), rtol=1e-5)


def test_odin_without_perturbation_is_temperature_scaled_msp(model_and_x):
    model, x = model_and_x
    logits = model(x).detach().double().numpy() / 10.0
    soft = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(ODINScore(10.0, 0.0)(model, x).numpy(), soft.max(1), rtol=1e-5)


def test_odin_perturbation_follows_the_sign_of_the_gradient(model_and_x):
    model, x = model_and_x
    eps, t = 1e-3, 10.0
    # independent: for a linear model, ∇ₓ log p(ŷ) = (W_ŷ − Σ_k p_k W_k)/T; the step is +ε·sign of it
    with torch.no_grad():
        logits = model(x) / t
        p = torch.softmax(logits, 1)
        W = model.fc.weight
        grad = (W[logits.argmax(1)] - p @ W) / t
        x_tilde = x + eps * grad.sign().reshape(x.shape)
        expected = torch.softmax(model(x_tilde) / t, 1).max(1).values
    torch.testing.assert_close(ODINScore(t, eps)(model, x), expected)
    assert (expected >= MSPScore()(lambda z: model(z) / t, x) - 1e-7).all()


def test_mahalanobis_fitted_through_setup_against_a_per_class_loop():
    torch.manual_seed(2)
    model = Linear(dim=4, classes=3)
    x_train = torch.randn(60, 1, 2, 2) + torch.arange(60).remainder(3).float().reshape(-1, 1, 1, 1)
    y_train = torch.arange(60).remainder(3)
    score = build_score("mahalanobis")
    assert score.needs_setup and score.setup(model, _batches(x_train, y_train)) is score
    x_test = torch.randn(7, 1, 2, 2)
    # independent computation, one class at a time
    f = x_train.flatten(1).double().numpy()
    y = y_train.numpy()
    means = np.stack([f[y == c].mean(0) for c in range(3)])
    cov = sum(((f[y == c] - means[c]).T @ (f[y == c] - means[c])) for c in range(3)) / len(f)
    prec = np.linalg.inv(cov)
    g = x_test.flatten(1).double().numpy()
    expected = -np.min([[(gi - m) @ prec @ (gi - m) for m in means] for gi in g], axis=1)
    np.testing.assert_allclose(score(model, x_test).numpy(), expected, rtol=1e-4)


def test_mahalanobis_needs_setup_and_every_class_of_the_logits():
    with pytest.raises(RuntimeError, match="fitted"):
        MahalanobisScore()(Linear(), torch.zeros(1, 3, 2, 2))
    # the model has 3 logits: class 2 has no training image
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        MahalanobisScore().setup(Linear(), [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]))])
    with pytest.raises(ValueError, match="labels up to 3 but the model has 3 logits"):
        MahalanobisScore().setup(Linear(), [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3]))])


def _knn_brute_force(train_feats, test_feats, k):
    """−(squared distance to the k-th nearest), one query and one training point at a time."""
    train = train_feats / np.linalg.norm(train_feats, axis=1, keepdims=True)
    test = test_feats / np.linalg.norm(test_feats, axis=1, keepdims=True)
    out = []
    for q in test:
        dists = sorted(float(((q - t) ** 2).sum()) for t in train)
        out.append(-dists[k - 1])
    return np.array(out)


@pytest.mark.parametrize("k", [1, 3, 40])
def test_knn_fitted_through_setup_against_a_brute_force_loop(k):
    torch.manual_seed(3)
    model = Linear(dim=12, classes=3)
    x_train, y_train = torch.randn(40, 3, 2, 2), torch.arange(40).remainder(3)
    x_test = torch.cat([torch.randn(6, 3, 2, 2), 3 * x_train[:2]])  # two on a training direction
    score = build_score("knn", k=k)
    assert score.needs_setup and score.setup(model, _batches(x_train, y_train, 7)) is score
    expected = _knn_brute_force(x_train.flatten(1).double().numpy(), x_test.flatten(1).double().numpy(), k)
    np.testing.assert_allclose(score(model, x_test).numpy(), expected, rtol=1e-5, atol=1e-6)
    if k == 1:  # the scaled copies of training images sit on their neighbour: distance 0
        np.testing.assert_allclose(score(model, x_test).numpy()[-2:], 0.0, atol=1e-6)


def test_knn_refuses_a_k_beyond_the_training_features_and_scoring_before_setup():
    model, x = Linear(), torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="k = 5 but there are only 4 ID training features"):
        KNNScore(k=5).setup(model, [(x, torch.zeros(4, dtype=torch.long))])
    with pytest.raises(RuntimeError, match="setup"):
        KNNScore()(model, x)
    with pytest.raises(ValueError, match="at least 1"):
        KNNScore(k=0)


def test_build_score_by_name_and_its_messages():
    assert isinstance(build_score("odin", temperature=5, epsilon=0.1), ODINScore)
    assert build_score("odin", temperature=5).temperature == 5.0  # an int where a float is due
    assert build_score("energy", sign=-1).sign == -1
    assert build_score("knn", k=7).k == 7
    with pytest.raises(ValueError, match=re.escape(f"unknown score 'gradnorm'; registered scores: "
                                                   f"{', '.join(SCORES)}")):
        build_score("gradnorm")
    with pytest.raises(ValueError, match=r"score 'odin' has no argument 'k'; its arguments: temperature, epsilon$"):
        build_score("odin", k=3)
    with pytest.raises(ValueError, match=r"score 'msp' has no argument 'k'; it takes no arguments$"):
        build_score("msp", k=3)
    with pytest.raises(ValueError, match=r"score 'knn': argument k = 'many' should be of type int"):
        build_score("knn", k="many")
    with pytest.raises(ValueError, match="should be of type int"):
        build_score("knn", k=2.5)
    assert score_arguments("odin") == {"temperature": 1000.0, "epsilon": 0.0014}
    assert score_arguments("energy", {"temperature": 2}) == {"temperature": 2.0}  # the sign is stage 6's
    with pytest.raises(ValueError, match="argument 'sign' is set by stage 6"):
        score_arguments("energy", {"sign": -1.0})


def test_registry_refuses_duplicates_and_non_scores(restore_scores):
    class Again(Score):
        name = "energy"

    with pytest.raises(ValueError, match="a score named 'energy' is already registered "
                                         r"\(ncis_core.scores.energy.EnergyScore\)"):
        register_score(Again)

    class NoDefault(Score):
        name = "no_default"

        def __init__(self, k):
            self.k = k

    with pytest.raises(TypeError, match="argument 'k' needs a default"):
        register_score(NoDefault)
    with pytest.raises(TypeError, match="subclass of ncis_core.scores.Score"):
        register_score(type("Plain", (), {"name": "plain"}))
    assert "no_default" not in SCORES and SCORES["energy"] is EnergyScore


def test_a_score_registered_outside_the_package(restore_scores):
    @register_score
    class HalfMaxLogit(Score):
        """A plug-in: half the largest logit, scaled by its argument."""
        name = "half_max"

        def __init__(self, scale: float = 0.5):
            self.scale = scale

        def __call__(self, model, images):
            return self.scale * model(images).max(dim=1).values

    model, x = Linear(), torch.randn(3, 3, 2, 2)
    torch.testing.assert_close(build_score("half_max")(model, x), 0.5 * MaxLogitScore()(model, x))
    assert registry.score_names()[-1] == "half_max"
    cfg = load_config("smoke", ["evaluate.extra_scores=[half_max]", "evaluate.score_args.half_max.scale=2"])
    assert cfg.evaluate.score_args["half_max"] == {"scale": 2}
    unregister_score("half_max")
    assert "half_max" not in SCORES
    with pytest.raises(ConfigError, match="evaluate.extra_scores"):
        load_config("smoke", ["evaluate.extra_scores=[half_max]"])


def test_score_args_override_from_the_command_line(capsys):
    # a preset that sets knn's k (demo), one that has no score_args at all (cifar100), the smoke one
    assert load_config("demo").evaluate.score_args["knn"] == {"k": 5}
    assert "knn" in load_config("demo").evaluate.extra_scores
    assert "knn" not in [load_config(p).evaluate.score for p in ("cifar100", "imagenet100")]
    for preset in ("demo", "cifar100", "smoke"):
        cfg = load_config(preset, ["evaluate.score_args.knn.k=3"])
        assert cfg.evaluate.score_args["knn"] == {"k": 3}
    cfg = load_config("smoke", ["evaluate.score_args.odin.temperature=10", "evaluate.score_args.odin.epsilon=0"])
    assert cfg.evaluate.score_args["odin"] == {"temperature": 10, "epsilon": 0}
    assert main(["datasets", "--preset", "smoke", "--set", "evaluate.score_args.knn.k=5"]) == 0
    assert main(["datasets", "--preset", "smoke", "--set", "evaluate.score_args.knn.k=many"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: evaluate.score_args.knn: score 'knn': argument k = 'many' should be of type int "
        "(its default is 50)"]


@pytest.mark.parametrize("override,message", [
    ("evaluate.score=gradnorm", f"evaluate.score = 'gradnorm' is not a registered score; registered: "
                               f"{', '.join(SCORES)}"),
    ("evaluate.extra_scores=[msp,gradnorm]", "evaluate.extra_scores[1] = 'gradnorm' is not a registered score"),
    ("evaluate.score_args.gradnorm.k=1", "evaluate.score_args.gradnorm: no score 'gradnorm'; registered: energy"),
    ("evaluate.score_args.odin.k=1", "evaluate.score_args.odin: score 'odin' has no argument 'k'; "
                                     "its arguments: temperature, epsilon"),
    ("evaluate.score_args.energy.sign=-1", "evaluate.score_args.energy: score 'energy': argument 'sign' is set "
                                           "by stage 6"),
    ("evaluate.score_args.knn.k=0", "evaluate.score_args.knn: kNN score: k must be at least 1, not 0"),
    ("evaluate.score_args.knn=5", "evaluate.score_args.knn"),  # not a mapping: OmegaConf's type check
])
def test_config_refuses_unknown_scores_and_arguments_in_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("smoke", [override])
    assert message in str(info.value) and "\n" not in str(info.value)
