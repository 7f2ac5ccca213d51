"""The conditional volume-preserving network (cVPN) of NCIS (METHOD.md §2).

``f = O_{L+1} ∘ A_L ∘ O_L ∘ … ∘ A_1 ∘ O_1`` maps an embedding ``x`` of class ``c`` to ``z``; training
pushes the last ``k`` outputs (the invariants) to zero. Blocks (unit Jacobian, exact inverse):
:class:`Orthogonal` (``Q = exp(U − Uᵀ)``), :class:`ConditionalAdditiveCoupling`; :class:`CVPN`
shares one class-embedding table; :func:`skew_expm` computes all layers' exponentials at once.

Example:
    >>> net = CVPN(dim=8, num_classes=3, num_layers=2)
    >>> x, c = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    >>> z = net(x, c)
    >>> torch.allclose(net.inverse(z, c), x, atol=1e-5)
    True
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EXPM_METHODS",
    "skew_expm",
    "Orthogonal",
    "ConditionalAdditiveCoupling",
    "CVPN",
    "pca_spectra",
    "invariants_per_class",
    "count_invariants",
    "invariant_energy",
]

EXPM_METHODS = ("auto", "eigh", "matrix_exp")


# ----------------------------------------------------------------------------- exp of skew matrices
def _sinc(x: torch.Tensor) -> torch.Tensor:
    """sin(x)/x with value 1 at 0."""
    return torch.sinc(x / math.pi)


def _phi_cos(a: torch.Tensor) -> torch.Tensor:
    """Divided differences of f(s) = cos(√s) at s_i = a_i²: (f(s_i) − f(s_j)) / (s_i − s_j).

    Closed form −½ sinc((a_i + a_j)/2) sinc((a_i − a_j)/2): no cancellation anywhere.
    """
    p = (a[..., :, None] + a[..., None, :]) / 2
    q = (a[..., :, None] - a[..., None, :]) / 2
    return -0.5 * _sinc(p) * _sinc(q)


def _phi_sinc(a: torch.Tensor, series_terms: int = 14) -> torch.Tensor:
    """Divided differences of g(s) = sin(√s)/√s at s_i = a_i², accurate to ~1e-15 everywhere.

    Both s < 1: g's power series; |s_i − s_j| ≥ ½: the quotient; else a closed form (design notes).
    """
    s = a * a
    x, y = s[..., :, None], s[..., None, :]
    g = _sinc(a)
    diff = x - y
    small = (x < 1) & (y < 1)
    close = (diff.abs() < 0.5) & ~small
    phi = (g[..., :, None] - g[..., None, :]) / torch.where(small | close, torch.ones_like(diff), diff)
    shape = phi.shape
    xs, ys = x.expand(shape), y.expand(shape)
    if close.any():
        ai, aj = xs[close].sqrt(), ys[close].sqrt()
        p, q = (ai + aj) / 2, (ai - aj) / 2
        sp, sq = _sinc(p), _sinc(q)
        phi[close] = ((torch.cos(p) - sp) * sq - (torch.cos(q) - sq) * sp) / (2 * ai * aj)
    if small.any():
        # g(s) = Σ_k (−1)^k s^k / (2k+1)!; divided difference of s^k = Σ_l x^l y^(k−1−l)
        xv, yv = xs[small], ys[small]
        h, y_pow, series = torch.ones_like(xv), torch.ones_like(yv), torch.zeros_like(xv)
        for k in range(1, series_terms + 1):
            series = series + ((-1) ** k / math.factorial(2 * k + 1)) * h
            y_pow = y_pow * yv
            h = xv * h + y_pow
        phi[small] = series
    return phi


def _eigh(s_mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh``; on the CPU with one thread (multi-threaded LAPACK eigh stalls when
    the cores are oversubscribed)."""
    if s_mat.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.linalg.eigh(s_mat)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(s_mat)
    finally:
        torch.set_num_threads(threads)


