"""UMAP maps of the embedding manifolds: the stage-1 embeddings of some or all classes, with the
outlier embeddings of every registered method that produces them placed on the same map.
:func:`umap_map` fits umap-learn's ``UMAP`` (seeded, on scikit-learn's exact kNN graph) and places each
method's outliers with UMAP's ``transform``; maps are cached in the run folder;
:func:`plot_umap_map` and :func:`plot_umap_per_class` draw them (notebooks 01, 03, 07).

Example (not run by the doctests: it needs a run folder with stages 1 and 3; ``tests/test_umap.py``
maps a smoke run):
    >>> run = RunDir.open("outputs/demo")                     # doctest: +SKIP
    >>> m = umap_map(run, classes=[3])                        # doctest: +SKIP
    >>> save_figure(plot_umap_map(m), run, "03_umap_c3.png")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

from ..embeddings_io import load_embeddings
from ..errors import TooLittleData
from ..progress import bar_options
from ..runs import (MissingArtefactError, RunDir, StaleArtefactError, atomic_path, cache_key, cache_path,
                    content_hash, method_inputs, sampled_by_stage3)
from ..outliers import base as registry
from ..embeddings_io import load_outliers

__all__ = ["map_methods", "MIN_POINTS", "TooFewEmbeddings", "UmapMap", "knn_graph", "umap_map", "umap_maps_per_class",
           "umap_cache_dir", "plot_umap_map", "plot_umap_per_class", "compile_umap_kernels"]

log = logging.getLogger(__name__)

MIN_POINTS = 5               # fewer ID embeddings than this make no map (UMAP needs n_neighbors ≥ 2)
_CACHE_FORMAT = "ncis-umap/2"  # bump when what is cached, or how it is computed, changes
_CACHE_VERSIONS = ("umap-learn", "scikit-learn", "numba")  # packages whose versions key a cached map


# what gives a map more points, named in every "too few" message
_MORE_POINTS = "embed more images per class: embed.max_per_class (data.max_per_class caps the split)"


class TooFewEmbeddings(TooLittleData):
    """Fewer than :data:`MIN_POINTS` embeddings for a map (a class may simply be small): callers
    drawing many maps leave that one out; a notebook shows the message instead of the map
    (:func:`~ncis_core.viz.common.too_little_data_note`)."""


@dataclass
class UmapMap:
    """A 2-D UMAP map of ID embeddings with outlier embeddings placed on it.

    Attributes:
        coords: ``N × 2`` map coordinates of the ID embeddings.
        labels: ``N`` class index of each ID embedding.
        image_ids: ``N`` index of each embedding's image in the ID training split.
        class_names: the names of all the run's classes (``labels`` index them).
        classes: the classes on the map.
        methods: the outlier methods on the map (requested ones whose embeddings exist).
        outlier_coords: method → ``K × 2`` coordinates of its outliers (UMAP ``transform``).
        outlier_labels: method → ``K`` class each outlier was sampled for.
        outlier_log_density: method → ``K`` log-density under the Gaussian it was drawn from.
        params: seed, UMAP settings (``n_neighbors`` as used, after clipping to the point count),
            package versions and the cache key.
        from_cache: the map was read from the run folder's cache.
        timings: seconds per step of this call (``load`` for a cache hit; else ``outliers``,
            ``import_umap`` (first map in a process), ``knn``, ``fit``, ``transform``, ``save``).

    Example (a ``smoke`` run folder after stage 3; not run by the doctests, see the module's):
        >>> m = umap_map(run)                                # doctest: +SKIP
        >>> m.coords.shape, m.outlier_coords["ncis"].shape  # doctest: +SKIP
        ((48, 2), (24, 2))
    """

    coords: np.ndarray
    labels: np.ndarray
    image_ids: np.ndarray
    class_names: list[str]
    classes: list[int]
    methods: tuple[str, ...]
    outlier_coords: dict[str, np.ndarray]
    outlier_labels: dict[str, np.ndarray]
    outlier_log_density: dict[str, np.ndarray]
    params: dict
    from_cache: bool = False
    timings: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- kNN and UMAP
def knn_graph(x: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray, object]:
    """Exact euclidean ``n_neighbors``-nearest neighbours of every row of ``x``, itself included
    (:func:`ncis_core.neighbours.nearest` in float64; a row's distance to itself is 0).

    Returns:
        ``(indices, distances, neighbours)``: ``N × n_neighbors`` int32 and float32 (UMAP's
        ``precomputed_knn`` layout, nearest first) and the fitted ``sklearn`` ``NearestNeighbors``.
    """
    from sklearn.neighbors import NearestNeighbors

    neighbours = NearestNeighbors(n_neighbors=n_neighbors, metric="euclidean").fit(x)
    distances, indices = neighbours.kneighbors(x)
    return indices.astype(np.int32), distances.astype(np.float32), neighbours


class _ExactSearchIndex:
    """The part of pynndescent's index that UMAP's ``transform`` uses (``query``; ``_angular_trees``
    only picks NN-descent's search epsilon), answered exactly by scikit-learn's neighbours."""

    _angular_trees = False

    def __init__(self, neighbours):
        self._neighbours = neighbours

    def query(self, x, k, epsilon=None):
        distances, indices = self._neighbours.kneighbors(x, n_neighbors=k)
        # the dtypes of the fit's graph, so numba reuses the kernels it compiled for the fit
        return indices.astype(np.int32), distances.astype(np.float32)


_kernels_cached = False


def _cache_umap_kernels() -> None:
    """Let numba keep umap-learn's parallel kernels on disk (umap compiles them without
    ``cache=True``, in every new process); harmless where no cache folder is writable."""
    global _kernels_cached
    if _kernels_cached:
        return
    import umap.layouts
    import umap.umap_

    for kernel in (getattr(umap.umap_, "smooth_knn_dist", None),
                   getattr(umap.umap_, "compute_membership_strengths", None),
                   getattr(umap.layouts, "_nb_optimize_layout_euclidean_single_epoch", None)):
        try:
            kernel.enable_caching()
        except (AttributeError, RuntimeError):  # not a numba dispatcher / no writable cache folder
            log.debug("numba disk cache unavailable for %r", kernel)
    _kernels_cached = True


def _fit_and_place(x: np.ndarray, outliers: dict[str, np.ndarray], n_neighbors: int, min_dist: float,
                   n_epochs: int | None, seed: int, bar) -> tuple[np.ndarray, dict, dict]:
    """Fit UMAP on ``x`` with the exact kNN graph, then ``transform`` each method's outliers."""
    t = time.perf_counter()
    import umap  # not at module level: reopening a cached map needs neither umap nor numba

    _cache_umap_kernels()
    timings = {"import_umap": time.perf_counter() - t}
    t = time.perf_counter()
    indices, distances, neighbours = knn_graph(x, n_neighbors)
    timings["knn"] = time.perf_counter() - t
    bar.update()
    mapper = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, n_epochs=n_epochs, random_state=seed,
                       transform_seed=seed, n_jobs=1,
                       precomputed_knn=(indices, distances, _ExactSearchIndex(neighbours)))
    with warnings.catch_warnings():
        # UMAP warns that transform is unavailable unless the index is pynndescent's; ours serves it
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
        # separate class manifolds are expected; UMAP lays out each connected component apart
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        t = time.perf_counter()
        coords = mapper.fit_transform(x)
        timings["fit"] = time.perf_counter() - t
        bar.update()
        placed = {}
        t = time.perf_counter()
        for method, points in outliers.items():
            bar.set_postfix_str(f"transform {method}")
            # one method at a time: a method's coordinates do not depend on which others are mapped
            placed[method] = mapper.transform(points) if len(points) else np.zeros((0, 2), np.float32)
            bar.update()
        timings["transform"] = time.perf_counter() - t
    return coords.astype(np.float32), placed, timings


def compile_umap_kernels(points: int = 300, dim: int = 16) -> float:
    """Compile the numba kernels a map runs — the fit on a precomputed kNN graph and the transform,
    with the dtypes :func:`umap_map` passes (float32 rows) — into numba's disk cache, on random
    points; later processes load them instead of compiling. What ``make setup`` runs once (numba
    compiles per argument type, not per shape, so a small map compiles what a large one needs).
    Returns the seconds it took."""
    started = time.perf_counter()
    x = np.random.default_rng(0).standard_normal((points, dim)).astype(np.float32)
    with tqdm(disable=True) as bar:
        _fit_and_place(x, {"random": x[:10] + np.float32(0.1)}, n_neighbors=15, min_dist=0.1, n_epochs=None,
                       seed=0, bar=bar)
    return time.perf_counter() - started


# ----------------------------------------------------------------------------- the map of a run
def umap_cache_dir(run: RunDir) -> Path:
    """``RUN/cache/umap``: the folder of cached maps (safe to delete)."""
    return run.path("cache_dir") / "umap"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def map_methods() -> tuple[str, ...]:
    """The methods a map can show: every registered method that produces outlier embeddings."""
    return tuple(registry.method_names(registry.EMBEDDINGS))


def _mappable(run: RunDir, methods: Sequence[str]) -> list[str]:
    """The requested methods whose outlier embeddings the run has or can compute (stage 3's method
    once stage 3 is done; any other whose inputs exist, e.g. a cVPN for ``ncis``); the rest are
    skipped with a warning that says what is missing."""
    known = map_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown outlier methods {unknown}; use some of {', '.join(known)}")
    found = []
    for method in dict.fromkeys(methods):
        needed = ("outlier_embeddings",) if sampled_by_stage3(run.cfg, method) else \
            method_inputs(run.cfg, method)[0]
        missing = [a for a in needed if not run.path(a).exists()]
        if missing:
            makers = ", ".join(f"stage {run.producer(a).number} ({run.producer(a).name})" for a in missing)
            warnings.warn(f"no {method} outlier embeddings to map ({', '.join(missing)} missing: run {makers} "
                          f"first); the map shows the others", stacklevel=3)
        else:
            found.append(method)
    return found


def _save(path: Path, m: UmapMap) -> None:
    arrays = {"coords": m.coords, "labels": m.labels, "image_ids": m.image_ids}
    for method in m.methods:
        arrays[f"{method}.coords"] = m.outlier_coords[method]
        arrays[f"{method}.labels"] = m.outlier_labels[method]
        arrays[f"{method}.log_density"] = m.outlier_log_density[method]
    arrays["meta"] = np.array(json.dumps({"class_names": m.class_names, "classes": m.classes,
                                          "methods": list(m.methods), "params": m.params}))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)


