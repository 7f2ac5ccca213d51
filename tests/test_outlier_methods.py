"""Outlier methods are plug-ins: a toy method registered inside a test runs through compare, the
UMAP map and the explorer with no edit to the package; the registry and its checks; the method
names live in their own modules."""

import ast
import re
from pathlib import Path

import pytest
import torch
from diffusion_fixtures import copy_run

import ncis_core
from ncis_core import outliers
from ncis_core.config import ConfigError, load_config
from ncis_core.outliers import EMBEDDINGS, OutlierMethod, register_method, unregister_method


def _stretched_means(inputs, params, progress):
    """A toy sampler: per class, the class mean pushed out 1.5× and 2× from the origin."""
    means = torch.stack([inputs.embeddings[inputs.labels == c].mean(0) for c in range(inputs.num_classes)])
    return {"outliers": torch.stack([1.5 * means, 2.0 * means], dim=1)}


@pytest.fixture
def toy_method():
    register_method(OutlierMethod(name="stretched", label="stretched means", produces=EMBEDDINGS,
                                  needs=("embeddings",), sample=_stretched_means,
                                  summary="class means pushed away from the origin (a test's toy)"))
    yield "stretched"
    unregister_method("stretched")


def test_a_registered_method_is_a_valid_config_value_and_unregistered_is_refused(toy_method):
    cfg = load_config("smoke", ["sample.method=stretched", "classifier.outliers=stretched"])
    assert cfg.sample.method == "stretched"
    unregister_method(toy_method)
    samplers = ", ".join(outliers.method_names(EMBEDDINGS))
    with pytest.raises(ConfigError, match=re.escape(f"sample.method = 'stretched' is not one of {samplers}")):
        load_config("smoke", ["sample.method=stretched"])
    register_method(OutlierMethod(name="stretched", label="x", produces=EMBEDDINGS, sample=_stretched_means,
                                  summary=""))  # the fixture unregisters it again


def test_registry_refuses_duplicates_and_inconsistent_methods():
    with pytest.raises(ValueError, match="already registered"):
        register_method(OutlierMethod(name="ncis", label="", summary="", produces="nothing"))
    with pytest.raises(ValueError, match="already registered"):
        register_method(OutlierMethod(name="folder", label="", summary="", produces="nothing"))
    with pytest.raises(ValueError, match="a sample function exactly when it produces embeddings"):
        OutlierMethod(name="x", label="", summary="", produces=EMBEDDINGS)
    with pytest.raises(ValueError, match="unknown needs"):
        OutlierMethod(name="x", label="", summary="", produces="nothing", needs=("gpu",))
    with pytest.raises(ValueError, match=re.escape(f"unknown outlier method 'vos'; registered: "
                                                   f"{', '.join(outliers.method_names())}")):
        outliers.get_method("vos")


def test_a_method_defined_in_a_test_runs_through_compare_the_map_and_the_explorer(
        toy_method, smoke_run_1_to_4, tmp_path):
    from ncis_core.compare import compare
    from ncis_core.runs import RunDir
    from ncis_core.viz import maps
    from ncis_core.viz.explorer import ExplorerData, class_explorer, outlier_images

    run_root = copy_run(smoke_run_1_to_4, tmp_path / "run")
    compare("smoke", run_root, ["none", toy_method], [0],
            ["classifier.epochs=1", "evaluate.extra_scores=[]"], progress=False)
    table = (run_root / "compare" / "table.md").read_text()
    assert "| **mean (far)** | stretched |" in table
    assert (run_root / "outliers_stretched" / "index.json").exists()

    run = RunDir.open(run_root)
    m = maps.umap_map(run, progress=False)
    assert "stretched" in m.methods and len(m.outlier_coords["stretched"]) == 2 * len(m.classes)
    legend = maps.plot_umap_map(m).axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("stretched means outliers") for label in legend)

    data = ExplorerData.load(run)
    assert "stretched" in data.methods and data.index("stretched") is not None
    assert outlier_images(data, 0, "stretched")
    app = class_explorer(data)
    assert ("stretched means", "stretched") in [tuple(o) for o in app.method_toggle._options_full]
    import matplotlib.pyplot as plt

    plt.close("all")


def test_method_names_appear_only_in_their_own_modules():
    """String literals naming a registered method, outside ncis_core/outliers/: only config defaults and
    the names that mean something else (the energy head's ``linear``, the ID-side ``idgen`` option;
    ``none`` is every option's "off")."""
    allowed = {("config.py", "ncis"), ("config.py", "linear"), ("config.py", "idgen"),
               ("models/resnet.py", "linear"), ("checkpoints.py", "linear"),
               ("stages/train_classifier.py", "idgen"),
               ("checkpoints.py", "ncis")}  # the classifier checkpoint header's metadata key
    names = set(outliers.method_names()) - {"none"}
    package = Path(ncis_core.__file__).parent
    found = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).as_posix()
        if rel.startswith("outliers/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.add((rel, node.value))
    assert found <= allowed, sorted(found - allowed)
