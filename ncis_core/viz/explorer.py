"""The class explorer: one class's UMAP map, its generated outliers with their energies, real ID
images of the class, and any outlier's nearest real ID images — as an ipywidgets app and as static
figures ↔ ``07_explore.ipynb``.

Three layers, so that each can be tested alone:

* data: :class:`ExplorerData` reads a run's artefacts once (stage 1's embeddings, stage 3's outlier
  embeddings and log-densities, stage 4's ``outliers/index.json``, and every other outlier method's
  ``outliers_<method>/`` once ``python -m ncis_core compare`` has rendered it); :func:`outlier_images`,
  :func:`id_examples`, :func:`nearest_id_images`, :func:`class_view` and :func:`outlier_detail`
  return plain values;
* static twins: :func:`plot_class_view` and :func:`plot_outlier_detail` draw those values into a
  matplotlib figure; :func:`save_class_view` and :func:`save_outlier_detail` also write it under the
  run's ``figures/`` (widget state does not survive a papermill run; these files do);
* the widget: :func:`class_explorer` wires a class dropdown, a method toggle and a count slider to
  the data functions, and shows the selected outlier beside its nearest ID images.

An outlier's *energy* is ``−log p`` of its embedding under the class Gaussian it was drawn from
(stage 3's ``log_density``; for NCIS that Gaussian lives in the cVPN's latent space, for the linear
baseline in embedding space): the larger, the further out in the tail. A method that draws from no
Gaussian (``knn_boundary``) has no energy (NaN); its images keep their index order.

Widgets carry stable CSS classes (``ncis-explorer``, ``ncis-class-dropdown``, ``ncis-method``,
``ncis-count``, ``ncis-save``, ``ncis-status``, ``ncis-map``, ``ncis-gallery``, ``ncis-outlier``,
``ncis-outlier-image``, ``ncis-outlier-select`` (its tooltip names the file), ``ncis-gallery-empty``,
``ncis-id-gallery``, ``ncis-id-image``, ``ncis-detail``, ``ncis-detail-image``,
``ncis-neighbour-image``) so that a browser test can find them.

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

from ..runs import RunDir

__all__ = [
    "ALL_CLASSES",
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
        energy: ``−log_density[class, m]``: how far out in the class's tail the embedding was drawn.
        seed: the seed of its starting noise (stage 4's plan).
    """

    method: str
    file: str
    path: Path
    class_index: int
    class_name: str
    embedding_index: int
    energy: float
    seed: int

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
        outliers: the shown outlier images (highest energy first).
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

    The linear baseline's outlier embeddings (for energies and nearest neighbours of its images)
    and the ID training split (for pixels) are loaded on first use.

    Args:
        run: the run folder (stages 1, 3 and 4 done).
        embeddings: stage 1's ``{"embeddings", "labels", "image_ids", "class_names", …}``.
        outliers: stage 3's file (:func:`ncis_core.outliers.files.load_outliers`).
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

    @classmethod
    def load(cls, run: RunDir) -> "ExplorerData":
        """Read stage 1's, 3's and 4's artefacts of ``run``.

        Raises:
            MissingArtefactError: a stage has not run; the message names it.
        """
        from ..embeddings_io import load_embeddings
        from ..stages.generate import load_index
        from ..outliers.files import load_outliers

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
            from ..outliers.sources import method_outlier_embeddings  # as `compare` renders them

            result = method_outlier_embeddings(self.run.cfg, self.run, method, progress=False)
            self._outliers[method] = (result["outliers"], result["log_density"])
        return self._outliers[method]

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
def outlier_images(data: ExplorerData, class_index: int = ALL_CLASSES, method: str | None = None
                   ) -> list[OutlierImage]:
    """The outlier images of a class (or of all), highest energy first (ties: index order).

    Empty when the method's images have not been rendered (see :meth:`ExplorerData.index`).
    ``method``: default stage 3's.
    """
    method = method or data.stage3_method
    index = data.index(method)
    if index is None:
        return []
    _, log_density = data.outlier_embeddings(method)
    folder = data.image_folder(method)
    found = []
    for entry in index["images"]:
        c, m = int(entry["class"]), int(entry["embedding_index"])
        if class_index != ALL_CLASSES and c != class_index:
            continue
        found.append(OutlierImage(method, entry["file"], folder / entry["file"], c, data.class_names[c], m,
                                  -float(log_density[c, m]), int(entry["seed"])))
    # Python's sort is stable, so equal energies (one embedding per batch) keep the index's order;
    # a method without energies (NaN) keeps the index's order
    return sorted(found, key=lambda o: -o.energy if o.energy == o.energy else 0.0)


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
    query = outliers[outlier.class_index, outlier.embedding_index].to(torch.float64)
    rows = data.embeddings["embeddings"]
    # chunked, so that a 50 000 × 768 table never needs a second full-size copy
    distance = torch.cat([torch.linalg.vector_norm(rows[i:i + 8192].to(torch.float64) - query, dim=1)
                          for i in range(0, len(rows), 8192)]) if len(rows) else torch.zeros(0)
    order = torch.argsort(distance, stable=True)[:k]
    labels, ids = data.embeddings["labels"], data.embeddings["image_ids"]
    return [Neighbour(int(ids[i]), int(labels[i]), data.class_names[int(labels[i])], float(distance[i]))
            for i in order]


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def class_view(data: ExplorerData, class_index: int = ALL_CLASSES, method: str | None = None, n: int = 8,
               id_images: int = 8, seed: int = 0) -> ClassView:
    """The ``n`` highest-energy outlier images of a class (or all) and ``id_images`` real ones."""
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
        message = (f"{title}: {len(shown)} of {len(found)} {label} outlier images, highest energy first "
                   f"(energy = −log p of the embedding under its class Gaussian: "
                   f"{shown[-1].energy:.1f} … {shown[0].energy:.1f})")
    return ClassView(class_index, title, method, rendered, len(found), shown,
                     [_read_png(o.path) for o in shown], ids, [data.id_image(i) for i in ids], message)


