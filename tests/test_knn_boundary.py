"""Dream-OOD's boundary sampler (outliers/knn_boundary.py) against a one-point-at-a-time loop."""

import numpy as np
import pytest
import torch

from ncis_core.config import ConfigError, load_config
from ncis_core.outliers import get_method, method_params
from ncis_core.outliers.inputs import SampleInputs
from ncis_core import neighbours
from ncis_core.neighbours import kth_nearest
from ncis_core.outliers.knn_boundary import (KnnBoundaryParams, _generator, boundary_points, flops_per_class,
                                             sample_class, sample_knn_boundary)


def _rows(n=30, d=6, seed=0):
    g = np.random.default_rng(seed)
    return torch.as_tensor(g.normal(size=(n, d)) + 3.0 * g.normal(size=(1, d)))


def _kth_loop(q: np.ndarray, rows: np.ndarray, k: int) -> float:
    return float(np.sort([np.sum((q - r) ** 2) for r in rows])[k - 1])


@pytest.mark.parametrize("reject", ["knn", "none"])
def test_sample_class_equals_the_one_boundary_point_at_a_time_loop(reject, monkeypatch):
    monkeypatch.setattr(neighbours, "BLOCK_BYTES", 2000)  # many small distance blocks
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


def _reference(x: torch.Tensor, p: KnnBoundaryParams, seed: int, cls: int, token_norm: float):
    """The sampler one boundary point at a time (numpy; the random draws are the sampler's own):
    ``(outliers, distances, boundary rows visited per round)``."""
    u = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    isolation = np.array([_kth_loop(q, u, p.k) for q in u])
    boundary = np.argsort(-isolation, kind="stable")[:p.select]
    n = p.select if p.boundary_per_round is None else p.boundary_per_round
    want, want_dist, visited = [], [], []
    for r in range(p.rounds):
        gen = _generator(seed, cls, r, torch.device("cpu"))
        drawn = torch.randperm(p.select, generator=gen).numpy()[:n]   # n of B without replacement
        if p.shared_noise:   # one candidates × D set for the whole round
            shared = torch.randn(p.candidates, u.shape[1], generator=gen, dtype=torch.float64).numpy()
        else:
            own = torch.randn(n, p.candidates, u.shape[1], generator=gen, dtype=torch.float64).numpy()
        visited.append(boundary[drawn])
        for j, b in enumerate(boundary[drawn]):
            eps = shared if p.shared_noise else own[j]
            cands = [(u[b] + p.sigma * e) / np.linalg.norm(u[b] + p.sigma * e) for e in eps]
            scores = [_kth_loop(v, u, p.k) for v in cands]
            chosen = np.argsort(-np.array(scores), kind="stable")[:p.keep] if p.reject == "knn" else range(p.keep)
            for i in chosen:
                want.append(cands[i] * token_norm)
                want_dist.append(scores[i] if p.reject == "knn" else np.nan)
    return np.array(want), np.array(want_dist), visited


@pytest.mark.parametrize("per_round, shared", [(2, False), (3, True), (None, True), (5, True)])
@pytest.mark.parametrize("reject", ["knn", "none"])
def test_boundary_per_round_and_shared_noise_equal_the_one_point_at_a_time_loop(per_round, shared, reject,
                                                                               monkeypatch):
    monkeypatch.setattr(neighbours, "BLOCK_BYTES", 2000)  # many small distance blocks
    x = _rows()
    p = KnnBoundaryParams(k=7, select=5, rounds=4, candidates=25, keep=2, sigma=0.2, reject=reject,
                          boundary_per_round=per_round, shared_noise=shared)
    got, dist = sample_class(x, 2.5, p, seed=3, cls=1, dtype=torch.float64)
    want, want_dist, _ = _reference(x, p, 3, 1, 2.5)
    assert got.shape == (p.rounds * (per_round or p.select) * p.keep, 6)
    assert np.allclose(got.numpy(), want, atol=1e-5)
    assert np.allclose(dist.numpy(), want_dist, equal_nan=True, atol=1e-10)


def test_each_round_visits_boundary_per_round_distinct_boundary_points():
    x = _rows(40, 6, 2)
    n, p = 3, KnnBoundaryParams(k=7, select=6, rounds=8, candidates=10, keep=2, sigma=1e-7, boundary_per_round=3)
    got, _ = sample_class(x, 1.0, p, seed=0, cls=0, dtype=torch.float64)
    assert got.shape == (p.rounds * n * p.keep, 6)
    # σ ≈ 0: every outlier sits on the boundary point it came from; read off which one
    u = x / x.norm(dim=1, keepdim=True)
    boundary = set(boundary_points(u, p.k, p.select).tolist())
    source = torch.cdist(got.double(), u).argmin(dim=1).reshape(p.rounds, n, p.keep)
    assert (source == source[..., :1]).all()          # a point's `keep` outliers follow each other
    rounds = [tuple(r[:, 0].tolist()) for r in source]
    for r in rounds:
        assert len(set(r)) == n and set(r) <= boundary  # n distinct points of B
    assert len(set(rounds)) > 1                       # drawn afresh each round
    assert set().union(*map(set, rounds)) == boundary  # and over the rounds all of B comes up
    assert [tuple(v) for v in _reference(x, p, 0, 0, 1.0)[2]] == rounds
    # boundary_per_round = select is the default (all of B, in the round's random order)
    every = KnnBoundaryParams(**{**p.__dict__, "boundary_per_round": p.select})
    assert torch.equal(sample_class(x, 1.0, every, 0, 0, torch.float64)[0],
                       sample_class(x, 1.0, KnnBoundaryParams(**{**p.__dict__, "boundary_per_round": None}), 0, 0,
                                    torch.float64)[0])


