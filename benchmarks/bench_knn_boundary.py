"""Benchmark of the ``knn_boundary`` outlier sampler (Dream-OOD's, METHOD.md §3b); prints one JSON line.

Times the kit's own :func:`~ncis_core.outliers.knn_boundary.sample_class` (and through it
:func:`~ncis_core.neighbours.kth_nearest`) on synthetic embeddings shaped like
a run's (:func:`~ncis_core.embeddings_io.synthetic_embeddings`: a class near a rank-8 affine subspace
plus noise), on the CPU, float32 (the sampler's default).

* ``paper``: one class at the paper's shapes (N = 500 rows, D = 768, k = 300, select = 50,
  candidates = 1500, keep = 2), timed at a few reduced ``rounds`` (``rounds_timed``; best of
  ``--repeats``, interleaved; ``cpu_utilisation`` ≪ 1 says other work shared the CPUs). A
  least-squares line ``t = fixed + rounds × per_round`` gives ``seconds_per_round_per_class``;
  ``linearity_max_rel_dev`` is the largest relative deviation of a measured time from that line
  (small: linear in rounds). Extrapolated to the paper's 100 rounds × 100 classes
  (``projected_cpu_hours_100_classes``); ``gflops`` = the module's
  :func:`~ncis_core.outliers.knn_boundary.flops_per_class` per round / ``per_round``;
  ``projected_h100_minutes`` = the paper's FLOPs (100 classes) at ``--h100-efficiency`` × 66.9
  TFLOP/s (H100 SXM FP32 datasheet, no TF32: torch's default for matmul), FLOPs only;
  ``projected_h100_memory_floor_minutes`` = the round's tensor traffic (``h100_assumption`` says
  which passes) at 3.35 TB/s, a lower bound the FLOP figure does not include.
  ``reject_none_seconds_per_round``: the same with ``reject=none`` (draws and normalisation, no
  scoring); ``round_parts_seconds``: one round's normal draws, distance matrix products and
  ``kthvalue`` timed alone at its shapes (where the time goes). ``peak_round_bytes``: the process's
  peak resident memory during one round above what it held before (``/proc/self/clear_refs``; null
  where that is refused), next to the sizes that make it up (``candidate_tensor_bytes`` = select ×
  candidates × D × 4: ``eps``, ``b + σ ε`` and its normalisation are alive together;
  ``distance_block_bytes``: one block of ``kth_nearest``, ~64 MB).
  ``fp32_vs_fp64_same_selection``: for round 0, the fraction of float32-kept candidates (the
  sampler's own output, checked) that float64 scoring of the very same candidates keeps too
  (``boundary_same_fp32_fp64``: likewise for the boundary set). The candidates are the float32 draws
  in both, since torch draws different normals for float32 and float64 from one seed, so
  ``sample_class(dtype=float64)`` perturbs with other noise.
* ``demo``: the demo preset's setting (``load_config("demo")``, its
  ``sample.method_args.knn_boundary``; N from ``embed.max_per_class`` less the cVPN holdout; D the
  demo generator's text width), all classes through
  :func:`~ncis_core.outliers.knn_boundary.sample_knn_boundary`.

On a shared machine, run it when it is quiet; ``load_avg_before``/``_after`` say how busy it was.

Usage: ``OMP_NUM_THREADS=2 python benchmarks/bench_knn_boundary.py [--threads 2] [--rounds 2 4 8]
[--repeats 2]`` (a couple of minutes on 2 CPU cores); ``--smoke``: tiny shapes, seconds (the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ncis_core import assets  # noqa: E402
from ncis_core.config import load_config  # noqa: E402
from ncis_core.data.classes import DEMO_ID_CLASSES  # noqa: E402
from ncis_core.embeddings_io import synthetic_embeddings  # noqa: E402
from ncis_core.outliers import get_method, method_params  # noqa: E402
from ncis_core.outliers.inputs import SampleInputs  # noqa: E402
from ncis_core.neighbours import BLOCK_BYTES, kth_nearest  # noqa: E402
from ncis_core.outliers.knn_boundary import (KnnBoundaryParams, _generator,  # noqa: E402
                                             boundary_points, flops_per_class,
                                             sample_class, sample_knn_boundary)
from ncis_core.embeddings_io import holdout_split  # noqa: E402

H100_FP32_FLOPS = 66.9e12       # H100 SXM, FP32 (non-tensor), datasheet
H100_BANDWIDTH = 3.35e12        # H100 SXM HBM3, bytes/s, datasheet
PAPER_CLASSES = 100
# float32 passes over the select × candidates × D candidates per round: randn (w), σ·ε (r+w),
# b + σε (r+w), norm (r), divide (r+w), matmul (r), ‖q‖² (r+w): 11; and over the
# select × candidates × N distances: matmul (w), 2·(…) (r+w), + (r+w), + (r+w), clamp (r+w),
# kthvalue (r): 10
CANDIDATE_PASSES, DISTANCE_PASSES = 11, 10


def _sig(value: float, digits: int = 4) -> float:
    """``value`` to ``digits`` significant digits (smoke-mode times are fractions of a millisecond)."""
    return float(f"{value:.{digits}g}")


def _log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return synthetic_embeddings(1, n, dim, seed=seed, rank=min(8, dim), noise=0.05)["embeddings"]


def _times(x: torch.Tensor, params: KnnBoundaryParams, rounds: list[int], repeats: int) -> tuple[list, list]:
    """Best wall seconds of ``sample_class`` at each of ``rounds`` over ``repeats`` passes (the
    rounds interleaved, so a burst of other work on the machine hits one pass, not one point), and
    that run's CPU utilisation: process CPU seconds / (wall seconds × torch threads), ~1 when the
    machine was free for it."""
    best = [(float("inf"), 0.0)] * len(rounds)
    for _ in range(repeats):
        for i, r in enumerate(rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            sample_class(x, 1.0, replace(params, rounds=r), seed=0, cls=0)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[i] = min(best[i], (wall, cpu / (wall * torch.get_num_threads())))
    return [w for w, _ in best], [_sig(u, 3) for _, u in best]


def _fit(rounds: list[int], seconds: list[float]) -> tuple[float, float, float]:
    """``(fixed, per_round, max relative deviation)`` of the least-squares line through the times."""
    per_round, fixed = np.polyfit(rounds, seconds, 1)
    line = fixed + per_round * np.asarray(rounds, dtype=float)
    return float(fixed), float(per_round), float(np.max(np.abs(np.asarray(seconds) - line) / line))


def _hwm_reset() -> int | None:
    """Reset the peak RSS to the current RSS; returns the current RSS in bytes (None if refused)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:
        return None


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _peak_round_bytes(x: torch.Tensor, params: KnnBoundaryParams) -> int | None:
    before = _hwm_reset()
    if before is None:
        return None
    sample_class(x, 1.0, replace(params, rounds=1), seed=0, cls=0)
    return _status("VmHWM") - before


