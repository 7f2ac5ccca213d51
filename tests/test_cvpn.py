"""The cVPN (models/cvpn.py): every invertible block, the fast exponential, the invariant count."""

import math

import pytest
import torch
from torch.func import jacrev

from ncis_core.models import cvpn as cvpn_module
from ncis_core.models.cvpn import (CVPN, ConditionalAdditiveCoupling, Orthogonal, count_invariants,
                                   invariants_per_class, pca_spectra, skew_expm)


def _block(kind, dim, dtype=torch.float64, seed=0):
    """(module, forward(x), inverse(y)) for one invertible block or the whole network."""
    torch.manual_seed(seed)
    labels = torch.arange(3).repeat(4)[:4]
    if kind in ("orthogonal", "orthogonal-packed"):
        m = Orthogonal(dim, packed=kind.endswith("packed")).to(dtype)
        return m, m, m.inverse
    if kind == "coupling":
        m = ConditionalAdditiveCoupling(dim, 2 * dim).to(dtype)
        e = torch.randn(1, 2 * dim, dtype=dtype)
        return m, (lambda x: m(x, e.expand(len(x), -1))), (lambda y: m.inverse(y, e.expand(len(y), -1)))
    m = CVPN(dim, num_classes=3, num_layers=2, packed=kind.endswith("packed")).to(dtype)
    lab = lambda n: labels[:n] if n <= len(labels) else torch.arange(n) % 3  # noqa: E731
    return m, (lambda x: m(x, lab(len(x)))), (lambda y: m.inverse(y, lab(len(y))))


BLOCKS = ["orthogonal", "orthogonal-packed", "coupling", "cvpn", "cvpn-packed"]


@pytest.mark.parametrize("kind", BLOCKS)
def test_block_is_invertible_volume_preserving_and_trainable(kind):
    dim = 11 if kind == "coupling" else 12
    module, fwd, inv = _block(kind, dim)
    x = torch.randn(7, dim, dtype=torch.float64)
    y = fwd(x)
    assert ((inv(y) - x).norm() / x.norm()) < 1e-12
    assert ((fwd(inv(x)) - x).norm() / x.norm()) < 1e-12
    # unit Jacobian determinant, one sample at a time (the cVPN's labels matter: use sample 0's)
    for row in x[:2]:
        jac = jacrev(lambda v: fwd(v[None])[0])(row)
        assert abs(torch.linalg.slogdet(jac).logabsdet.item()) < 1e-5
    # gradients reach every parameter
    module.zero_grad()
    (fwd(x).pow(2).sum() + inv(x).pow(2).sum()).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("dim", [8, 13, 16])
def test_cvpn_log_det_is_zero_via_jacrev(dim):
    torch.manual_seed(dim)
    net = CVPN(dim, num_classes=4, num_layers=4).double()
    x = torch.randn(dim, dtype=torch.float64)
    for label in range(2):
        jac = jacrev(lambda v: net(v[None], torch.tensor([label]))[0])(x)
        assert abs(torch.linalg.slogdet(jac).logabsdet.item()) < 1e-5


def test_class_conditioning_changes_the_output():
    torch.manual_seed(0)
    net = CVPN(10, num_classes=3, num_layers=2).double()
    x = torch.randn(1, 10, dtype=torch.float64).expand(3, -1)
    z = net(x, torch.arange(3))
    assert (z[0] - z[1]).abs().max() > 1e-3 and (z[1] - z[2]).abs().max() > 1e-3
    assert torch.allclose(net.inverse(z, torch.arange(3)), x, atol=1e-12)


@pytest.fixture(scope="module")
def paper_size_nets():
    torch.manual_seed(0)
    full = CVPN(768, 100)
    torch.manual_seed(0)
    packed = CVPN(768, 100, packed=True)
    return full, packed


def test_parameter_count_at_paper_size(paper_size_nets):
    full, packed = paper_size_nets
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert full.hidden == 1536
    assert count(full) == 36_162_816          # ≈ 36.2 M: free D × D orthogonal parameters
    assert count(packed) == 34_686_336        # ≈ 34.7 M: strict upper triangles only
    assert count(full) - count(packed) == 5 * 768 * 769 // 2


def test_inverse_accuracy_float32_at_d768(paper_size_nets):
    full, packed = paper_size_nets
    x = torch.randn(16, 768)
    labels = torch.randint(0, 100, (16,))
    with torch.no_grad():
        z = full(x, labels)
        assert ((full.inverse(z, labels) - x).norm() / x.norm()) <= 1e-5
        # same seed: the packed network is the same function
        assert torch.allclose(packed(x, labels), z, atol=1e-4)


