"""Score functions against independent computations."""

import numpy as np
import pytest
import torch
from torch import nn

from ncis_core.scores import (EnergyScore, MahalanobisScore, MaxLogitScore, MSPScore, ODINScore,
                              build_score)


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


def test_mahalanobis_against_a_per_class_loop():
    torch.manual_seed(2)
    model = Linear(dim=4, classes=3)
    x_train = torch.randn(60, 1, 2, 2) + torch.arange(60).remainder(3).float().reshape(-1, 1, 1, 1)
    y_train = torch.arange(60).remainder(3)
    batches = [(x_train[i:i + 16], y_train[i:i + 16]) for i in range(0, 60, 16)]
    score = MahalanobisScore().fit(model, batches, num_classes=3)
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


def test_mahalanobis_needs_fit_and_every_class():
    with pytest.raises(RuntimeError, match="fitted"):
        MahalanobisScore()(Linear(), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        MahalanobisScore().fit(Linear(), [(torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]))], 3)


def test_build_score_by_name():
    assert isinstance(build_score("odin", temperature=5, epsilon=0.1), ODINScore)
    assert build_score("energy", sign=-1).sign == -1
    with pytest.raises(ValueError, match="energy, msp, maxlogit, odin, mahalanobis"):
        build_score("gradnorm")