def _round_parts(x: torch.Tensor, p: KnnBoundaryParams, repeats: int) -> dict:
    """Seconds of one round's main operations at its shapes, each alone (best of ``repeats``): the
    normal draws, the distance blocks' matrix products and their ``kthvalue`` (the sampler's block
    size); where a round's time goes, for projecting it to other hardware."""
    u = x / x.norm(dim=1, keepdim=True)
    count = p.select * p.candidates
    step = max(1, BLOCK_BYTES // (len(u) * 4))
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(count, x.shape[1], generator=gen)
    blocks = [v[i:i + step] for i in range(0, count, step)]
    d2 = [torch.rand(len(b), len(u), generator=gen) for b in blocks]

    def best(f) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            f()
            times.append(time.perf_counter() - start)
        return _sig(min(times))

    return {"randn": best(lambda: torch.randn(p.select, p.candidates, x.shape[1], generator=gen)),
            "matmul": best(lambda: [b @ u.T for b in blocks]),
            "kthvalue": best(lambda: [d.kthvalue(p.k, dim=1) for d in d2])}


def _fp32_vs_fp64(x: torch.Tensor, p: KnnBoundaryParams) -> dict:
    """Round 0 at float32 (the sampler's output, reproduced here to know which candidates it kept)
    against float64 scoring of the same candidates."""
    seed, cls = 0, 0
    got, _ = sample_class(x, 1.0, replace(p, rounds=1), seed=seed, cls=cls)
    u32 = x / x.norm(dim=1, keepdim=True)
    u64 = x.double() / x.double().norm(dim=1, keepdim=True)
    b32, b64 = boundary_points(u32, p.k, p.select), boundary_points(u64, p.k, p.select)
    gen = _generator(seed, cls, 0, x.device)
    order = torch.randperm(p.select, generator=gen)
    eps = torch.randn(p.select, p.candidates, x.shape[1], generator=gen)   # float32, as the sampler
    v32 = u32[b32][order][:, None, :] + p.sigma * eps
    v32 = v32 / v32.norm(dim=-1, keepdim=True)
    top32 = torch.sort(kth_nearest(v32, u32, p.k), dim=1, descending=True, stable=True).indices[:, :p.keep]
    mine = torch.gather(v32, 1, top32[..., None].expand(-1, -1, x.shape[1])).reshape(-1, x.shape[1])
    if not torch.equal(mine, got):
        raise AssertionError("the reproduction of round 0 differs from sample_class's output")
    v64 = u64[b32][order][:, None, :] + p.sigma * eps.double()                # the same candidates
    v64 = v64 / v64.norm(dim=-1, keepdim=True)
    score64 = kth_nearest(v64, u64, p.k)
    top64 = torch.sort(score64, dim=1, descending=True, stable=True).indices[:, :p.keep]
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top32, top64))
    # the float64 score gap between the last kept candidate and the best one left out, per boundary point
    ranked = torch.sort(score64, dim=1, descending=True).values
    gap = (ranked[:, p.keep - 1] - ranked[:, p.keep]) / ranked[:, p.keep - 1]
    return {"fp32_vs_fp64_same_selection": same / top32.numel(),
            "boundary_same_fp32_fp64": len(set(b32.tolist()) & set(b64.tolist())) / p.select,
            "fp64_keep_gap_rel_median": float(gap.median())}


