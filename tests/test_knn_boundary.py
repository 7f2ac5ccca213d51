"""Dream-OOD's boundary sampler (outliers/knn_boundary.py) against a one-point-at-a-time loop."""

import numpy as np
import pytest
import torch

from ncis_core.config import ConfigError, load_config
from ncis_core.outliers import get_method, method_params
from ncis_core.outliers.inputs import SampleInputs
from ncis_core.outliers.knn_boundary import (KnnBoundaryParams, _generator, boundary_points,
                                             kth_neighbour_distance, sample_class, sample_knn_boundary)


def _rows(n=30, d=6, seed=0):
    g = np.random.default_rng(seed)
    return torch.as_tensor(g.normal(size=(n, d)) + 3.0 * g.normal(size=(1, d)))


def _kth_loop(q: np.ndarray, rows: np.ndarray, k: int) -> float:
    return float(np.sort([np.sum((q - r) ** 2) for r in rows])[k - 1])


def test_kth_neighbour_distance_matches_sorted_distances_and_counts_the_point_itself():
    x = _rows().numpy()
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    got = kth_neighbour_distance(torch.as_tensor(u), torch.as_tensor(u), 5).numpy()
    assert np.allclose(got, [_kth_loop(p, u, 5) for p in u], atol=1e-12)
    assert np.allclose(kth_neighbour_distance(torch.as_tensor(u), torch.as_tensor(u), 1).numpy(), 0, atol=1e-12)
    with pytest.raises(ValueError, match="needs at least k rows"):
        kth_neighbour_distance(torch.as_tensor(u), torch.as_tensor(u), 31)


@pytest.mark.parametrize("reject", ["knn", "none"])
def test_sample_class_equals_the_one_boundary_point_at_a_time_loop(reject, monkeypatch):
    from ncis_core.outliers import knn_boundary

    monkeypatch.setattr(knn_boundary, "_BLOCK_BYTES", 2000)  # many small distance blocks
    x = _rows()
    p = KnnBoundaryParams(k=7, select=4, rounds=3, candidates=25, keep=2, sigma=0.2, reject=reject)
    got, dist = sample_class(x, 2.5, p, seed=3, cls=1, dtype=torch.float64)

    # the same algorithm, written out point by point with numpy (the random draws are the sampler's own)
    u = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    isolation = np.array([_kth_loop(q, u, p.k) for q in u])
    boundary = np.argsort(-isolation, kind="stable")[:p.select]
    want, want_dist = [], []
    for r in range(p.rounds):
        gen = _generator(3, 1, r, torch.device("cpu"))
        order = torch.randperm(p.select, generator=gen).numpy()
        eps = torch.randn(p.select, p.candidates, u.shape[1], generator=gen, dtype=torch.float64).numpy()
        for j, b in enumerate(boundary[order]):
            cands = [(u[b] + p.sigma * e) / np.linalg.norm(u[b] + p.sigma * e) for e in eps[j]]
            scores = [_kth_loop(v, u, p.k) for v in cands]
            chosen = np.argsort(-np.array(scores), kind="stable")[:p.keep] if reject == "knn" else range(p.keep)
            for i in chosen:
                want.append(cands[i] * 2.5)
                want_dist.append(scores[i] if reject == "knn" else np.nan)
    assert got.shape == (p.rounds * p.select * p.keep, 6)
    assert np.allclose(got.numpy(), np.array(want), atol=1e-5)
    assert np.allclose(dist.numpy(), want_dist, equal_nan=True, atol=1e-10)
    assert np.allclose(got.norm(dim=1).numpy(), 2.5, atol=1e-5)   # rescaled to the class token's norm


def test_boundary_points_are_the_most_isolated_rows():
    x = torch.cat([_rows(20), torch.full((1, 6), 40.0) + torch.arange(6.0)])  # one far-away row
    u = x / x.norm(dim=1, keepdim=True)
    assert 20 in boundary_points(u, 3, 2).tolist()


def test_rejection_keeps_more_isolated_points_than_none():
    x = _rows(60, 8)
    p = KnnBoundaryParams(k=10, select=5, rounds=2, candidates=50, keep=2, sigma=0.1)
    kept, _ = sample_class(x, 1.0, p, 0, 0, torch.float64)
    plain, _ = sample_class(x, 1.0, KnnBoundaryParams(**{**p.__dict__, "reject": "none"}), 0, 0, torch.float64)
    u = (x / x.norm(dim=1, keepdim=True)).float()
    assert kth_neighbour_distance(kept, u, 10).mean() > kth_neighbour_distance(plain, u, 10).mean()


def test_all_classes_are_sampled_independently_and_k_below_the_class_size():
    x = torch.cat([_rows(15, 5, 0), _rows(12, 5, 1)]).float()
    labels = torch.tensor([0] * 15 + [1] * 12)
    rows = torch.tensor([[1.0] * 5, [2.0] * 5])
    inputs = SampleInputs(x, labels, 2, ["a", "b"], 4, None, torch.device("cpu"), None, lambda: rows)
    p = KnnBoundaryParams(k=5, select=3, rounds=2, candidates=10, keep=2)
    out = sample_knn_boundary(inputs, p, progress=False)
    assert out["outliers"].shape == (2, 12, 5) and out["knn_distance"].shape == (2, 12)
    alone, _ = sample_class(x[labels == 1], float(rows[1].norm()), p, 4, 1)
    assert torch.allclose(out["outliers"][1], alone)
    assert torch.allclose(out["outliers"].norm(dim=-1)[1], rows[1].norm().expand(12), atol=1e-4)
    with pytest.raises(ValueError, match="class 1 has 12 training embeddings.*k = 12"):
        sample_knn_boundary(inputs, KnnBoundaryParams(k=12, select=3, rounds=1, candidates=4, keep=1),
                            progress=False)


def test_paper_values_are_the_defaults_and_the_demo_scales_k_and_select():
    paper = method_params(get_method("knn_boundary"), load_config("cifar100").sample.method_args)
    assert paper == KnnBoundaryParams(k=300, select=50, rounds=100, candidates=1500, keep=2, sigma=0.07,
                                      reject="knn")
    demo = method_params(get_method("knn_boundary"), load_config("demo").sample.method_args)
    assert demo.k < 90 and demo.select < demo.k   # 90 training rows per class in the demo


@pytest.mark.parametrize("override, message", [
    ("sample.method_args.knn_boundary.reject=maybe", "reject='maybe' is not one of knn, none"),
    ("sample.method_args.knn_boundary.keep=0", "keep must be ≥ 1"),
    ("sample.method_args.knn_boundary.k=abc", "k = 'abc': expected int"),
    ("sample.method_args.knn_boundary.kk=3", "unknown keys \\['kk'\\]"),
    ("sample.method_args.ncis.k=3", "ncis has no parameters"),
])
def test_bad_parameters_are_one_line_at_config_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])