def _load(path: Path) -> UmapMap:
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        methods = tuple(meta["methods"])
        parts = ("coords", "labels", "log_density")
        per_method = {part: {m: f[f"{m}.{part}"] for m in methods} for part in parts}
        return UmapMap(f["coords"], f["labels"], f["image_ids"], meta["class_names"], meta["classes"], methods,
                       per_method["coords"], per_method["labels"], per_method["log_density"], meta["params"],
                       from_cache=True)


def umap_map(run: RunDir, classes: Sequence[int] | None = None, methods: Sequence[str] | None = None,
             seed: int | None = None, n_neighbors: int = 15, min_dist: float = 0.1,
             n_epochs: int | None = None, cache: bool = True, progress: bool = True) -> UmapMap:
    """The UMAP map of a run's ID embeddings (all classes, or ``classes``) with outliers on it.

    UMAP is fitted on every stage-1 embedding of the chosen classes (training and held-out rows);
    each method's outlier embeddings of those classes are placed with ``transform``: stage 3's
    ``outlier_embeddings.safetensors`` for stage 3's method, the others' computed on the same rows
    (:func:`~ncis_core.stages.sample.method_outlier_file`, as ``compare`` renders them). A method
    whose inputs are not in the run yet, or that refuses this few rows, is skipped with a warning.

    Args:
        run: the run folder (stage 1 done; stage 3 for NCIS's outliers).
        classes: class indices to map; None: all.
        methods: outlier methods to place, from :func:`map_methods`; None: all of them.
        seed: UMAP's ``random_state`` (and ``transform_seed``); None: the run's seed.
        n_neighbors, min_dist, n_epochs: UMAP's settings (``n_epochs`` None: UMAP's default);
            ``n_neighbors`` is clipped to one less than the number of embeddings.
        cache: read and write ``RUN/cache/umap/<key>.npz``.
        progress: progress bars.

    Raises:
        MissingArtefactError: no embeddings (run stage 1 first).
        ValueError: unknown classes or methods; :class:`TooFewEmbeddings` (a ValueError): fewer
            than :data:`MIN_POINTS` embeddings.
    """
    started = time.perf_counter()
    cfg = run.cfg
    seed = cfg.run.seed if seed is None else int(seed)
    # Cheap checks first, so that reopening a cached map stays instant; the run folder's provenance
    # checks (``run.require``, which hashes config sections) run only when the map is computed. A
    # cached map is keyed by the files' contents, so it shows exactly the files that were checked.
    embeddings_file = run.path("embeddings")
    if not embeddings_file.exists():
        run.require("embeddings")  # raises MissingArtefactError naming stage 1
    if methods is None:  # stage 3's method first, then the registry's order
        methods = sorted(map_methods(), key=lambda m: m != cfg.sample.method)
    found = _mappable(run, methods)
    data = load_embeddings(embeddings_file)
    names, num_classes = data["class_names"], data["num_classes"]
    chosen = list(range(num_classes)) if classes is None else sorted({int(c) for c in classes})
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad or not chosen:
        raise ValueError(f"classes {bad or chosen} are not class indices of this run "
                         f"(0 … {num_classes - 1})")
    labels_all = data["labels"].numpy()
    rows = np.flatnonzero(np.isin(labels_all, chosen))
    what = "all classes" if classes is None else ", ".join(names[c] for c in chosen)
    if len(rows) < MIN_POINTS:
        raise TooFewEmbeddings(f"{len(rows)} embedding(s) of {what}: a UMAP map needs at least {MIN_POINTS} "
                               f"({_MORE_POINTS})")
    k = min(n_neighbors, len(rows) - 1)
    params = {"seed": seed, "n_neighbors": k, "min_dist": min_dist, "n_epochs": n_epochs,
              "umap-learn": _version("umap-learn"), "scikit-learn": _version("scikit-learn")}

    run.require("embeddings")  # stale embeddings (edited after stage 1 wrote them) raise here
    from ..stages.sample import method_outlier_file

    files = {}
    for method in list(found):
        try:
            files[method] = method_outlier_file(cfg, run, method, progress)
        # unfinished, from other inputs, or a method that cannot run on this few rows (knn_boundary's k)
        except (MissingArtefactError, StaleArtefactError, TooLittleData) as error:
            warnings.warn(f"no {method} outlier embeddings to map ({error}); the map shows the others",
                          stacklevel=2)
            found.remove(method)
    inputs = {"embeddings": content_hash(embeddings_file), **{m: content_hash(f) for m, f in files.items()}}
    config = {"format": _CACHE_FORMAT, "classes": chosen, "methods": found, "params": params}
    params["key"] = cache_key(inputs, config, versions=_CACHE_VERSIONS)
    path = cache_path(run.root, "umap", params["key"], ".npz") if cache else None
    if path is not None and path.exists():
        try:
            m = _load(path)
            m.timings = {"load": time.perf_counter() - started}
            return m
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            log.warning("unreadable UMAP cache %s (%s); recomputing", path, error)

    t = time.perf_counter()
    outliers, outlier_labels, log_density = {}, {}, {}
    for method in found:
        result = load_outliers(files[method])
        points, density = result["outliers"].numpy(), result["log_density"].numpy()
        per_class = points.shape[1]
        outliers[method] = points[chosen].reshape(-1, points.shape[-1]).astype(np.float32)
        outlier_labels[method] = np.repeat(np.asarray(chosen, dtype=np.int64), per_class)
        log_density[method] = density[chosen].reshape(-1).astype(np.float64)
    timings = {"outliers": time.perf_counter() - t}
    bar = tqdm(total=2 + len(found), desc=f"UMAP map of {len(rows)} embeddings", unit="step",
               **bar_options(progress))
    coords, placed, fit_timings = _fit_and_place(data["embeddings"].numpy()[rows], outliers, k, min_dist,
                                                 n_epochs, seed, bar)
    bar.close()
    timings.update(fit_timings)
    m = UmapMap(coords, labels_all[rows].astype(np.int64), data["image_ids"].numpy()[rows].astype(np.int64),
                list(names), chosen, tuple(found), {k_: v.astype(np.float32) for k_, v in placed.items()},
                outlier_labels, log_density, params, timings=timings)
    if path is not None:
        t = time.perf_counter()
        _save(path, m)
        timings["save"] = time.perf_counter() - t
    return m


