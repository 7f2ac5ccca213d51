"""Benchmark of the time to the first UMAP map in a fresh Python process; prints one JSON line.

Data: synthetic embeddings shaped like a run's (``classes × per_class`` rows of width ``dim``,
low-rank class manifolds plus noise, :func:`~ncis_core.embeddings_io.synthetic_embeddings`) in a
temporary run folder, and the linear baseline's outliers of every class
(:func:`~ncis_core.stages.sample.method_outlier_embeddings` of `linear`, ``rounds × keep`` per class) to place
on the map. Every measurement is its own process (``subprocess``), so imports and numba
compilation count as they do in a new notebook kernel; all of them share one private numba cache
folder, warmed first by a bare ``import umap`` (pynndescent compiles at import: a one-time cost per
machine, reported as ``setup_import_umap_s``).

* ``plain``: ``umap.UMAP(random_state=0).fit(x)`` then ``transform(outliers)`` (pynndescent builds
  the kNN graph and the search index); ``plain_warm``: the same again, numba's disk cache now warm.
* ``kit_cold``: :func:`ncis_core.viz.maps.umap_map` (scikit-learn kNN as ``precomputed_knn``),
  the first ever on this cache folder; ``kit_warm``: again in a new process, map cache removed
  (the usual case: a new kernel on a machine that drew a map before).
* ``reopen``: a new process that finds the map in the run folder's cache.

Each entry: ``wall_s`` (the whole process, interpreter start included, as the parent saw it) and the
breakdown measured inside (``import_s``: numpy + umap, or the kit's modules; ``import_umap_s``: umap
inside ``umap_map``, absent when the cached map needs none; ``knn_s``, ``fit_s``, ``transform_s``;
``outliers_s``: the linear baseline's sampling; ``total_s``: from the first line of the process to the
map).
``trustworthiness``: sklearn's of the ID map at 15 neighbours (1 = local neighbourhoods kept).

Usage: ``python benchmarks/bench_umap.py [--classes 10 --per-class 500 --dim 768] [--n-epochs 200]
[--skip-plain]``.
On a shared machine, run it when it is quiet; ``load_avg`` says how busy it was.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # before any heavy import: a part's total counts its imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _plain(folder: Path) -> dict:
    """umap-learn as it comes: pynndescent kNN, then transform."""
    t = time.perf_counter()
    import numpy as np
    import umap
    out = {"import_s": time.perf_counter() - t}
    x, outliers = np.load(folder / "x.npy"), np.load(folder / "outliers.npy")
    mapper = umap.UMAP(random_state=0)
    t = time.perf_counter()
    coords = mapper.fit_transform(x)
    out["fit_s"] = time.perf_counter() - t  # kNN (pynndescent) included
    t = time.perf_counter()
    placed = mapper.transform(outliers)
    out["transform_s"] = time.perf_counter() - t
    out["total_s"] = time.perf_counter() - _START
    np.save(folder / "coords.npy", coords)
    out["outliers_finite"] = bool(np.isfinite(placed).all())
    return out


def _kit(folder: Path, n_epochs: int | None) -> dict:
    """The kit's map of the run folder (methods: the linear baseline, recomputed)."""
    t = time.perf_counter()
    from ncis_core.runs import RunDir
    from ncis_core.viz import maps
    out = {"import_s": time.perf_counter() - t}  # the kit (torch, matplotlib); umap comes in umap_map
    import numpy as np

    m = maps.umap_map(RunDir.open(folder / "run"), methods=("linear",), n_epochs=n_epochs, progress=False)
    out.update({f"{k}_s": v for k, v in m.timings.items()})
    out["total_s"] = time.perf_counter() - _START
    out["from_cache"] = m.from_cache
    out["outliers_finite"] = bool(np.isfinite(m.outlier_coords["linear"]).all())
    np.save(folder / "coords.npy", m.coords)
    return out


def _setup(folder: Path, classes: int, per_class: int, dim: int, rounds: int, keep: int) -> int:
    import numpy as np

    from ncis_core.config import load_config
    from ncis_core.embeddings_io import save_embeddings, synthetic_embeddings
    from ncis_core.runs import RunDir
    from ncis_core.stages.sample import method_outlier_embeddings

    cfg = load_config("smoke", [f"sample.rounds={rounds}", f"sample.keep_per_round={keep}",
                                f"sample.draws_per_round={max(10 * keep, 200)}"], out=str(folder / "run"))
    run = RunDir.create(cfg)
    data = synthetic_embeddings(classes, per_class, dim, seed=0, rank=8, noise=0.05)
    with run.stage("embed"):
        save_embeddings(run.path("embeddings"), **data)
    outliers = method_outlier_embeddings(cfg, run, "linear", progress=False)["outliers"]
    np.save(folder / "x.npy", data["embeddings"].numpy())
    np.save(folder / "outliers.npy", outliers.reshape(-1, dim).numpy())
    return outliers.shape[0] * outliers.shape[1]


def _trustworthiness(folder: Path) -> float:
    import numpy as np
    from sklearn.manifold import trustworthiness

    x, coords = np.load(folder / "x.npy"), np.load(folder / "coords.npy")
    return round(float(trustworthiness(x, coords, n_neighbors=15)), 4)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", type=int, default=10)
    parser.add_argument("--n-epochs", type=int,
                        help="the kit's UMAP epochs (default: UMAP's, 500 up to 10k points)")
    parser.add_argument("--skip-plain", action="store_true", help="only the kit's maps (minutes faster)")
    parser.add_argument("--part", choices=["plain", "kit"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds: 3 classes × 40 points of width 16, 20 epochs, no plain UMAP (the test suite)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.classes, args.per_class, args.dim, args.n_epochs, args.skip_plain = 3, 40, 16, 20, True
    if args.part:
        result = _plain(Path(args.dir)) if args.part == "plain" else _kit(Path(args.dir), args.n_epochs)
        Path(args.out).write_text(json.dumps(result))
        return

    line = {"benchmark": "umap", "points": args.classes * args.per_class, "dim": args.dim,
            "kit_n_epochs": args.n_epochs,
            "cpu_count": os.cpu_count(), "load_avg_before": [round(v, 2) for v in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "TQDM_DISABLE": "1", "NUMBA_CACHE_DIR": str(folder / "numba"),
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        line["outliers"] = _setup(folder, args.classes, args.per_class, args.dim, args.rounds, args.keep)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import umap"], check=True, env=env)
        line["setup_import_umap_s"] = round(time.perf_counter() - t, 2)

        def part(name: str, which: str) -> None:
            out = folder / f"{name}.json"
            t = time.perf_counter()
            epochs = ["--n-epochs", str(args.n_epochs)] if args.n_epochs else []
            subprocess.run([sys.executable, __file__, "--part", which, "--dir", str(folder),
                            "--out", str(out), *epochs], check=True, env=env)
            result = {"wall_s": time.perf_counter() - t, **json.loads(out.read_text())}
            line[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}

        part("kit_cold", "kit")
        line["kit_cold"]["trustworthiness"] = _trustworthiness(folder)
        shutil.rmtree(folder / "run" / "cache")
        part("kit_warm", "kit")
        part("reopen", "kit")
        if not args.skip_plain:
            part("plain", "plain")
            line["plain"]["trustworthiness"] = _trustworthiness(folder)
            part("plain_warm", "plain")
    line["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(line))


if __name__ == "__main__":
    main()