def outlier_detail(data: ExplorerData, outlier: OutlierImage, k: int = 5) -> OutlierDetail:
    """One outlier, its image and its ``k`` nearest ID training images with theirs."""
    neighbours = nearest_id_images(data, outlier, k)
    return OutlierDetail(outlier, _read_png(outlier.path), neighbours,
                         [data.id_image(nb.image_id) for nb in neighbours])


def class_map(data: ExplorerData, class_index: int = ALL_CLASSES, ax=None):
    """The UMAP map of a class (or of all) with every method's outlier embeddings
    (:func:`ncis_core.viz.maps.umap_map`, cached in the run folder); returns the figure. A class
    with too few embeddings for a map gets a note in its place."""
    from .maps import TooFewEmbeddings, plot_umap_map, umap_map

    classes = None if class_index == ALL_CLASSES else [class_index]
    title = "all classes" if class_index == ALL_CLASSES else data.class_names[class_index]
    try:
        umap = umap_map(data.run, classes=classes, methods=tuple(data.methods), progress=False)
    except TooFewEmbeddings as error:
        fig = ax.figure if ax is not None else plt.subplots(figsize=(5, 4))[0]
        ax = ax if ax is not None else fig.axes[0]
        ax.set_xticks([]), ax.set_yticks([])
        ax.text(0.5, 0.5, f"no map: {error}", ha="center", va="center", wrap=True, fontsize=8,
                transform=ax.transAxes)
        return fig
    return plot_umap_map(umap, ax=ax, title=f"UMAP: {title}")


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
    """The widget's class view as one figure: the UMAP map (left), the outlier gallery with each
    image's energy, and a row of real ID images of the class."""
    columns = max(len(view.outlier_pixels), len(view.id_pixels), 1)
    cell, map_width = 1.1, (4.4 if with_map else 0.0)
    fig = plt.figure(figsize=(map_width + cell * columns + 0.8, 4.4))
    outer = fig.add_gridspec(1, 2, width_ratios=[map_width, cell * columns + 0.8] if with_map else [1e-3, 1],
                             wspace=0.12)
    map_ax = fig.add_subplot(outer[0, 0]) if with_map else None
    grid = outer[0, 1].subgridspec(2, columns, hspace=0.45, wspace=0.12)
    label = _label(view.method)
    for j in range(columns):
        ax = fig.add_subplot(grid[0, j])
        if j < len(view.outliers):
            o = view.outliers[j]
            caption = f"E={o.energy:.1f}" + ("" if view.class_index != ALL_CLASSES else f"\n{o.class_name}")
            _image_axes(ax, view.outlier_pixels[j], caption)
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
        class_map(data, view.class_index, ax=map_ax)
    fig.suptitle(f"{view.title}: {label} outliers (highest energy first) and real images", fontsize=10)
    return fig


