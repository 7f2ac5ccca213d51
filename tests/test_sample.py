"""Stage 3 (stages/sample.py, outliers/tail.py, outliers/ncis.py, outliers/linear.py): class Gaussians,
tail sampling against a brute force, the ncis and linear samplers, the stage."""

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal

from ncis_core.config import SampleConfig, load_config
from ncis_core.embeddings_io import save_embeddings, synthetic_embeddings
from ncis_core.runs import RunDir
from ncis_core.stages import sample, train_cvpn
from ncis_core.outliers.inputs import SampleInputs
from ncis_core.outliers.linear import sample_linear
from ncis_core.outliers.ncis import sample_ncis
from ncis_core.outliers import tail
from ncis_core.outliers.tail import class_gaussians, draw_standard_normal, tail_sample


def _inputs(x, labels, cfg, model=None, mean=None):
    cvpn = (lambda: (model, {"k": 0}, mean)) if model is not None else None
    return SampleInputs(x, labels, 3, ["a", "b", "c"], 0, cfg, torch.device("cpu"), cvpn)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 9)[torch.randperm(21, generator=g)]
    z = torch.randn(21, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 0.1])
    return z + labels[:, None].double(), labels


def test_class_gaussians_match_a_per_class_loop():
    z, labels = _data()
    mean, cov = class_gaussians(z, labels, torch.arange(3), reg_weight=1e-3)
    for c in range(3):
        rows = z[labels == c].numpy()
        assert np.allclose(mean[c].numpy(), rows.mean(0))
        assert np.allclose(cov[c].numpy(), np.cov(rows, rowvar=False) + 1e-3 * np.eye(4))


def test_tail_sample_keeps_exactly_the_lowest_density_draws():
    z, labels = _data()
    cfg = SampleConfig(reg_weight=1e-3, rounds=2, draws_per_round=40, keep_per_round=3)
    samples, log_density = tail_sample(z, labels, 3, cfg, seed=5, progress=False)
    assert samples.shape == (3, 6, 4) and log_density.shape == (3, 6)
    mean, cov = class_gaussians(z, labels, torch.arange(3), 1e-3)
    for c in range(3):
        dist = MultivariateNormal(mean[c], covariance_matrix=cov[c])
        for r in range(2):
            draws = mean[c] + draw_standard_normal(5, c, r, 40, 4) @ torch.linalg.cholesky(cov[c]).T
            density = dist.log_prob(draws)
            lowest = torch.argsort(density)[:3]
            got = slice(3 * r, 3 * r + 3)
            assert torch.allclose(samples[c, got], draws[lowest], atol=1e-10)
            assert torch.allclose(log_density[c, got], density[lowest], atol=1e-9)
            assert density[lowest].max() <= density.sort().values[3]


def test_tail_sample_is_deterministic_and_independent_of_chunking(monkeypatch):
    z, labels = _data()
    cfg = SampleConfig(reg_weight=1e-4, rounds=3, draws_per_round=30, keep_per_round=2)
    a = tail_sample(z, labels, 3, cfg, seed=1, progress=False)
    b = tail_sample(z, labels, 3, cfg, seed=1, progress=False)
    monkeypatch.setattr(tail, "_CHUNK_BYTES", 1)            # one class per chunk
    c = tail_sample(z, labels, 3, cfg, seed=1, progress=False)
    d = tail_sample(z, labels, 3, cfg, seed=2, progress=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # batched vs per-class linear algebra may differ in the last bits, never in the draws kept
    assert torch.allclose(a[0], c[0], rtol=0, atol=1e-12) and torch.allclose(a[1], c[1], rtol=0, atol=1e-9)
    assert not torch.allclose(a[0], d[0])


def test_keep_more_than_drawn_is_refused():
    z, labels = _data()
    with pytest.raises(ValueError, match="keep_per_round=5 exceeds"):
        tail_sample(z, labels, 3, SampleConfig(draws_per_round=4, keep_per_round=5), seed=0)


def test_linear_baseline_and_ncis_outliers():
    data = synthetic_embeddings(3, 20, 12, seed=0, rank=2)
    x, labels = data["embeddings"], data["labels"]
    cfg = SampleConfig(rounds=2, draws_per_round=25, keep_per_round=3, method="linear")
    linear = sample_linear(_inputs(x, labels, cfg), progress=False)
    direct, _ = tail_sample(x.double(), labels, 3, cfg, seed=0, progress=False)
    assert torch.allclose(linear["outliers"].float(), direct.float())
    torch.manual_seed(0)
    model = train_cvpn.CVPN(12, 3, num_layers=2).eval()
    mean = x.mean(0)
    ncis = sample_ncis(_inputs(x, labels, SampleConfig(rounds=2, draws_per_round=25, keep_per_round=3),
                               model, mean), progress=False)
    assert ncis["outliers"].shape == (3, 6, 12)
    with torch.no_grad():                                   # f(outlier − mean) is the kept latent draw
        z = model(x - mean, labels).double()
        latent, _ = tail_sample(z, labels, 3, SampleConfig(rounds=2, draws_per_round=25, keep_per_round=3),
                                seed=0, progress=False)
        back = model(ncis["outliers"].reshape(-1, 12) - mean, torch.arange(3).repeat_interleave(6))
    assert torch.allclose(back.reshape(3, 6, 12).double(), latent, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the trained cVPN"):
        sample_ncis(_inputs(x, labels, SampleConfig()), progress=False)


def _trained_run(tmp_path, name="run", overrides=()):
    cfg = load_config("smoke", ["sample.draws_per_round=20", *overrides], out=str(tmp_path / name))
    run = RunDir.create(cfg)
    with run.stage("embed") as rec:
        if not rec.done:
            save_embeddings(run.path("embeddings"), **synthetic_embeddings(3, 8, 10, seed=0, rank=2))
    train_cvpn.run(cfg, run, progress=False)
    return cfg, run


def test_stage_writes_outliers_with_method_and_log_densities(tmp_path):
    cfg, run = _trained_run(tmp_path)
    out = sample.run(cfg, run, progress=False)
    m = cfg.sample.rounds * cfg.sample.keep_per_round
    assert out["outliers"].shape == (3, m, 10) and out["outliers"].dtype == torch.float32
    assert out["log_density"].shape == (3, m) and out["method"] == "ncis"
    assert run.manifest()["stages"]["sample"]["status"] == "complete"
    again = sample.run(cfg, run, progress=False)             # complete: skipped, same file
    assert torch.equal(again["outliers"], out["outliers"])


def test_stage_refuses_embeddings_that_do_not_match_the_checkpoint(tmp_path):
    cfg, run = _trained_run(tmp_path)
    # stage 1 is redone with 14-dimensional embeddings; the cVPN still expects 10
    cfg2 = load_config("smoke", ["sample.draws_per_round=20", "embed.lr=0.5"], out=str(run.root))
    run2 = RunDir.create(cfg2)
    with run2.stage("embed"):
        save_embeddings(run2.path("embeddings"), **synthetic_embeddings(3, 8, 14, seed=0, rank=2))
    manifest = run2.manifest()                               # pretend stage 2 was built from these
    manifest["stages"]["cvpn"]["inputs"] = run2._input_hashes(run2.producer("cvpn_best"))
    run2._write_manifest(manifest)
    with pytest.raises(ValueError, match="14-dimensional but the cVPN checkpoint expects 10"):
        sample.run(cfg2, run2, progress=False)
    assert not run2.path("outlier_embeddings").exists()
    assert "sample" not in run2.manifest()["stages"]
