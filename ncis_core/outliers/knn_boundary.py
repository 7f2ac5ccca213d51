"""``knn_boundary``: Dream-OOD's sampler (NPOS-style, METHOD.md §3b) on the stage-1 embeddings.
Per class, on the normalised rows: the ``select`` most isolated (k-th-NN squared distance, exact,
:func:`ncis_core.neighbours.kth_nearest`) are perturbed ``rounds`` times on the unit sphere, the
``keep`` candidates farthest from the class (``reject=knn``) are rescaled to the norm of the class
token's row. The steps in full: docs/design-notes.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import TooLittleData
from ..neighbours import kth_nearest
from ..progress import bar_options
from .spec import EMBEDDINGS, OutlierMethod
from .inputs import SampleInputs

__all__ = ["KnnBoundaryParams", "REJECT_RULES", "boundary_points",
           "sample_class", "sample_knn_boundary", "flops_per_class", "METHOD"]

REJECT_RULES = ("knn", "none")


@dataclass(frozen=True)
class KnnBoundaryParams:
    """Dream-OOD's sampler settings (``sample.method_args.knn_boundary.<key>``); defaults = the paper's.

    Args:
        k: the neighbour whose distance scores a point (the point itself is its own first).
        select: boundary points per class (the most isolated rows).
        rounds: sampling rounds; each visits every boundary point (or ``boundary_per_round`` of them) once.
        candidates: perturbations drawn around a boundary point per round.
        keep: candidates kept per boundary point and round.
        sigma: the perturbation's scale (it multiplies ``ε ~ N(0, I_D)`` on the unit sphere).
        reject: ``knn`` (keep the candidates with the largest k-th-NN distance, the intended rule)
            or ``none`` (keep the first ``keep``: the original code's effective behaviour).
        boundary_per_round: boundary points visited per round, drawn at random from the ``select``
            (Dream-OOD's ImageNet-100 script: 50 of 200); ``None``: all of them.
        shared_noise: one set of ``candidates`` draws ε per round for all its boundary points (the
            original) instead of independent draws per point.
    """

    k: int = 300
    select: int = 50
    rounds: int = 100
    candidates: int = 1500
    keep: int = 2
    sigma: float = 0.07
    reject: str = "knn"
    boundary_per_round: Optional[int] = None
    shared_noise: bool = False

    def check(self) -> None:
        for name in ("k", "select", "rounds", "candidates", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"sample.method_args.knn_boundary.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.keep > self.candidates:
            raise ValueError(f"sample.method_args.knn_boundary.keep={self.keep} exceeds candidates={self.candidates}")
        if self.sigma <= 0:
            raise ValueError(f"sample.method_args.knn_boundary.sigma must be > 0, got {self.sigma}")
        if self.reject not in REJECT_RULES:
            raise ValueError(f"sample.method_args.knn_boundary.reject={self.reject!r} is not one of "
                             f"{', '.join(REJECT_RULES)}")
        n = self.boundary_per_round
        if n is not None and not 1 <= n <= self.select:
            raise ValueError(f"sample.method_args.knn_boundary.boundary_per_round={n} must be ≥ 1 and "
                             f"≤ select={self.select}")

    @property
    def per_round(self) -> int:
        """Boundary points visited per round (``boundary_per_round``, or all ``select``)."""
        return self.select if self.boundary_per_round is None else self.boundary_per_round


def _generator(seed: int, cls: int, rnd: int, device: torch.device) -> torch.Generator:
    state = np.random.SeedSequence([seed, 11, cls, rnd]).generate_state(2)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def boundary_points(u: torch.Tensor, k: int, select: int) -> torch.Tensor:
    """Indices of the ``select`` rows of ``u`` with the largest k-th-NN distance, largest first
    (ties: the lower index first)."""
    # stable: mutual k-th neighbours tie exactly, and the lower index goes first
    return torch.sort(kth_nearest(u, u, k), descending=True, stable=True).indices[:select]


def sample_class(x: torch.Tensor, token_norm: float, params: KnnBoundaryParams, seed: int, cls: int,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One class's ``M × D`` outliers (M = rounds × per_round × keep) and their k-th-NN distances
    (NaN under ``reject=none``, which does not score the candidates).

    Args:
        x: the class's ``N × D`` rows (stage-1 embeddings).
        token_norm: ``‖e_c‖``, the norm of the class token's row.
        cls: the class index (selects the random streams).
    """
    p, device, n = params, x.device, params.per_round
    if p.k >= len(x) or p.select > len(x):
        raise TooLittleData(f"class {cls} has {len(x)} training embeddings: knn_boundary needs more than "
                            f"k = {p.k} and at least select = {p.select} (set sample.method_args.knn_boundary.k "
                            f"and .select below the class size)")
    u = x.to(dtype)
    u = u / u.norm(dim=1, keepdim=True)
    boundary = u[boundary_points(u, p.k, p.select)]
    kept, scores = [], []
    for r in range(p.rounds):
        gen = _generator(seed, cls, r, device)
        order = torch.randperm(p.select, generator=gen, device=device)[:n]   # n of B, drawn in order
        shape = (p.candidates, u.shape[1]) if p.shared_noise else (n, p.candidates, u.shape[1])
        eps = torch.randn(shape, generator=gen, device=device, dtype=dtype)  # shared: broadcast over b
        v = boundary[order][:, None, :] + p.sigma * eps
        v = v / v.norm(dim=-1, keepdim=True)
        if p.reject == "knn":
            score = kth_nearest(v, u, p.k)                                   # n × candidates
            top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :p.keep]
            scores.append(torch.gather(score, 1, top).reshape(-1))
        else:
            top = torch.arange(p.keep, device=device).expand(n, -1)
            scores.append(torch.full((n * p.keep,), float("nan"), dtype=dtype, device=device))
        kept.append(torch.gather(v, 1, top[..., None].expand(-1, -1, u.shape[1])).reshape(-1, u.shape[1]))
    return (torch.cat(kept) * token_norm).to(torch.float32), torch.cat(scores).to(torch.float64)


@torch.no_grad()
def sample_knn_boundary(inputs: SampleInputs, params: KnnBoundaryParams | None = None,
                        progress: bool = True, dtype: torch.dtype = torch.float32) -> dict:
    """All classes: ``outliers`` C × M × D, ``knn_distance`` C × M (the kept candidates' scores),
    ``log_density`` NaN (no Gaussian is involved)."""
    params = params or KnnBoundaryParams()
    norms = inputs.class_token_rows().norm(dim=1)
    outliers, distances = [], []
    for c in tqdm(range(inputs.num_classes), desc="knn_boundary sampling", unit="class", **bar_options(progress)):
        o, d = sample_class(inputs.embeddings[inputs.labels == c], float(norms[c]), params, inputs.seed, c, dtype)
        outliers.append(o)
        distances.append(d)
    distances = torch.stack(distances)
    return {"outliers": torch.stack(outliers), "knn_distance": distances,
            "log_density": torch.full_like(distances, float("nan"))}


def flops_per_class(params: KnnBoundaryParams, rows: int, dim: int) -> float:
    """FLOPs of one class's distances: all row pairs, then every candidate against the rows
    (2 · D per pair); ``reject=none`` scores no candidate."""
    scored = params.rounds * params.per_round * params.candidates if params.reject == "knn" else 0
    return 2.0 * dim * rows * (rows + scored)


METHOD = OutlierMethod(
    name="knn_boundary", label="kNN boundary", produces=EMBEDDINGS,
    needs=("embeddings", "class_token_rows"), sample=sample_knn_boundary, params=KnnBoundaryParams,
    flops=flops_per_class,
    summary="Dream-OOD's sampler: perturbations of each class's most isolated normalised embeddings, "
            "kept by their k-th-NN distance")