def umap_maps_per_class(run: RunDir, classes: Sequence[int], **kwargs) -> list[UmapMap]:
    """One :func:`umap_map` per class of ``classes`` (``kwargs`` passed on); a class with fewer
    than :data:`MIN_POINTS` embeddings is left out with a warning.

    Raises:
        TooFewEmbeddings: every class was left out (the message gives their counts).
    """
    maps, left_out = [], []
    for c in classes:
        try:
            maps.append(umap_map(run, classes=[c], **kwargs))
        except TooFewEmbeddings as error:
            warnings.warn(f"class {c} left out: {error}", stacklevel=2)
            left_out.append(c)
    if left_out and not maps:
        counts = np.bincount(load_embeddings(run.path("embeddings"))["labels"].numpy(),
                             minlength=max(left_out) + 1)
        raise TooFewEmbeddings(f"no class has the {MIN_POINTS} embeddings a UMAP map needs (classes "
                               f"{', '.join(f'{c}: {counts[c]}' for c in left_out)}; {_MORE_POINTS})")
    return maps


# ----------------------------------------------------------------------------- pictures
_MARKERS = ("x", "+", "1", "*", "^", "s", "D", "v")
_SINGLE_CLASS_COLOURS = ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink")
_ID_COLOUR = "tab:blue"