class _SkewExpEigh(torch.autograd.Function):
    """exp(A) for skew-symmetric A (…, D, D) through the eigendecomposition of AᵀA, in float64.

    Returns ``(Q, W, θ, WᵀA)``; only ``Q`` is differentiable (``setup_context`` style, for ``torch.func``).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a):
        a64 = a.to(torch.float64)
        s_mat = a64.transpose(-1, -2) @ a64
        s_mat = (s_mat + s_mat.transpose(-1, -2)) / 2
        s, w = _eigh(s_mat)
        theta = s.clamp_min(0).sqrt()
        wt_a = w.transpose(-1, -2) @ a64
        q = w @ (torch.cos(theta)[..., :, None] * w.transpose(-1, -2) + _sinc(theta)[..., :, None] * wt_a)
        return q.to(a.dtype), w, theta, wt_a

    @staticmethod
    def setup_context(ctx, inputs, output):
        (a,) = inputs
        _, w, theta, wt_a = output
        ctx.mark_non_differentiable(w, theta, wt_a)
        ctx.save_for_backward(a, w, theta, wt_a)

    @staticmethod
    def backward(ctx, grad_q, *_):
        a, w, theta, wt_a = ctx.saved_tensors
        # float32 suffices for the gradient (the forward, whose Q must stay orthogonal, is float64)
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        w, wt_a, g = w.to(dtype), wt_a.to(dtype), grad_q.to(dtype)
        theta = theta.to(torch.float64)
        sinc = _sinc(theta).to(dtype)
        phi_cos, phi_sinc = _phi_cos(theta).to(dtype), _phi_sinc(theta).to(dtype)
        wt = w.transpose(-1, -2)
        x = wt @ g
        # Q = cos(S^½) + sinc(S^½) A with S = AᵀA. Gradient: the direct term sinc(S) G, plus
        # A (G_S + G_Sᵀ) with G_S = W M Wᵀ from the Daleckii–Krein adjoints of both matrix functions;
        # for skew A, A W = −(WᵀA)ᵀ, so A (G_S + G_Sᵀ) = −(WᵀA)ᵀ (M + Mᵀ) Wᵀ.
        m = phi_cos * (x @ w) + phi_sinc * (x @ wt_a.transpose(-1, -2))
        grad_a = w @ (sinc[..., :, None] * x) - wt_a.transpose(-1, -2) @ (m + m.transpose(-1, -2)) @ wt
        return grad_a.to(a.dtype)


def skew_expm(a: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """The matrix exponential of skew-symmetric matrices ``a`` (``… × D × D``), batched.

    Args:
        method: ``eigh`` (float64, hand-written backward; the CPU's ``auto``) or ``matrix_exp``
            (``torch.linalg.matrix_exp`` in float64; ``auto`` on accelerators).

    Returns:
        ``exp(a)`` in ``a``'s dtype, orthogonal with determinant 1 (on MPS computed on the CPU).
    """
    if method not in EXPM_METHODS:
        raise ValueError(f"unknown expm method {method!r}; use one of {', '.join(EXPM_METHODS)}")
    device = a.device
    if device.type == "mps":
        return skew_expm(a.cpu(), method).to(device)
    if method == "auto":
        method = "eigh" if device.type == "cpu" else "matrix_exp"
    with torch.autocast(device_type=device.type, enabled=False):
        if method == "eigh":
            return _SkewExpEigh.apply(a)[0]
        return torch.linalg.matrix_exp(a.to(torch.float64)).to(a.dtype)


# ----------------------------------------------------------------------------- blocks
class Orthogonal(nn.Module):
    """``y = Q x + b``, ``Q = exp(U − Uᵀ)`` (``det Q = 1``); inverse ``x = Qᵀ (y − b)``.

    Args:
        packed: store only the strict upper triangle of ``U``; the same function for one seed.
        expm: method of :func:`skew_expm`.
    """

    def __init__(self, dim: int, packed: bool = False, expm: str = "auto"):
        super().__init__()
        self.dim, self.packed, self.expm = dim, packed, expm
        full = torch.empty(dim, dim).uniform_(-math.pi, math.pi)
        if packed:
            rows, cols = torch.triu_indices(dim, dim, offset=1)
            self.register_buffer("_rows", rows, persistent=False)
            self.register_buffer("_cols", cols, persistent=False)
            self.weight = nn.Parameter(full[rows, cols].clone())
        else:
            self.weight = nn.Parameter(full)
        self.bias = nn.Parameter(torch.empty(dim).uniform_(-1 / math.sqrt(dim), 1 / math.sqrt(dim)))

    def skew(self) -> torch.Tensor:
        """``U − Uᵀ`` with ``U`` the strict upper triangle."""
        if self.packed:
            upper = self.weight.new_zeros(self.dim, self.dim).index_put((self._rows, self._cols), self.weight)
        else:
            upper = torch.triu(self.weight, diagonal=1)
        return upper - upper.transpose(0, 1)

    def matrix(self) -> torch.Tensor:
        """``Q = exp(U − Uᵀ)``."""
        return skew_expm(self.skew(), self.expm)

    def forward(self, x: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        q = self.matrix() if q is None else q
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.to(q.dtype), q, self.bias)

    def inverse(self, y: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        q = self.matrix() if q is None else q
        with torch.autocast(device_type=y.device.type, enabled=False):
            return (y.to(q.dtype) - self.bias) @ q


class ConditionalAdditiveCoupling(nn.Module):
    """``y₁ = x₁ + m(x₂, e)``, ``y₂ = x₂`` with ``x₁`` the first ``⌊D/2⌋`` entries; ``det = 1``.

    ``m``: METHOD.md §2's conditioner with ``hidden`` units, also the class embedding ``e``'s width.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.split = dim // 2
        self.inp = nn.Linear(dim - self.split, hidden)
        self.inp2 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(hidden, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, self.split)

    def shift(self, x2: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The conditioner ``m(x₂, e)``."""
        h = self.inp2(torch.sigmoid(self.inp(x2)))
        g = self.cond(F.silu(context))
        return self.out(torch.sigmoid(self.mid(torch.sigmoid(h + g))))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, :self.split], x[:, self.split:]
        return torch.cat([x1 + self.shift(x2, context).to(x1.dtype), x2], dim=1)

    def inverse(self, y: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        y1, y2 = y[:, :self.split], y[:, self.split:]
        return torch.cat([y1 - self.shift(y2, context).to(y1.dtype), y2], dim=1)


class CVPN(nn.Module):
    """The conditional volume-preserving network ``f(·; c)`` (METHOD.md §2).

    Args:
        num_layers: coupling layers ``L`` (``L + 1`` orthogonal layers); the paper uses 4.
        hidden: conditioner width ``H``; default ``4·⌈D/2⌉``.
        packed, expm: as :class:`Orthogonal`.

        >>> net = CVPN(dim=768, num_classes=100)  # the paper's: SD 1.4's token width, 100 classes
        >>> sum(p.numel() for p in net.parameters())
        36162816
    """

    def __init__(self, dim: int, num_classes: int, num_layers: int = 4, hidden: int | None = None,
                 packed: bool = False, expm: str = "auto"):
        super().__init__()
        if expm not in EXPM_METHODS:
            raise ValueError(f"unknown expm method {expm!r}; use one of {', '.join(EXPM_METHODS)}")
        self.dim, self.num_classes, self.num_layers = dim, num_classes, num_layers
        self.hidden = hidden or 4 * math.ceil(dim / 2)
        self.packed, self.expm = packed, expm
        self.class_embedding = nn.Embedding(num_classes, self.hidden)
        self.orthogonals = nn.ModuleList(Orthogonal(dim, packed, expm) for _ in range(num_layers + 1))
        self.couplings = nn.ModuleList(
            ConditionalAdditiveCoupling(dim, self.hidden) for _ in range(num_layers))
        self._cache: tuple | None = None

    def architecture(self) -> dict:
        """The constructor arguments (what a checkpoint records)."""
        return {"dim": self.dim, "num_classes": self.num_classes, "num_layers": self.num_layers,
                "hidden": self.hidden, "packed": self.packed}

    def orthogonal_matrices(self) -> torch.Tensor:
        """All ``Q``\\ s as one ``(L+1) × D × D`` tensor (cached while no gradient is needed)."""
        weights = [o.weight for o in self.orthogonals]
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return skew_expm(torch.stack([o.skew() for o in self.orthogonals]), self.expm)
        key = tuple((w._version, w.data_ptr(), w.device, w.dtype) for w in weights)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                q = skew_expm(torch.stack([o.skew() for o in self.orthogonals]), self.expm)
            self._cache = (key, q)
        return self._cache[1]

    def _check(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected inputs of shape (N, {self.dim}), got {tuple(x.shape)}")
        if labels.shape != (x.shape[0],):
            raise ValueError(f"expected {x.shape[0]} labels, got shape {tuple(labels.shape)}")

    def forward(self, x: torch.Tensor, labels: torch.Tensor, matrices: torch.Tensor | None = None
                ) -> torch.Tensor:
        self._check(x, labels)
        q = self.orthogonal_matrices() if matrices is None else matrices
        e = self.class_embedding(labels)
        for i, coupling in enumerate(self.couplings):
            x = coupling(self.orthogonals[i](x, q[i]), e)
        return self.orthogonals[-1](x, q[-1])

    def inverse(self, z: torch.Tensor, labels: torch.Tensor, matrices: torch.Tensor | None = None
                ) -> torch.Tensor:
        self._check(z, labels)
        q = self.orthogonal_matrices() if matrices is None else matrices
        e = self.class_embedding(labels)
        x = self.orthogonals[-1].inverse(z, q[-1])
        for i in reversed(range(self.num_layers)):
            x = self.orthogonals[i].inverse(self.couplings[i].inverse(x, e), q[i])
        return x


# ----------------------------------------------------------------------------- invariants
def pca_spectra(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
                ) -> list[np.ndarray]:
    """Per class, the PCA explained-variance ratios (descending, ``min(n_c, D)`` entries, float64)."""
    x = torch.as_tensor(embeddings).to(torch.float64)
    labels = torch.as_tensor(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    spectra = []
    for c in range(num_classes):
        xc = x[labels == c]
        xc = xc - xc.mean(0)
        var = torch.linalg.svdvals(xc) ** 2 if len(xc) else torch.zeros(0, dtype=torch.float64)
        total = var.sum()
        ratio = var / total if total > 0 else torch.zeros_like(var)
        spectra.append(ratio.numpy())
    return spectra


def invariants_per_class(spectra: list[np.ndarray], dim: int, variance_pct: float = 5.0) -> np.ndarray:
    """``k_c = D − i_c``, ``i_c`` the first index where the cumulative ratio exceeds ``1 − p/100``."""
    threshold = 1 - variance_pct / 100
    ks = []
    for ratio in spectra:
        above = np.flatnonzero(np.cumsum(ratio) > threshold)
        ks.append(dim - (int(above[0]) if len(above) else 0))
    return np.asarray(ks, dtype=np.int64)


def count_invariants(embeddings: torch.Tensor, labels: torch.Tensor, variance_pct: float = 5.0,
                     num_classes: int | None = None) -> int:
    """The number of invariants ``k = int(mean_c k_c)`` of METHOD.md §2 (per-class PCA rule).

    Example:
        >>> x = torch.randn(40, 6) * torch.tensor([3.0, 2.0, 1e-3, 1e-3, 1e-3, 1e-3])
        >>> count_invariants(x, torch.zeros(40, dtype=torch.long))
        5
    """
    x = torch.as_tensor(embeddings)
    ks = invariants_per_class(pca_spectra(x, labels, num_classes), x.shape[1], variance_pct)
    return int(ks.mean())


@torch.no_grad()
def invariant_energy(model: CVPN, x: torch.Tensor, labels: torch.Tensor, k: int,
                     batch_size: int = 4096) -> torch.Tensor:
    """Per row, the mean of the squared last ``k`` outputs of ``f(x; c)`` (float32, on the CPU)."""
    out = []
    for start in range(0, len(x), batch_size):
        z = model(x[start:start + batch_size], labels[start:start + batch_size])
        out.append(z[:, -k:].float().pow(2).mean(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)