def _demo(classes_limit: int | None) -> dict:
    cfg = load_config("demo")
    params = method_params(get_method("knn_boundary"), cfg.sample.method_args)
    config = assets.path("data/demo/generator/text_encoder/config.json")
    dim = json.loads(config.read_text())["hidden_size"] if config.exists() else 64
    classes = len(DEMO_ID_CLASSES) if classes_limit is None else classes_limit
    data = synthetic_embeddings(classes, cfg.embed.max_per_class, dim, seed=0, rank=8, noise=0.05)
    train, _ = holdout_split(data["labels"], cfg.cvpn.holdout_fraction, cfg.run.seed)
    x, labels = data["embeddings"][train], data["labels"][train]
    rows = torch.randn(classes, dim, generator=torch.Generator().manual_seed(1))
    inputs = SampleInputs(x, labels, classes, data["class_names"], cfg.run.seed, cfg.sample, torch.device("cpu"),
                          _load_token_rows=lambda: rows)
    start = time.perf_counter()
    out = sample_knn_boundary(inputs, params, progress=False)
    seconds = time.perf_counter() - start
    n = int(torch.bincount(labels).min())
    return {"params": asdict(params), "classes": classes, "rows_per_class": n, "dim": dim,
            "dim_from": "text_encoder/config.json hidden_size" if config.exists() else "default 64",
            "outliers_per_class": out["outliers"].shape[1], "seconds_total": _sig(seconds),
            "gflops": _sig(classes * flops_per_class(params, n, dim) / seconds / 1e9)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=500, help="N, rows per class (paper: 500)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, nargs="+", default=[2, 4, 8], help="reduced rounds to time")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many per rounds value")
    parser.add_argument("--h100-efficiency", type=float, default=0.4, help="fraction of H100 FP32 peak assumed")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: N=40, D=16, k=10, select=4, candidates=50, rounds 2 and 10, "
                             "2 demo classes (the test suite)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paper = KnnBoundaryParams()
    params = paper
    if args.smoke:
        args.rows, args.dim, args.rounds, args.repeats = 40, 16, [2, 10], 3
        params = replace(paper, k=10, select=4, candidates=50)
    if len(set(args.rounds)) < 2:
        parser.error("--rounds needs at least two different values to fit a line")
    x = _rows(args.rows, args.dim)
    load_before = [_sig(v, 3) for v in os.getloadavg()]
    result = {"benchmark": "knn_boundary", "smoke": args.smoke,
              "machine": f"{platform.system()} {platform.machine()} {os.cpu_count()} CPUs",
              "threads": torch.get_num_threads(), "load_avg_before": load_before, "torch": torch.__version__,
              "dtype": "float32",
              "data": "synthetic_embeddings(rank 8, noise 0.05), one class"}

    _log(f"knn_boundary: N={args.rows} D={args.dim} {params}")
    sample_class(x, 1.0, replace(params, rounds=1), seed=0, cls=0)    # warm-up (allocator, kernels)
    timed, utilisation = {}, {}
    for reject in ("knn", "none"):
        timed[reject], utilisation[reject] = _times(x, replace(params, reject=reject), args.rounds, args.repeats)
        _log(f"reject={reject}: rounds {args.rounds} -> seconds {[_sig(s) for s in timed[reject]]}, "
             f"cpu utilisation {utilisation[reject]}")
    fixed, per_round, dev = _fit(args.rounds, timed["knn"])
    _, per_round_none, _ = _fit(args.rounds, timed["none"])
    round_flops = flops_per_class(replace(params, rounds=1), args.rows, args.dim) - flops_per_class(
        replace(params, rounds=1, reject="none"), args.rows, args.dim)
    class_seconds = fixed + paper.rounds * per_round
    total_flops = PAPER_CLASSES * flops_per_class(replace(params, rounds=paper.rounds), args.rows, args.dim)
    candidate_bytes = params.select * params.candidates * args.dim * 4
    distance_bytes = params.select * params.candidates * args.rows * 4
    traffic = PAPER_CLASSES * paper.rounds * (CANDIDATE_PASSES * candidate_bytes + DISTANCE_PASSES * distance_bytes)
    step = max(1, BLOCK_BYTES // (args.rows * 4))
    _log("peak memory of one round, float32 vs float64 selection")
    peak = _peak_round_bytes(x, params)
    result["paper"] = {
        "rows": args.rows, "dim": args.dim, "params": asdict(params),
        "rounds_timed": args.rounds, "repeats": args.repeats,
        "seconds": [_sig(s) for s in timed["knn"]],
        "cpu_utilisation": utilisation["knn"],
        "seconds_per_round_per_class": _sig(per_round),
        "fixed_seconds_per_class": _sig(fixed),
        "linearity_max_rel_dev": _sig(dev),
        "flops_per_round_per_class": round_flops,
        "gflops": _sig(round_flops / per_round / 1e9),
        "projected_seconds_per_class": _sig(class_seconds),
        "projected_cpu_hours_100_classes": _sig(PAPER_CLASSES * class_seconds / 3600),
        "flops_100_classes": total_flops,
        "projected_h100_minutes": _sig(total_flops / (args.h100_efficiency * H100_FP32_FLOPS) / 60),
        "projected_h100_memory_floor_minutes": _sig(traffic / H100_BANDWIDTH / 60),
        "h100_assumption": (f"{args.h100_efficiency:.0%} of 66.9 TFLOP/s (H100 SXM FP32, no TF32), FLOPs of "
                            f"flops_per_class only; memory floor: {CANDIDATE_PASSES} float32 passes over the "
                            f"candidates and {DISTANCE_PASSES} over the distances per round at 3.35 TB/s; "
                            f"kthvalue's and randn's own cost not modelled"),
        "reject_none_seconds": [_sig(s) for s in timed["none"]],
        "reject_none_seconds_per_round": _sig(per_round_none),
        "round_parts_seconds": _round_parts(x, params, args.repeats),
        "peak_round_bytes": peak,
        "candidate_tensor_bytes": candidate_bytes,
        "distance_block_bytes": min(step, params.select * params.candidates) * args.rows * 4,
        **_fp32_vs_fp64(x, params),
    }
    _log("demo preset")
    result["demo"] = _demo(2 if args.smoke else None)
    result["load_avg_after"] = [_sig(v, 3) for v in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