def plot_outlier_detail(detail: OutlierDetail):
    """The widget's detail view as one figure: the outlier large, then its nearest ID images with
    their class and distance."""
    k = max(len(detail.neighbours), 1)
    fig = plt.figure(figsize=(2.6 + 1.3 * k, 2.8))
    grid = fig.add_gridspec(1, 2 + k, wspace=0.2)
    o = detail.outlier
    _image_axes(fig.add_subplot(grid[0, :2]), detail.pixels,
                f"{_label(o.method)} outlier {o.file}\n"
                f"class {o.class_name}, E={o.energy:.1f}", fontsize=8)
    for j, (nb, pixels) in enumerate(zip(detail.neighbours, detail.neighbour_pixels)):
        _image_axes(fig.add_subplot(grid[0, 2 + j]), pixels,
                    f"#{j + 1} {nb.class_name}\nd={nb.distance:.2f}", fontsize=7)
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
        self._map_png: dict[int, bytes] = {}  # a UMAP map per class, drawn once
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
        self.map_image = _tagged(widgets.Image(format="png"), "ncis-map")
        self.gallery = _tagged(widgets.HBox(layout=widgets.Layout(flex_flow="row wrap")), "ncis-gallery")
        self.id_gallery = _tagged(widgets.HBox(layout=widgets.Layout(flex_flow="row wrap")), "ncis-id-gallery")
        self.detail = _tagged(widgets.VBox(), "ncis-detail")
        pictures = widgets.VBox([
            widgets.HTML("<b>generated outliers</b>, highest energy first (click one for its nearest "
                         "real images)"), self.gallery,
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
        if class_index not in self._map_png:
            self._map_png[class_index] = _figure_png(class_map(self.data, class_index))
        self.map_image.value = self._map_png[class_index]
        self.view = class_view(self.data, class_index, self.method_toggle.value, self.count_slider.value,
                               self.id_images, self.seed)
        self.status.value = self.view.message
        items = []
        for outlier, pixels in zip(self.view.outliers, self.view.outlier_pixels):
            # the energy is the caption; the button's tooltip names the file (a browser test reads it)
            button = _tagged(widgets.Button(description=f"E={outlier.energy:.1f}",
                                            tooltip=f"{outlier.key} ({outlier.class_name})",
                                            layout=widgets.Layout(width=f"{self.thumbnail}px")),
                             "ncis-outlier-select")
            button.on_click(lambda _, chosen=outlier: self.select(chosen))
            items.append(_tagged(widgets.VBox([_image_widget(pixels, self.thumbnail, "ncis-outlier-image"),
                                               button]), "ncis-outlier"))
        if not self.view.rendered:
            items = [_tagged(widgets.HTML(self.view.message), "ncis-gallery-empty")]
        self.gallery.children = items
        self.id_gallery.children = [_image_widget(p, self.thumbnail, "ncis-id-image") for p in self.view.id_pixels]
        self.select(self.view.outliers[0] if self.view.outliers else None)

    def select(self, outlier: OutlierImage | None) -> None:
        """Show ``outlier`` large beside its nearest ID training images (None: clear)."""
        if outlier is None:
            self.detail_view = None
            self.detail.children = [widgets.HTML("no outlier selected")]
            return
        self.detail_view = outlier_detail(self.data, outlier, self.neighbours)
        neighbours = [widgets.VBox([_image_widget(pixels, self.thumbnail, "ncis-neighbour-image"),
                                    widgets.HTML(f"#{j + 1} {nb.class_name}<br>d={nb.distance:.2f}")])
                      for j, (nb, pixels) in enumerate(zip(self.detail_view.neighbours,
                                                           self.detail_view.neighbour_pixels))]
        self.detail.children = [
            widgets.HTML(f"{_label(outlier.method)} outlier "
                         f"<code>{outlier.file}</code> of class <b>{outlier.class_name}</b>, energy "
                         f"{outlier.energy:.2f}; its {len(neighbours)} nearest real ID training images in "
                         f"embedding space:"),
            widgets.HBox([_image_widget(self.detail_view.pixels, 3 * self.thumbnail, "ncis-detail-image"),
                          widgets.HBox(neighbours, layout=widgets.Layout(flex_flow="row wrap"))])]

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