def test_packed_and_full_storage_give_the_same_function_and_gradients():
    torch.manual_seed(3)
    full = CVPN(9, 3, num_layers=2).double()
    torch.manual_seed(3)
    packed = CVPN(9, 3, num_layers=2, packed=True).double()
    x, labels = torch.randn(5, 9, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    assert torch.allclose(full(x, labels), packed(x, labels), atol=1e-12)
    full(x, labels).pow(2).sum().backward()
    packed(x, labels).pow(2).sum().backward()
    rows, cols = torch.triu_indices(9, 9, 1)
    for a, b in zip(full.orthogonals, packed.orthogonals):
        assert torch.allclose(a.weight.grad[rows, cols], b.weight.grad, atol=1e-10)
        assert a.weight.grad.tril().abs().max() == 0


def _skew(t):
    upper = torch.triu(t, 1)
    return upper - upper.transpose(-1, -2)


def _special_skews(dim):
    """Skew matrices that hit every branch of the divided differences: zero, tiny, repeated and
    nearly repeated rotation angles, and large ones."""
    g = torch.Generator().manual_seed(dim)
    rand = _skew(torch.rand(dim, dim, generator=g, dtype=torch.float64) * 2 * math.pi - math.pi)
    q = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64)).Q
    blocks = torch.zeros(dim, dim, dtype=torch.float64)
    angles = [0.3, 0.3, 0.3 + 1e-9, 2.0, 2.0 + 1e-6, 40.0, 1e-7, 0.0]
    for i in range(dim // 2):
        blocks[2 * i, 2 * i + 1], blocks[2 * i + 1, 2 * i] = angles[i % 8], -angles[i % 8]
    return [torch.zeros(dim, dim, dtype=torch.float64), 1e-9 * rand, rand, q @ blocks @ q.T]


@pytest.mark.parametrize("dim", [2, 5, 16])
def test_fast_exponential_matches_matrix_exp_values_and_gradients(dim):
    for a in _special_skews(dim):
        t = a.triu(1).clone().requires_grad_()
        weights = torch.randn(dim, dim, dtype=torch.float64)
        q_fast = skew_expm(_skew(t), "eigh")
        q_plain = torch.linalg.matrix_exp(_skew(t))
        assert torch.allclose(q_fast, q_plain, atol=1e-12)
        g_fast, = torch.autograd.grad((q_fast * weights).sum(), t)
        g_plain, = torch.autograd.grad((q_plain * weights).sum(), t)
        assert (g_fast - g_plain).norm() <= 1e-10 * (1 + g_plain.norm())


def test_fast_exponential_passes_gradcheck_batched():
    t = (torch.rand(3, 6, 6, dtype=torch.float64) * 2 - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: skew_expm(_skew(t), "eigh"), (t,))


def test_fast_exponential_in_float32_at_d768_is_orthogonal_and_matches_plain():
    torch.manual_seed(0)
    a = _skew(torch.rand(768, 768) * 2 * math.pi - math.pi)
    q = skew_expm(a, "eigh").double()
    assert q.dtype == torch.float64 and (q.T @ q - torch.eye(768, dtype=torch.float64)).abs().max() < 1e-6
    q_ref = torch.linalg.matrix_exp(a.double())
    assert (q - q_ref).abs().max() < 1e-6


def test_float32_gradient_of_the_fast_exponential_matches_float64():
    torch.manual_seed(0)
    t = torch.rand(2, 64, 64, dtype=torch.float64) * 2 * math.pi - math.pi
    weights = torch.randn(2, 64, 64, dtype=torch.float64)
    grads = []
    for dtype in (torch.float32, torch.float64):
        leaf = t.to(dtype).requires_grad_()
        (skew_expm(_skew(leaf), "eigh") * weights.to(dtype)).sum().backward()
        grads.append(leaf.grad.double())
    assert (grads[0] - grads[1]).norm() / grads[1].norm() < 1e-5


def test_network_with_fast_and_plain_exponential_agree():
    torch.manual_seed(1)
    fast = CVPN(10, 3, num_layers=2, expm="eigh").double()
    plain = CVPN(10, 3, num_layers=2, expm="matrix_exp").double()
    plain.load_state_dict(fast.state_dict())
    x, labels = torch.randn(6, 10, dtype=torch.float64), torch.arange(6) % 3
    assert torch.allclose(fast(x, labels), plain(x, labels), atol=1e-12)
    fast(x, labels)[:, -4:].pow(2).mean().backward()
    plain(x, labels)[:, -4:].pow(2).mean().backward()
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-10, rtol=1e-8), name


def test_evaluation_passes_reuse_the_orthogonal_matrices(monkeypatch):
    calls = []
    real = cvpn_module.skew_expm
    monkeypatch.setattr(cvpn_module, "skew_expm", lambda a, m="auto": calls.append(1) or real(a, m))
    net = CVPN(8, 2, num_layers=2)
    x, labels = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        z = net(x, labels)
        net.inverse(z, labels)
        net(x, labels)
    assert len(calls) == 1                       # one batched call for all layers, then cached
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(x, labels).sum().backward()              # training pass: computed afresh (needs the graph)
    opt.step()
    assert len(calls) == 2
    with torch.no_grad():
        z2 = net(x, labels)
    assert len(calls) == 3 and not torch.allclose(z, z2)   # parameters changed: cache refreshed


def test_autocast_keeps_invertibility():
    torch.manual_seed(0)
    net = CVPN(16, 3, num_layers=2)
    x, labels = torch.randn(8, 16), torch.arange(8) % 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z = net(x, labels)
        x_back = net.inverse(z, labels)
    assert z.dtype == torch.float32 and ((x_back - x).norm() / x.norm()) < 1e-5


def test_count_invariants_on_a_known_spectrum():
    torch.manual_seed(0)
    dim, n = 10, 400
    # class 0: variances 10, 5, 3, then 1e-6 → 3 directions carry > 99.99 %: i = 2 (0-based), k = 8
    # class 1: 12 equal directions would need all; here 6 equal + tiny: cumulative 5/6 < .95 → i = 5, k = 5
    scales0 = torch.tensor([10.0, 5, 3] + [1e-6] * 7).sqrt()
    scales1 = torch.tensor([1.0] * 6 + [1e-6] * 4)
    q = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64)).Q
    x0 = (torch.randn(n, dim, dtype=torch.float64) * scales0) @ q.T
    x1 = torch.randn(n, dim, dtype=torch.float64) * scales1 + 5
    x = torch.cat([x0, x1])
    labels = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    spectra = pca_spectra(x, labels)
    assert spectra[0][:3].sum() > 0.9999
    assert list(invariants_per_class(spectra, dim)) == [8, 5]
    assert count_invariants(x, labels) == int((8 + 5) / 2) == 6
    assert count_invariants(x, labels, variance_pct=50) == int(((10 - 0) + (10 - 2)) / 2)