def _method_style(method: str) -> tuple[str, str, str]:
    """Marker, legend name and single-class colour of a method: fixed by its place in the registry,
    so a method looks the same on every map."""
    names = list(map_methods())
    i = names.index(method) if method in names else len(names)
    label = registry.get_method(method).label if method in names else method
    return _MARKERS[i % len(_MARKERS)], f"{label} outliers", _SINGLE_CLASS_COLOURS[i % len(_SINGLE_CLASS_COLOURS)]


def _class_colours(num_classes: int):
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo")
    return [cmap(i if num_classes <= 20 else i / max(num_classes - 1, 1)) for i in range(num_classes)]


def plot_umap_map(m: UmapMap, ax=None, title: str | None = None, legend: bool = True):
    """The map: ID embeddings as dots coloured by class, each method's outliers with its own marker
    (NCIS ×, linear +) in the colour of the class they were sampled for. A one-class map uses
    fixed colours instead (class blue, NCIS red, linear orange). Returns the figure.

    Args:
        m: a :class:`UmapMap`.
        ax: axes to draw into; None: a new figure.
        title: None: the classes and the UMAP settings.
        legend: draw the legend (class names up to 20 classes, and the methods).
    """
    fig = ax.figure if ax is not None else plt.subplots(figsize=(6.8, 5.6))[0]
    ax = ax if ax is not None else fig.axes[0]
    single = len(m.classes) == 1
    colours = _class_colours(len(m.class_names))
    for c in m.classes:
        here = m.labels == c
        colour = _ID_COLOUR if single else colours[c]
        # on a many-class map UMAP places a class's outliers onto its own compact cluster: the ID
        # dots go underneath, faint, and the outliers' line markers on top, darker (drawn the other
        # way round, the dots hid every marker of the demo's "all classes" map)
        ax.scatter(m.coords[here, 0], m.coords[here, 1], s=6 if len(m.coords) > 2000 else 14, color=colour,
                   alpha=0.55 if single else 0.35, linewidths=0, label=f"{m.class_names[c]} ({int(here.sum())})",
                   zorder=1)
    for method in m.methods:
        marker, name, single_colour = _method_style(method)
        points, labels = m.outlier_coords[method], m.outlier_labels[method]
        if single:
            ax.scatter(points[:, 0], points[:, 1], s=36, marker=marker, color=single_colour,
                       linewidths=1.2, label=f"{name} ({len(points)})", zorder=3)
            continue
        darker = [tuple(0.6 * v for v in colours[c][:3]) for c in labels]
        ax.scatter(points[:, 0], points[:, 1], s=20, marker=marker, color=darker, linewidths=0.9, alpha=0.85,
                   zorder=3)
        ax.scatter([], [], s=36, marker=marker, color="k", label=f"{name} ({len(points)})")  # legend entry
    if title is None:
        what = m.class_names[m.classes[0]] if single else f"{len(m.classes)} classes"
        title = f"UMAP of the embeddings: {what}"
    p = m.params
    ax.set_title(f"{title}\n(n_neighbors={p['n_neighbors']}, min_dist={p['min_dist']:g}, seed={p['seed']})",
                 fontsize=9)
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_xlabel("UMAP 1", fontsize=8), ax.set_ylabel("UMAP 2", fontsize=8)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        if not single and len(m.classes) > 20:  # class names would bury the map: methods only
            keep = [i for i, lab in enumerate(labels) if "outliers" in lab]
            handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
        ax.legend(handles, labels, fontsize=7, markerscale=1.5, loc="best",
                  ncol=2 if len(labels) > 12 else 1)
    if ax is fig.axes[0] and len(fig.axes) == 1:
        fig.tight_layout()
    return fig


def plot_umap_per_class(maps: Sequence[UmapMap], cols: int = 4):
    """A grid of one-class maps (from :func:`umap_maps_per_class`), one legend on the first panel."""
    if not maps:
        raise TooFewEmbeddings(f"no maps to draw: every class has fewer than {MIN_POINTS} embeddings "
                               f"({_MORE_POINTS})")
    cols = min(cols, len(maps))
    rows = -(-len(maps) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for i, (ax, m) in enumerate(zip(axes.flat, maps)):
        plot_umap_map(m, ax=ax, title=m.class_names[m.classes[0]], legend=i == 0)
    for ax in list(axes.flat)[len(maps):]:
        ax.axis("off")
    fig.suptitle("UMAP of each class's embeddings with its outliers", fontsize=10)
    fig.tight_layout()
    return fig