def _same_noise_residual(o1: np.ndarray, b1: np.ndarray, o2: np.ndarray, b2: np.ndarray) -> float:
    """How far ``o1_i ∝ b1 + σ ε_i`` and ``o2_i ∝ b2 + σ ε_i`` are from sharing every ``ε_i``: the
    largest least-squares residual of ``s2 o2_i − s1 o1_i = b2 − b1`` over the candidates ``i``."""
    worst = 0.0
    for v1, v2 in zip(o1, o2):
        a = np.stack([v2, -v1], axis=1)
        s, *_ = np.linalg.lstsq(a, b2 - b1, rcond=None)
        worst = max(worst, float(np.linalg.norm(a @ s - (b2 - b1))))
    return worst


@pytest.mark.parametrize("shared", [True, False])
def test_shared_noise_perturbs_every_boundary_point_of_a_round_by_the_same_draws(shared):
    x = _rows(30, 6, 1)
    p = KnnBoundaryParams(k=7, select=4, rounds=2, candidates=12, keep=12, sigma=0.3, reject="none",
                          shared_noise=shared)
    got, _ = sample_class(x, 1.0, p, seed=7, cls=0, dtype=torch.float64)   # float32 outliers
    u = (x / x.norm(dim=1, keepdim=True)).numpy()
    b = u[boundary_points(torch.as_tensor(u), p.k, p.select).numpy()]
    blocks = got.double().numpy().reshape(p.rounds, p.select, p.candidates, 6)  # keep = candidates, draw order
    pairs = [(i, j) for i in range(p.select) for j in range(p.select) if i != j]
    for r in range(p.rounds):
        # which boundary point each block came from is not known here: the best-fitting pair of B
        for j1, j2 in [(0, 1), (1, 3), (2, 0)]:
            best = min(_same_noise_residual(blocks[r, j1], b[i], blocks[r, j2], b[j]) for i, j in pairs)
            assert (best < 1e-5) if shared else (best > 1e-2)
    # and across rounds the draws differ
    assert min(_same_noise_residual(blocks[0, 0], b[i], blocks[1, 0], b[j]) for i, j in pairs) > 1e-2
    assert torch.cdist(got[:len(got) // 2], got[len(got) // 2:]).min() > 1e-3


def test_flops_and_count_follow_boundary_per_round():
    p = KnnBoundaryParams(select=200, boundary_per_round=50)
    assert flops_per_class(p, 500, 768) == flops_per_class(KnnBoundaryParams(select=50), 500, 768)
    assert flops_per_class(p, 500, 768) == 2.0 * 768 * 500 * (500 + 100 * 50 * 1500)
    assert p.per_round == 50 and KnnBoundaryParams(select=7).per_round == 7


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
    assert kth_nearest(kept, u, 10).mean() > kth_nearest(plain, u, 10).mean()


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
    # the defaults but shared_noise: the original's one set of draws per round (the kit: one per point)
    assert paper == KnnBoundaryParams(k=300, select=50, rounds=100, candidates=1500, keep=2, sigma=0.07,
                                      reject="knn", boundary_per_round=None, shared_noise=True)
    assert KnnBoundaryParams() == KnnBoundaryParams(**{**paper.__dict__, "shared_noise": False})
    demo = method_params(get_method("knn_boundary"), load_config("demo").sample.method_args)
    assert demo.k < 90 and demo.select < demo.k   # 90 training rows per class in the demo


def test_the_imagenet100_preset_has_dream_oods_imagenet100_values():
    inet = method_params(get_method("knn_boundary"), load_config("imagenet100").sample.method_args)
    assert inet == KnnBoundaryParams(k=300, select=200, rounds=100, candidates=1500, keep=2, sigma=0.03,
                                     reject="knn", boundary_per_round=50, shared_noise=True)
    assert method_params(get_method("knn_boundary"), load_config("cifar100").sample.method_args).shared_noise


@pytest.mark.parametrize("override, message", [
    ("sample.method_args.knn_boundary.reject=maybe", "reject='maybe' is not one of knn, none"),
    ("sample.method_args.knn_boundary.keep=0", "keep must be ≥ 1"),
    ("sample.method_args.knn_boundary.k=abc", "k = 'abc': expected int"),
    ("sample.method_args.knn_boundary.kk=3", "unknown keys \\['kk'\\]"),
    ("sample.method_args.ncis.k=3", "ncis has no parameters"),
    ("sample.method_args.knn_boundary.boundary_per_round=0", "boundary_per_round=0 must be ≥ 1 and ≤ select=2"),
    ("sample.method_args.knn_boundary.boundary_per_round=3", "boundary_per_round=3 must be ≥ 1 and ≤ select=2"),
    ("sample.method_args.knn_boundary.boundary_per_round=1.5", "boundary_per_round = 1.5: expected int"),
    ("sample.method_args.knn_boundary.shared_noise=maybe", "shared_noise = 'maybe': expected bool"),
])
def test_bad_parameters_are_one_line_at_config_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_boundary_per_round_may_be_null_or_an_int_at_config_load():
    args = load_config("smoke", ["sample.method_args.knn_boundary.boundary_per_round=1",
                                 "sample.method_args.knn_boundary.shared_noise=true"]).sample.method_args
    assert method_params(get_method("knn_boundary"), args).boundary_per_round == 1
    assert method_params(get_method("knn_boundary"), args).shared_noise is True
    args = load_config("smoke", ["sample.method_args.knn_boundary.boundary_per_round=null"]).sample.method_args
    assert method_params(get_method("knn_boundary"), args).boundary_per_round is None
