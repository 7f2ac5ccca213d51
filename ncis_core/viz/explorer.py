"""The class explorer ↔ ``07_explore.ipynb``: one class's UMAP map, its generated outliers with
their :data:`MEASURES` (nearest-ID distance, invariant energy), real ID images of the class, and
any outlier's nearest real ID images. Three layers: data (:class:`ExplorerData`, :func:`class_view`,
:func:`outlier_detail`: plain values), static twins that draw and save them under ``figures/``
(:func:`plot_class_view`, :func:`save_class_view` …), and the ipywidgets app
(:func:`class_explorer`), whose parts carry stable ``ncis-*`` CSS classes for the browser test.

Example (not run by the doctests: it needs a run folder where stages 1-4 ran, such as ``make
demo``'s ``outputs/demo``; ``tests/test_explorer.py`` builds a smoke one):
    >>> run = RunDir.open("outputs/demo")                          # doctest: +SKIP
    >>> data = ExplorerData.load(run)                              # doctest: +SKIP
    >>> view = class_view(data, class_index=0, method="ncis", n=8)  # doctest: +SKIP
    >>> fig, path = save_class_view(data, view)                   # doctest: +SKIP
    >>> class_explorer(run)  # in a notebook: the widget          # doctest: +SKIP
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from ..neighbours import nearest
from ..runs import RunDir

__all__ = [
    "ALL_CLASSES",
    "NEAREST_ID_DISTANCE",
    "INVARIANT_ENERGY",
    "MEASURES",
    "nearest_id_distance",
    "outlier_invariant_energy",
    "OutlierImage",
    "Neighbour",
    "ClassView",
    "OutlierDetail",
    "ExplorerData",
    "outlier_images",
    "classes_with_images",
    "id_examples",
    "nearest_id_images",
    "class_view",
    "outlier_detail",
    "map_position",
    "class_map",
    "plot_class_view",
    "plot_outlier_detail",
    "save_class_view",
    "save_outlier_detail",
    "png_bytes",
    "ClassExplorer",
    "class_explorer",
]

# The class selection that means "every class" (a dropdown value must not be None in ipywidgets).
ALL_CLASSES = -1

# The per-outlier quantities the explorer shows, by the one name the kit gives each → (the unit as a
# caption writes it, what it is).
NEAREST_ID_DISTANCE = "nearest-ID distance"
INVARIANT_ENERGY = "invariant energy"
MEASURES = {
    NEAREST_ID_DISTANCE: ("L2", "L2 distance in embedding units from the outlier's embedding to the nearest "
                                "stage-1 embedding of its class"),
    INVARIANT_ENERGY: ("mean z²", "mean of the squared last k outputs of the cVPN f(x; c) of its class "
                                  "(stage 2's invariant energy, as notebooks 02/03 plot it)"),
}


def _measure(name: str, value: float, sep: str = " ") -> str:
    """``"<name> <value> (<unit>)"``, e.g. ``"nearest-ID distance 0.412 (L2)"``; ``n/a`` for NaN."""
    return f"{name}{sep}{value:.3g} ({MEASURES[name][0]})" if value == value else f"{name}{sep}n/a"



def _label(method: str) -> str:
    """How the explorer writes a method (the registry's label)."""
    from .. import outliers as registry

    try:
        return registry.get_method(method).label
    except ValueError:
        return method


@dataclass(frozen=True)
class OutlierImage:
    """One generated outlier image and the embedding it was generated from.

    Args:
        method: the outlier method (a registered one that produces embeddings).
        file: the PNG, relative to the method's image folder (as in its ``index.json``).
        path: the PNG's absolute path.
        class_index: its class.
        class_name: the class's name.
        embedding_index: the row ``m`` of the method's ``C × M × D`` outlier embeddings of that class.
        nearest_id_distance: its embedding's :data:`NEAREST_ID_DISTANCE` (L2, embedding units).
        invariant_energy: its embedding's :data:`INVARIANT_ENERGY` (NaN: the run has no cVPN).
        seed: the seed of its starting noise (stage 4's plan).
    """

    method: str
    file: str
    path: Path
    class_index: int
    class_name: str
    embedding_index: int
    nearest_id_distance: float
    invariant_energy: float
    seed: int

    def caption(self, sep: str = "\n", inner: str = " ") -> str:
        """Both measures, name + value + unit, e.g. ``"nearest-ID distance 0.412 (L2)\\ninvariant
        energy 0.0312 (mean z²)"``; ``sep`` between the two, ``inner`` between name and value."""
        return sep.join([_measure(NEAREST_ID_DISTANCE, self.nearest_id_distance, inner),
                         _measure(INVARIANT_ENERGY, self.invariant_energy, inner)])

    @property
    def key(self) -> str:
        """A stable id: ``"<method>/<file>"``."""
        return f"{self.method}/{self.file}"


@dataclass(frozen=True)
class Neighbour:
    """A real ID training image near an outlier in embedding space.

    Args:
        image_id: its index in the ID training split (stage 1's ``image_ids``).
        class_index: its class.
        class_name: the class's name.
        distance: Euclidean distance between its embedding and the outlier's.
    """

    image_id: int
    class_index: int
    class_name: str
    distance: float


@dataclass
class ClassView:
    """What the explorer shows for one class (or all) and one method; :func:`class_view` makes it.

    Args:
        class_index: the class, or :data:`ALL_CLASSES`.
        title: the class name or ``"all classes"``.
        method: the outlier method of the gallery.
        rendered: False when the method's images have not been rendered (``outliers_linear/``
            before ``compare``): ``outliers`` is then empty and ``message`` says what to run.
        available: how many outlier images of the selection exist.
        outliers: the shown outlier images (largest nearest-ID distance first).
        outlier_pixels: their images, ``H × W × 3`` uint8.
        id_image_ids: indices in the ID training split of the real images shown.
        id_pixels: those images.
        message: a line for the reader (what is shown, or why nothing is).
    """

    class_index: int
    title: str
    method: str
    rendered: bool
    available: int
    outliers: list[OutlierImage] = field(default_factory=list)
    outlier_pixels: list[np.ndarray] = field(default_factory=list)
    id_image_ids: list[int] = field(default_factory=list)
    id_pixels: list[np.ndarray] = field(default_factory=list)
    message: str = ""


@dataclass
class OutlierDetail:
    """One outlier with its nearest real ID images; :func:`outlier_detail` makes it.

    Args:
        outlier: the outlier image.
        pixels: its image.
        neighbours: the nearest ID training images, nearest first.
        neighbour_pixels: their images.
    """

    outlier: OutlierImage
    pixels: np.ndarray
    neighbours: list[Neighbour]
    neighbour_pixels: list[np.ndarray]


class ExplorerData:
    """A run's artefacts as the explorer reads them, loaded once (use :meth:`load`).

    The other methods' outlier embeddings (for the measures and nearest neighbours of their
    images), stage 2's cVPN (for the invariant energy), each class's UMAP map and the ID training
    split (for pixels) are loaded on first use; each outlier's measures are computed once.

    Args:
        run: the run folder (stages 1, 3 and 4 done; stage 2 for the invariant energy).
        embeddings: stage 1's ``{"embeddings", "labels", "image_ids", "class_names", …}``.
        outliers: stage 3's file (:func:`ncis_core.embeddings_io.load_outliers`).
        index: stage 4's ``outliers/index.json``.

    Example (a run folder after stage 4; not run by the doctests, see the module's):
        >>> data = ExplorerData.load(RunDir.open("outputs/demo"))  # doctest: +SKIP
        >>> data.methods  # doctest: +SKIP
        ['ncis', 'linear']
    """

    def __init__(self, run: RunDir, embeddings: dict, outliers: dict, index: dict):
        self.run = run
        self.embeddings = embeddings
        self.class_names: list[str] = list(embeddings["class_names"])
        # Stage 4 renders whatever method stage 3 sampled (sample.method); every other method that
        # produces embeddings is offered beside it (its images once `compare` has rendered them).
        from .. import outliers as registry

        self.stage3_method: str = outliers.get("method") or run.cfg.sample.method
        self.methods: list[str] = [self.stage3_method] + [
            m for m in registry.method_names(registry.EMBEDDINGS) if m != self.stage3_method]
        self._outliers = {self.stage3_method: (outliers["outliers"], outliers["log_density"])}
        self._indexes: dict[str, dict | None] = {self.stage3_method: index}
        self._split = None
        self._cvpn, self.cvpn_note = None, None  # stage 2's result, or why there is none
        self._measures: dict[str, dict[tuple[int, int], tuple[float, float]]] = {}
        self._maps: dict[int, object] = {}  # class → UmapMap, or the TooFewEmbeddings it raised

    @classmethod
    def load(cls, run: RunDir) -> "ExplorerData":
        """Read stage 1's, 3's and 4's artefacts of ``run``.

        Raises:
            MissingArtefactError: a stage has not run; the message names it.
        """
        from ..embeddings_io import load_embeddings, load_outliers
        from ..stages.generate import load_index

        embeddings = load_embeddings(run.require("embeddings"))
        outliers = load_outliers(run.require("outlier_embeddings"))
        run.require("outliers_dir")
        return cls(run, embeddings, outliers, load_index(run.path("outliers_index")))

    def describe(self) -> str:
        """One line: classes, embeddings, and which methods' images are rendered."""
        rendered = {m: self.index(m) is not None for m in self.methods}
        images = ", ".join(f"{_label(m)}: {'yes' if r else 'not rendered yet'}"
                           for m, r in rendered.items())
        return (f"{len(self.class_names)} classes, {len(self.embeddings['labels'])} ID embeddings; "
                f"outlier images of {images}")

    # -- what a method has
    def image_folder(self, method: str) -> Path:
        """The folder of ``method``'s rendered outlier images."""
        if method == self.stage3_method:
            return self.run.path("outliers_dir")
        return self.run.path("method_outliers_dir", method=method)

    def index(self, method: str) -> dict | None:
        """``method``'s ``index.json`` (file → class, embedding index, seed); None when not rendered."""
        self._check_method(method)
        if method not in self._indexes:
            from ..stages.generate import load_index

            file = self.image_folder(method) / "index.json"
            self._indexes[method] = load_index(file) if file.exists() else None
        return self._indexes[method]

    def outlier_embeddings(self, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C × M × D outlier embeddings, C × M log-densities)`` of ``method``."""
        self._check_method(method)
        if method not in self._outliers:
            from ..stages.sample import method_outlier_embeddings  # as `compare` renders them

            result = method_outlier_embeddings(self.run.cfg, self.run, method, progress=False)
            self._outliers[method] = (result["outliers"], result["log_density"])
        return self._outliers[method]

    @property
    def cvpn(self):
        """Stage 2's :class:`~ncis_core.stages.train_cvpn.CVPNResult` (model, mean, ``k``), loaded on
        first use; None when the run has no current cVPN (:attr:`cvpn_note` then says why)."""
        if self._cvpn is None and self.cvpn_note is None:
            from ..runs import MissingArtefactError, StaleArtefactError
            from ..stages.train_cvpn import load_result

            try:
                self._cvpn = load_result(self.run.cfg, self.run)
            except (MissingArtefactError, StaleArtefactError) as error:
                self.cvpn_note = f"no {INVARIANT_ENERGY}: {error}"
        return self._cvpn

    def measures(self, method: str, classes=None, rows=None) -> tuple[np.ndarray, np.ndarray]:
        """``(nearest-ID distances, invariant energies)`` (float64) of ``method``'s outliers
        ``(classes[i], rows[i])`` (class, row ``m`` of its ``C × M × D`` embeddings); default every
        outlier, class-major (``C·M`` values). Each outlier's are computed once, vectorised over
        all the outliers asked for (:func:`nearest_id_distance`, :func:`outlier_invariant_energy`)."""
        points, _ = self.outlier_embeddings(method)
        if classes is None:
            classes, rows = np.divmod(np.arange(points.shape[0] * points.shape[1]), points.shape[1])
        pairs = [(int(c), int(m)) for c, m in zip(classes, rows)]
        known = self._measures.setdefault(method, {})
        todo = list(dict.fromkeys(p for p in pairs if p not in known))
        if todo:
            c, m = torch.tensor(todo).T
            query = points[c, m]
            distance = nearest_id_distance(query, c, self.embeddings["embeddings"], self.embeddings["labels"])
            cvpn = self.cvpn
            energy = outlier_invariant_energy(cvpn, query, c) if cvpn is not None else \
                torch.full((len(todo),), float("nan"), dtype=torch.float64)
            known.update(zip(todo, zip(distance.tolist(), energy.tolist())))
        values = np.array([known[p] for p in pairs], dtype=np.float64).reshape(-1, 2)
        return values[:, 0], values[:, 1]

    def class_umap(self, class_index: int = ALL_CLASSES):
        """The UMAP map of a class (or of all) with every method's outliers
        (:func:`ncis_core.viz.maps.umap_map`, cached in the run folder and here).

        Raises:
            TooFewEmbeddings: too few embeddings for a map.
        """
        if class_index not in self._maps:
            from .maps import TooFewEmbeddings, umap_map

            classes = None if class_index == ALL_CLASSES else [class_index]
            try:
                self._maps[class_index] = umap_map(self.run, classes=classes, methods=tuple(self.methods),
                                                   progress=False)
            except TooFewEmbeddings as error:
                self._maps[class_index] = error
        if isinstance(self._maps[class_index], Exception):
            raise self._maps[class_index]
        return self._maps[class_index]

    @property
    def id_split(self):
        """The ID training split (stage 1's ``image_ids`` index it)."""
        if self._split is None:
            from ..data import get_split

            self._split = get_split(self.run.cfg, "id-train")
        return self._split

    def id_image(self, image_id: int) -> np.ndarray:
        """Image ``image_id`` of the ID training split, ``H × W × 3`` uint8."""
        return self.id_split.dataset[int(image_id)][0]

    def _check_method(self, method: str) -> None:
        if method not in self.methods:
            raise ValueError(f"unknown outlier method {method!r}; this run has {', '.join(self.methods)}")


# ----------------------------------------------------------------------------- data functions
def nearest_id_distance(points: torch.Tensor, point_labels: torch.Tensor, embeddings: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """:data:`NEAREST_ID_DISTANCE` of each point: the L2 distance (float64, embedding units) from
    ``points[i]`` to the nearest row of ``embeddings`` whose label is ``point_labels[i]``; NaN for a
    class without embeddings. Exact (from the differences, not ``‖a‖² + ‖b‖² − 2ab``), per class.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [10.0, 10.0]])
        >>> nearest_id_distance(torch.tensor([[0.0, 4.0]]), torch.tensor([0]), x, torch.tensor([0, 0, 1]))
        tensor([4.], dtype=torch.float64)
    """
    points, point_labels = torch.as_tensor(points), torch.as_tensor(point_labels)
    out = torch.full((len(points),), float("nan"), dtype=torch.float64)
    for c in torch.unique(point_labels).tolist():
        which = (point_labels == c).nonzero().flatten()
        rows = embeddings[labels == c].to(torch.float64)
        if len(rows):
            out[which] = nearest(points[which].to(torch.float64), rows, 1, exact=True)[0][:, 0].sqrt()
    return out


def outlier_invariant_energy(cvpn, points: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """:data:`INVARIANT_ENERGY` of each point under its class: stage 2's
    :func:`~ncis_core.models.cvpn.invariant_energy` of ``points − mean`` (as notebooks 02 and 03
    compute it), float64 on the CPU. ``cvpn``: a :class:`~ncis_core.stages.train_cvpn.CVPNResult`."""
    from ..models.cvpn import invariant_energy

    device = next(cvpn.model.parameters()).device
    x = torch.as_tensor(points).to(device=device, dtype=cvpn.mean.dtype) - cvpn.mean.to(device)
    return invariant_energy(cvpn.model, x, torch.as_tensor(point_labels).to(device), cvpn.k).to(torch.float64)


def outlier_images(data: ExplorerData, class_index: int = ALL_CLASSES, method: str | None = None
                   ) -> list[OutlierImage]:
    """The outlier images of a class (or of all), largest :data:`NEAREST_ID_DISTANCE` first (ties:
    index order), each with both measures (:meth:`ExplorerData.measures`).

    Empty when the method's images have not been rendered (see :meth:`ExplorerData.index`).
    ``method``: default stage 3's.
    """
    method = method or data.stage3_method
    index = data.index(method)
    if index is None:
        return []
    entries = [e for e in index["images"] if class_index == ALL_CLASSES or int(e["class"]) == class_index]
    classes = [int(e["class"]) for e in entries]
    rows = [int(e["embedding_index"]) for e in entries]
    distance, energy = data.measures(method, classes, rows)
    folder = data.image_folder(method)
    found = [OutlierImage(method, e["file"], folder / e["file"], c, data.class_names[c], m, float(d), float(u),
                          int(e["seed"]))
             for e, c, m, d, u in zip(entries, classes, rows, distance, energy)]
    # Python's sort is stable: equal distances (one embedding per batch) keep the index's order
    return sorted(found, key=lambda o: -o.nearest_id_distance if o.nearest_id_distance == o.nearest_id_distance
                  else float("inf"))


def classes_with_images(data: ExplorerData, method: str | None = None) -> list[int]:
    """The classes that have rendered outlier images of ``method``, ascending."""
    return sorted({o.class_index for o in outlier_images(data, ALL_CLASSES, method)})


def id_examples(data: ExplorerData, class_index: int = ALL_CLASSES, n: int = 8, seed: int = 0) -> list[int]:
    """Up to ``n`` seeded random ID training images of a class (or of all): their indices in the split,
    ascending. Drawn as :func:`ncis_core.viz.data.split_examples` draws its rows."""
    labels = np.asarray(data.id_split.dataset.labels)
    candidates = np.arange(len(labels)) if class_index == ALL_CLASSES else np.flatnonzero(labels == class_index)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(candidates, size=min(n, len(candidates)), replace=False) if len(candidates) else []
    return sorted(int(i) for i in chosen)


def nearest_id_images(data: ExplorerData, outlier: OutlierImage, k: int = 5) -> list[Neighbour]:
    """The ``k`` ID training images whose stage-1 embeddings lie nearest (Euclidean, every class) to
    the outlier's embedding, nearest first (ties: embedding-file order)."""
    outliers, _ = data.outlier_embeddings(outlier.method)
    query = outliers[outlier.class_index, outlier.embedding_index].to(torch.float64)[None]
    rows = data.embeddings["embeddings"]
    # by slices of rows, so that a 50 000 × 768 table never needs a second full-size (float64) copy;
    # each slice's k nearest, then the k nearest of those (ties: the lower index, as in one search)
    starts = range(0, len(rows), 8192) if k > 0 else range(0)
    found = [nearest(query, rows[i:i + 8192].to(torch.float64), min(k, len(rows) - i), exact=True)
             for i in starts]
    squared = torch.cat([d[0] for d, _ in found] + [torch.zeros(0, dtype=torch.float64)])
    index = torch.cat([j[0] + i for i, (_, j) in zip(starts, found)] + [torch.zeros(0, dtype=torch.long)])
    order = torch.sort(squared, stable=True).indices[:k]
    labels, ids = data.embeddings["labels"], data.embeddings["image_ids"]
    return [Neighbour(int(ids[i]), int(labels[i]), data.class_names[int(labels[i])], float(squared[o].sqrt()))
            for o, i in zip(order.tolist(), index[order].tolist())]


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def class_view(data: ExplorerData, class_index: int = ALL_CLASSES, method: str | None = None, n: int = 8,
               id_images: int = 8, seed: int = 0) -> ClassView:
    """The ``n`` outlier images of a class (or all) furthest from their class (largest
    :data:`NEAREST_ID_DISTANCE`) and ``id_images`` real ones."""
    method = method or data.stage3_method
    title = "all classes" if class_index == ALL_CLASSES else data.class_names[class_index]
    rendered = data.index(method) is not None
    found = outlier_images(data, class_index, method)
    shown = found[:max(n, 0)]
    ids = id_examples(data, class_index, id_images, seed)
    label = _label(method)
    if not rendered:
        message = (f"no {label} images yet: run `python -m ncis_core compare --preset "
                   f"{data.run.cfg.run.preset} --out {data.run.root} --methods {method}` "
                   f"(the map shows its outlier embeddings already)")
    elif not found:
        message = f"{title}: no {label} outlier images (stage 4 rendered {len(data.index(method)['images'])} " \
                  f"images, for the classes its generate.num_batches reached)"
    else:
        message = (f"{title}: {len(shown)} of {len(found)} {label} outlier images, largest "
                   f"{NEAREST_ID_DISTANCE} first ({shown[0].nearest_id_distance:.3g} … "
                   f"{shown[-1].nearest_id_distance:.3g} {MEASURES[NEAREST_ID_DISTANCE][0]}). "
                   f"{NEAREST_ID_DISTANCE} = {MEASURES[NEAREST_ID_DISTANCE][1]}; "
                   f"{INVARIANT_ENERGY} = {MEASURES[INVARIANT_ENERGY][1]}")
        if data.cvpn_note:
            message += f" ({data.cvpn_note})"
    return ClassView(class_index, title, method, rendered, len(found), shown,
                     [_read_png(o.path) for o in shown], ids, [data.id_image(i) for i in ids], message)


def outlier_detail(data: ExplorerData, outlier: OutlierImage, k: int = 5) -> OutlierDetail:
    """One outlier, its image and its ``k`` nearest ID training images with theirs."""
    neighbours = nearest_id_images(data, outlier, k)
    return OutlierDetail(outlier, _read_png(outlier.path), neighbours,
                         [data.id_image(nb.image_id) for nb in neighbours])


def map_position(umap, outlier: OutlierImage) -> np.ndarray | None:
    """Where ``outlier`` lies on the UMAP map ``umap`` (``[x, y]``); None when its method or class is
    not on the map. ``umap.outlier_coords[method]`` holds the method's ``M`` outliers of each mapped
    class, class by class in row order."""
    if outlier.method not in umap.methods:
        return None
    of_class = np.flatnonzero(np.asarray(umap.outlier_labels[outlier.method]) == outlier.class_index)
    if outlier.embedding_index >= len(of_class):
        return None
    return np.asarray(umap.outlier_coords[outlier.method][of_class[outlier.embedding_index]], dtype=np.float64)


def class_map(data: ExplorerData, class_index: int = ALL_CLASSES, ax=None, selected: OutlierImage | None = None):
    """The UMAP map of a class (or of all) with every method's outlier embeddings
    (:meth:`ExplorerData.class_umap`); ``selected`` is ringed on it (artist gid ``ncis-selected``).
    Returns the figure. A class with too few embeddings for a map gets a note in its place."""
    from .maps import TooFewEmbeddings, plot_umap_map

    title = "all classes" if class_index == ALL_CLASSES else data.class_names[class_index]
    try:
        umap = data.class_umap(class_index)
    except TooFewEmbeddings as error:
        fig = ax.figure if ax is not None else plt.subplots(figsize=(5, 4))[0]
        ax = ax if ax is not None else fig.axes[0]
        ax.set_xticks([]), ax.set_yticks([])
        ax.text(0.5, 0.5, f"no map: {error}", ha="center", va="center", wrap=True, fontsize=8,
                transform=ax.transAxes)
        return fig
    fig = plot_umap_map(umap, ax=ax, title=f"UMAP: {title}")
    where = map_position(umap, selected) if selected is not None else None
    if where is not None:
        ax = ax if ax is not None else fig.axes[0]
        ax.scatter([where[0]], [where[1]], s=260, facecolors="none", edgecolors="black", linewidths=2.2,
                   zorder=6, gid="ncis-selected")
        ax.annotate("selected", where, xytext=(9, 9), textcoords="offset points", fontsize=8, zorder=6,
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "black", "alpha": 0.8})
    return fig


# ----------------------------------------------------------------------------- static twins
def _image_axes(ax, image: np.ndarray | None, title: str = "", fontsize: int = 7) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if image is not None:
        ax.imshow(image, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=fontsize)


def plot_class_view(data: ExplorerData, view: ClassView, with_map: bool = True):
    """The widget's class view as one figure: the UMAP map (left, its first outlier ringed), the
    outlier gallery with each image's nearest-ID distance and invariant energy, and a row of real
    ID images of the class."""
    columns = max(len(view.outlier_pixels), len(view.id_pixels), 1)
    cell, map_width = 1.25, (4.6 if with_map else 0.0)
    fig = plt.figure(figsize=(map_width + cell * columns + 0.8, 4.8))
    outer = fig.add_gridspec(1, 2, width_ratios=[map_width, cell * columns + 0.8] if with_map else [1e-3, 1],
                             wspace=0.12)
    map_ax = fig.add_subplot(outer[0, 0]) if with_map else None
    grid = outer[0, 1].subgridspec(2, columns, hspace=0.75, wspace=0.15)
    label = _label(view.method)
    for j in range(columns):
        ax = fig.add_subplot(grid[0, j])
        if j < len(view.outliers):
            o = view.outliers[j]
            caption = o.caption(inner="\n") + ("" if view.class_index != ALL_CLASSES else f"\n{o.class_name}")
            _image_axes(ax, view.outlier_pixels[j], caption, fontsize=6)
        else:
            _image_axes(ax, None)
            if j == 0:  # nothing to show: say why where the images would be
                ax.text(0, 0.5, view.message, fontsize=7, wrap=True, va="center", transform=ax.transAxes)
        if j == 0:
            ax.set_ylabel(f"{label}\noutliers", fontsize=8)
        ax = fig.add_subplot(grid[1, j])
        _image_axes(ax, view.id_pixels[j] if j < len(view.id_pixels) else None)
        if j == 0:
            ax.set_ylabel("real ID\n(train)", fontsize=8)
    if with_map:  # drawn last: into a figure whose layout is set (the map would re-lay a lone axes)
        class_map(data, view.class_index, ax=map_ax, selected=view.outliers[0] if view.outliers else None)
    fig.suptitle(f"{view.title}: {label} outliers (largest {NEAREST_ID_DISTANCE} first) and real images",
                 fontsize=10)
    return fig


def plot_outlier_detail(detail: OutlierDetail):
    """The widget's detail view as one figure: the outlier large, then its nearest ID images with
    their class and distance."""
    k = max(len(detail.neighbours), 1)
    fig = plt.figure(figsize=(2.6 + 1.3 * k, 2.8))
    grid = fig.add_gridspec(1, 2 + k, wspace=0.2)
    o = detail.outlier
    _image_axes(fig.add_subplot(grid[0, :2]), detail.pixels,
                f"{_label(o.method)} outlier {o.file}, class {o.class_name}\n{o.caption()}", fontsize=8)
    for j, (nb, pixels) in enumerate(zip(detail.neighbours, detail.neighbour_pixels)):
        _image_axes(fig.add_subplot(grid[0, 2 + j]), pixels,
                    f"#{j + 1} {nb.class_name}\ndistance {nb.distance:.3g} (L2)", fontsize=7)
    fig.suptitle("an outlier and its nearest real ID training images (stage-1 embedding space)",
                 fontsize=9, y=1.08)
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^\w-]+", "_", text.strip().lower()).strip("_") or "x"


def save_class_view(data: ExplorerData, view: ClassView, with_map: bool = True):
    """Draw :func:`plot_class_view` and save it as ``figures/07_<class>_<method>.png``;
    returns ``(figure, path)``."""
    from .common import save_figure

    fig = plot_class_view(data, view, with_map)
    return fig, save_figure(fig, data.run, f"07_{_slug(view.title)}_{view.method}.png")


def save_outlier_detail(data: ExplorerData, detail: OutlierDetail):
    """Draw :func:`plot_outlier_detail` and save it as ``figures/07_detail_<method>_<file>.png``;
    returns ``(figure, path)``."""
    from .common import save_figure

    fig = plot_outlier_detail(detail)
    stem = _slug(Path(detail.outlier.file).with_suffix("").as_posix())
    return fig, save_figure(fig, data.run, f"07_detail_{detail.outlier.method}_{stem}.png")


# ----------------------------------------------------------------------------- the widget
def png_bytes(image: np.ndarray, size: int | None = None) -> bytes:
    """``image`` (``H × W × 3`` uint8) as PNG bytes, enlarged with nearest-neighbour pixels to at
    least ``size`` on its shorter side (32 × 32 images stay crisp when shown large)."""
    pil = Image.fromarray(np.asarray(image))
    if size and min(pil.size) < size:
        factor = -(-size // min(pil.size))
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG")
    return buffer.getvalue()


def _figure_png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)  # else the notebook's inline backend would show it a second time
    return buffer.getvalue()


def _image_widget(pixels: np.ndarray, size: int, css: str) -> widgets.Image:
    image = widgets.Image(value=png_bytes(pixels, size), format="png",
                          layout=widgets.Layout(width=f"{size}px", height=f"{size}px"))
    image.add_class(css)
    return image


def _tagged(widget, *css: str):
    for name in css:
        widget.add_class(name)
    return widget


class ClassExplorer(widgets.VBox):
    """The explorer app, an ``ipywidgets.VBox``; make it with :func:`class_explorer`.

    Its parts are attributes (``class_dropdown``, ``method_toggle``, ``count_slider``, ``map_image``,
    ``gallery``, ``id_gallery``, ``detail``, ``status``); ``view`` and ``detail_view`` hold the
    data shown (:class:`ClassView`, :class:`OutlierDetail`), so a test can drive the app in Python.
    """

    def __init__(self, data: ExplorerData, class_index: int, method: str, gallery_size: int,
                 id_images: int, neighbours: int, thumbnail: int, seed: int):
        self.data, self.neighbours, self.id_images = data, neighbours, id_images
        self.thumbnail, self.seed = thumbnail, seed
        self._map_png: dict[tuple, bytes] = {}  # a UMAP map per (class, selected outlier), drawn once
        self._items: dict[str, widgets.Widget] = {}  # outlier key → its gallery item
        self.view: ClassView | None = None
        self.detail_view: OutlierDetail | None = None
        options = [(name, i) for i, name in enumerate(data.class_names)] + [("all classes", ALL_CLASSES)]
        self.class_dropdown = _tagged(widgets.Dropdown(options=options, value=class_index,
                                                       description="class"), "ncis-class-dropdown")
        self.method_toggle = _tagged(widgets.ToggleButtons(
            options=[(self._method_label(m), m) for m in data.methods], value=method,
            description="outliers"), "ncis-method")
        most = max([len(outlier_images(data, ALL_CLASSES, m)) for m in data.methods
                    if data.index(m) is not None] + [1])
        self.count_slider = _tagged(widgets.IntSlider(
            value=max(1, min(gallery_size, most)), min=1, max=max(most, gallery_size),
            description="outliers shown", continuous_update=False,
            style={"description_width": "initial"}), "ncis-count")
        self.save_button = _tagged(widgets.Button(description="save figures",
                                                  tooltip="write the static twins under figures/"),
                                   "ncis-save")
        self.saved = _tagged(widgets.HTML(), "ncis-saved")
        self.status = _tagged(widgets.HTML(), "ncis-status")
        # the map at its own size and aspect ratio (a flex row would stretch it to the gallery's height)
        self.map_image = _tagged(widgets.Image(format="png", layout=widgets.Layout(
            width="auto", height="auto", align_self="flex-start", object_fit="contain", flex="0 0 auto")),
            "ncis-map")
        self.gallery = _tagged(widgets.HBox(layout=widgets.Layout(flex_flow="row wrap")), "ncis-gallery")
        self.id_gallery = _tagged(widgets.HBox(layout=widgets.Layout(flex_flow="row wrap")), "ncis-id-gallery")
        self.detail = _tagged(widgets.VBox(), "ncis-detail")
        pictures = widgets.VBox([
            widgets.HTML(f"<b>generated outliers</b>, largest {NEAREST_ID_DISTANCE} first (click one for "
                         f"its nearest real images; the map rings it)"), self.gallery,
            widgets.HTML("<b>real ID training images of the class</b>"), self.id_gallery])
        super().__init__([
            widgets.HBox([self.class_dropdown, self.method_toggle]),
            widgets.HBox([self.count_slider, self.save_button, self.saved]),
            self.status, widgets.HBox([self.map_image, pictures]),
            widgets.HTML("<b>selected outlier</b>"), self.detail])
        self.add_class("ncis-explorer")
        for control in (self.class_dropdown, self.method_toggle, self.count_slider):
            control.observe(lambda _: self.refresh(), names="value")
        self.save_button.on_click(lambda _: self.save())
        self.refresh()

    def _method_label(self, method: str) -> str:
        label = _label(method)
        return label if self.data.index(method) is not None else f"{label} (map only: run compare)"

    def refresh(self) -> None:
        """Redraw the map, the galleries and the detail for the current selection."""
        class_index = self.class_dropdown.value
        self.view = class_view(self.data, class_index, self.method_toggle.value, self.count_slider.value,
                               self.id_images, self.seed)
        self.status.value = self.view.message
        items, self._items = [], {}
        size = f"{self.thumbnail}px"
        for outlier, pixels in zip(self.view.outliers, self.view.outlier_pixels):
            # a transparent button over the image (one grid cell): a click on the image selects it;
            # its tooltip names the file (a browser test reads it)
            image = _image_widget(pixels, self.thumbnail, "ncis-outlier-image")
            image.layout.grid_area = "cell"
            button = _tagged(widgets.Button(description="", tooltip=f"{outlier.key} ({outlier.class_name})",
                                            layout=widgets.Layout(width=size, height=size, margin="0",
                                                                  padding="0", grid_area="cell")),
                             "ncis-outlier-select")
            button.style.button_color = "transparent"
            button.on_click(lambda _, chosen=outlier: self.select(chosen))
            cell = widgets.GridBox([image, button], layout=widgets.Layout(
                grid_template_areas='"cell"', width=size, height=size))
            caption = _tagged(widgets.HTML(outlier.caption(sep="<br>"), layout=widgets.Layout(width=size)),
                              "ncis-outlier-caption")
            items.append(_tagged(widgets.VBox([cell, caption], layout=widgets.Layout(
                margin="2px", padding="2px", border="2px solid transparent")), "ncis-outlier"))
            self._items[outlier.key] = items[-1]
        if not self.view.rendered:
            items = [_tagged(widgets.HTML(self.view.message), "ncis-gallery-empty")]
        self.gallery.children = items
        self.id_gallery.children = [_image_widget(p, self.thumbnail, "ncis-id-image") for p in self.view.id_pixels]
        self.select(self.view.outliers[0] if self.view.outliers else None)

    def select(self, outlier: OutlierImage | None) -> None:
        """Show ``outlier`` large beside its nearest ID training images, frame it in the gallery and
        ring it on the map (None: clear)."""
        self._draw_map(outlier)
        for key, item in self._items.items():
            chosen = outlier is not None and key == outlier.key
            item.layout.border = "2px solid #d62728" if chosen else "2px solid transparent"
            (item.add_class if chosen else item.remove_class)("ncis-selected")
        if outlier is None:
            self.detail_view = None
            self.detail.children = [widgets.HTML("no outlier selected")]
            return
        self.detail_view = outlier_detail(self.data, outlier, self.neighbours)
        neighbours = [widgets.VBox([_image_widget(pixels, self.thumbnail, "ncis-neighbour-image"),
                                    widgets.HTML(f"#{j + 1} {nb.class_name}<br>distance {nb.distance:.3g} (L2)")])
                      for j, (nb, pixels) in enumerate(zip(self.detail_view.neighbours,
                                                           self.detail_view.neighbour_pixels))]
        self.detail.children = [
            widgets.HTML(f"{_label(outlier.method)} outlier "
                         f"<code>{outlier.file}</code> of class <b>{outlier.class_name}</b>: "
                         f"{outlier.caption(sep=', ')}; its {len(neighbours)} nearest real ID training images "
                         f"in embedding space (any class):"),
            widgets.HBox([_image_widget(self.detail_view.pixels, 3 * self.thumbnail, "ncis-detail-image"),
                          widgets.HBox(neighbours, layout=widgets.Layout(flex_flow="row wrap"))])]

    def _draw_map(self, outlier: OutlierImage | None) -> None:
        key = (self.class_dropdown.value, None if outlier is None else outlier.key)
        if key not in self._map_png:
            self._map_png[key] = _figure_png(class_map(self.data, key[0], selected=outlier))
        self.map_image.value = self._map_png[key]

    def save(self) -> list[Path]:
        """Write the static twins of what is shown now under ``figures/``; returns their paths."""
        figures = [save_class_view(self.data, self.view)]
        if self.detail_view is not None:
            figures.append(save_outlier_detail(self.data, self.detail_view))
        for fig, _ in figures:
            plt.close(fig)
        self.saved.value = "saved " + ", ".join(f"<code>figures/{p.name}</code>" for _, p in figures)
        return [p for _, p in figures]


def class_explorer(run: RunDir | ExplorerData, class_index: int = 0, method: str | None = None,
                   gallery_size: int = 8, id_images: int = 8, neighbours: int = 5, thumbnail: int = 96,
                   seed: int = 0):
    """The explorer app for a run with stages 1–4 done (display it in a notebook).

    Args:
        run: the run folder, or its :class:`ExplorerData` already loaded.
        class_index: the class selected first (:data:`ALL_CLASSES` for all).
        method: the gallery's method first (default: stage 3's method).
        gallery_size: how many outlier images to show first (the slider's start).
        id_images: real ID images of the class shown beside them.
        neighbours: nearest ID images shown for the selected outlier.
        thumbnail: gallery image size in pixels (small images are enlarged, pixels kept sharp).
        seed: which real ID images are drawn.

    Returns:
        A :class:`ClassExplorer` (an ``ipywidgets.VBox``).
    """
    data = run if isinstance(run, ExplorerData) else ExplorerData.load(run)
    return ClassExplorer(data, class_index, method or data.stage3_method, gallery_size, id_images, neighbours,
                         thumbnail, seed)
