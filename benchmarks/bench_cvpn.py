"""Benchmark of stage 2's training step and stage 3's sampler; prints one JSON line.

The kit's cVPN (one batched exponential per pass through the float64 eigendecomposition of AᵀA,
hand-written backward) against a naive reference written here: every orthogonal layer calls plain
``torch.linalg.matrix_exp`` in float32 with autograd on every pass. Both start from the same weights
and see the same batches; each runs in its own process so that peak memory is its own.

Reported: ``ms_per_step_kit`` / ``ms_per_step_naive`` (median of the steps after the first; one step
= both optimizer updates), ``speedup_vs_naive``, ``grad_rel_diff`` (‖g_kit − g_naive‖/‖g_naive‖ over
all parameters for both losses at the first step; also both against a float64 ``matrix_exp``
reference, since the float32 naive one is itself off by ~1e-4 at D=768), ``loss_max_rel_diff`` (largest relative difference
of either loss over the identical steps), ``peak_rss_mb_*`` and ``sampler_s`` (stage 3's tail
sampling for ``sampler_classes`` classes at the paper's counts: 10 rounds × 3330 draws, keep 10).

Usage: ``python benchmarks/bench_cvpn.py [--quick]`` (``--quick``: D=256, C=20, 3 steps, 10 sampler
classes; < 90 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ncis_core.config import SampleConfig  # noqa: E402
from ncis_core.models.cvpn import CVPN  # noqa: E402
from ncis_core.outliers.tail import tail_sample  # noqa: E402
from ncis_core.stages.train_cvpn import train_step  # noqa: E402


class NaiveCVPN(CVPN):
    """The reference: each layer's ``matrix_exp`` (float32, autograd) recomputed on every call."""

    def orthogonal_matrices(self) -> torch.Tensor:
        return torch.stack([torch.linalg.matrix_exp(o.skew()) for o in self.orthogonals])


class Float64ReferenceCVPN(CVPN):
    """Accuracy reference only: ``matrix_exp`` in float64 (the float32 one is itself off by ~1e-4)."""

    def orthogonal_matrices(self) -> torch.Tensor:
        return torch.stack([torch.linalg.matrix_exp(o.skew().double()).float() for o in self.orthogonals])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _part(args) -> None:
    """One implementation in this process: first-step gradients, then ``steps`` training steps."""
    torch.manual_seed(0)
    cls = {"kit": CVPN, "naive": NaiveCVPN, "ref64": Float64ReferenceCVPN}[args.part]
    model = cls(args.dim, args.classes, expm="eigh")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.steps * args.batch, args.dim, generator=gen)
    labels = torch.randint(0, args.classes, (len(x),), generator=gen)
    k = int(0.35 * args.dim)
    xb, yb = x[:args.batch], labels[:args.batch]
    # first-step gradients of both losses at the initial weights
    z = model(xb, yb)
    model.zero_grad()
    z[:, -k:].pow(2).mean().backward()
    grads = {f"inv.{n}": p.grad.detach().clone() for n, p in model.named_parameters()}
    target = z.detach().clone()
    target[:, -k:] = 0
    model.zero_grad()
    (model.inverse(target, yb) - xb).pow(2).mean().backward()
    grads.update({f"rec.{n}": p.grad.detach().clone() for n, p in model.named_parameters()})
    torch.save(grads, args.out + ".grads.pt")
    if args.part == "ref64":
        return
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses, times = [], []
    for s in range(args.steps):
        index = slice(s * args.batch, (s + 1) * args.batch)
        start = time.perf_counter()
        losses.append(train_step(model, opt, x[index], labels[index], k))
        times.append(time.perf_counter() - start)
    steady = sorted(times[1:] or times)
    Path(args.out).write_text(json.dumps({
        "losses": losses, "ms_per_step": 1000 * steady[len(steady) // 2], "peak_rss_mb": _peak_rss_mb(),
        "parameters": sum(p.numel() for p in model.parameters())}))


def _sampler_seconds(classes: int, dim: int, per_class: int = 500) -> float:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(classes * per_class, dim, generator=gen, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    start = time.perf_counter()
    tail_sample(z, labels, classes, SampleConfig(), seed=0, progress=False)
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dim", type=int)
    parser.add_argument("--classes", type=int)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sampler-classes", type=int)
    parser.add_argument("--part", choices=["kit", "naive", "ref64"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="seconds: D=16, C=3, 1 step (the test suite runs it)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dim, args.classes, args.steps, args.sampler_classes, args.batch = 16, 3, 1, 2, 8
    args.dim = args.dim or (256 if args.quick else 768)
    args.classes = args.classes or (20 if args.quick else 100)
    args.steps = args.steps or (3 if args.quick else 10)
    args.sampler_classes = args.sampler_classes or (10 if args.quick else 100)
    if args.part:
        _part(args)
        return
    results, grads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for part in ("kit", "naive", "ref64"):
            out = os.path.join(tmp, part)
            subprocess.run([sys.executable, __file__, "--part", part, "--out", out, "--dim", str(args.dim),
                            "--classes", str(args.classes), "--batch", str(args.batch),
                            "--steps", str(args.steps)], check=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if part != "ref64":
                results[part] = json.loads(Path(out).read_text())
            grads[part] = torch.load(out + ".grads.pt", weights_only=True)
    def rel(a, b):
        diff = sum(float((a[n].double() - g.double()).pow(2).sum()) for n, g in b.items())
        return (diff / sum(float(g.double().pow(2).sum()) for g in b.values())) ** 0.5
    loss_diff = max(abs(a - b) / abs(b) for la, lb in zip(results["kit"]["losses"], results["naive"]["losses"])
                    for a, b in zip(la, lb))
    line = {
        "benchmark": "cvpn", "quick": args.quick, "device": "cpu", "threads": torch.get_num_threads(),
        "dim": args.dim, "classes": args.classes, "batch": args.batch, "steps": args.steps,
        "parameters": results["kit"]["parameters"],
        "ms_per_step_kit": round(results["kit"]["ms_per_step"], 1),
        "ms_per_step_naive": round(results["naive"]["ms_per_step"], 1),
        "speedup_vs_naive": round(results["naive"]["ms_per_step"] / results["kit"]["ms_per_step"], 2),
        "grad_rel_diff": rel(grads["kit"], grads["naive"]),
        "grad_rel_diff_kit_vs_float64_ref": rel(grads["kit"], grads["ref64"]),
        "grad_rel_diff_naive_vs_float64_ref": rel(grads["naive"], grads["ref64"]),
        "loss_max_rel_diff": loss_diff,
        "peak_rss_mb_kit": round(results["kit"]["peak_rss_mb"]),
        "peak_rss_mb_naive": round(results["naive"]["peak_rss_mb"]),
        "sampler_classes": args.sampler_classes,
        "sampler_s": round(_sampler_seconds(args.sampler_classes, args.dim), 2),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
