"""Contract tests: every registered outlier method, every registered score and every stage of the
stage table through the same checks (as zuko's ``tests/test_flows.py`` is one test over every flow).
The parameters are read from the registries when the tests are collected, so a method or score
registered by one new file is covered here with no test edit."""

import dataclasses
import functools
import importlib
import inspect
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ncis_core import runs
from ncis_core.config import ConfigError, load_config
from ncis_core.outliers import base as outliers
from ncis_core.scores import SCORES, Score, build_score, score_arguments, score_class

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


# ------------------------------------------------------------------------------------------------
# outlier methods

CLASSES, ROWS, DIM = 3, 8, 8  # 8 training rows per class: the smoke preset's method_args fit them


def _sample_inputs(method):
    """Tiny inputs in the shapes :class:`SampleInputs` promises, with only the loaders the method
    declares in ``needs`` (an undeclared one raises when asked for)."""
    from ncis_core.models.cvpn import CVPN
    from ncis_core.outliers.inputs import SampleInputs

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(CLASSES).repeat_interleave(ROWS)
    centres = 3 * torch.randn(CLASSES, DIM, generator=gen)
    x = centres[labels] + torch.randn(CLASSES * ROWS, DIM, generator=gen)

    def cvpn():
        torch.manual_seed(0)
        model = CVPN(DIM, CLASSES, num_layers=2).eval()
        return model, {**model.architecture(), "num_classes": CLASSES, "dim": DIM}, x.mean(0)

    def token_rows():
        return torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(1))

    return SampleInputs(x, labels, CLASSES, [f"class_{c}" for c in range(CLASSES)], 0,
                        load_config("smoke").sample, torch.device("cpu"),
                        cvpn if "cvpn" in method.needs else None,
                        token_rows if "class_token_rows" in method.needs else None)


@pytest.mark.parametrize("name", outliers.method_names())
def test_outlier_method_contract(name):
    method = outliers.get_method(name)
    assert method.name == name and name.isidentifier()
    assert method.label and isinstance(method.summary, str)
    assert method.produces in (outliers.EMBEDDINGS, outliers.PROMPT_IMAGES, outliers.NOTHING)
    assert set(method.needs) <= set(outliers.NEEDS)
    assert (method.sample is not None) == (method.produces == outliers.EMBEDDINGS)
    assert name in outliers.method_names(method.produces)

    # parameters: a frozen dataclass whose defaults pass the registry's own checks
    if method.params is None:
        assert outliers.method_params(method, None) is None
        with pytest.raises(ValueError, match=f"{name} has no parameters"):
            outliers.check_method_args({name: {}})
    else:
        assert dataclasses.is_dataclass(method.params)
        defaults = method.params()  # every field has a default (the paper's value)
        assert outliers.method_params(method, None) == defaults
        outliers.check_method_args({name: {}})
        outliers.check_method_args({name: dataclasses.asdict(defaults)})
        with pytest.raises(ValueError, match=f"sample.method_args.{name}: unknown keys"):
            outliers.check_method_args({name: {"no_such_key": 1}})

    # a valid stage 5 outlier source, and stage 3's method when it produces embeddings
    assert load_config("smoke", [f"classifier.outliers={name}"]).classifier.outliers == name
    if method.produces != outliers.EMBEDDINGS:
        with pytest.raises(ConfigError, match=f"sample.method = '{name}' is not one of"):
            load_config("smoke", [f"sample.method={name}"])
    else:
        cfg = load_config("smoke", [f"sample.method={name}", f"classifier.outliers={name}"])
        assert cfg.sample.method == name
        # stage 3 reads and depends on what the method declares it needs
        assert ("cvpn_best" in runs.stage_inputs(cfg, "sample")) == ("cvpn" in method.needs)
        assert ("diffusion" in runs.stage_sections(cfg, "sample")) == ("class_token_rows" in method.needs)


@pytest.mark.parametrize("name", outliers.method_names(outliers.EMBEDDINGS))
def test_outlier_sampler_contract(name):
    """``sample(inputs, params, progress)`` on tiny inputs: C × M × D outliers, a C × M
    log-density when given, its seed's draws again on a second call, the inputs untouched, and
    nothing it did not declare in ``needs``."""
    method = outliers.get_method(name)
    params = outliers.method_params(method, load_config("smoke").sample.method_args)
    inputs = _sample_inputs(method)
    embeddings = inputs.embeddings.clone()
    out = method.sample(inputs, params, False)
    assert torch.equal(inputs.embeddings, embeddings)
    o = out["outliers"]
    # float32 in the files: stage 3 casts (linear's tail sampler returns float64)
    assert o.is_floating_point() and o.dim() == 3 and o.shape[0] == CLASSES and o.shape[2] == DIM
    assert o.shape[1] >= 1 and torch.isfinite(o).all()
    if out.get("log_density") is not None:
        assert out["log_density"].shape == o.shape[:2]
    again = method.sample(_sample_inputs(method), params, False)
    torch.testing.assert_close(again["outliers"], o, rtol=0, atol=0)
    if method.flops is not None:
        flops = method.flops(params, ROWS, DIM)
        assert isinstance(flops, (int, float)) and math.isfinite(flops) and flops >= 0


# ------------------------------------------------------------------------------------------------
# scores

FEATURES = 12  # 3 × 2 × 2 images, flattened


class Prototypes(nn.Module):
    """A classifier whose features are the flattened image and whose logit c is 5 × feature c:
    ID images point along one of the first 3 features, OOD images along features no logit reads."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(FEATURES, CLASSES)
        with torch.no_grad():
            self.fc.weight.copy_(5 * torch.eye(CLASSES, FEATURES))
            self.fc.bias.zero_()

    def forward(self, x, return_features=False):
        feats = x.flatten(1)
        logits = self.fc(feats)
        return (logits, feats) if return_features else logits


class OneForward:
    """As stage 6 shares one forward pass among the scores of a batch: a gradient-free call on the
    batch it was given returns the outputs of the first such call (a score must not change them)."""

    def __init__(self, model, images):
        self.model, self.images, self.outputs = model, images, None

    def __call__(self, images, return_features=False):
        if images is not self.images or torch.is_grad_enabled():
            return self.model(images, return_features=return_features)
        if self.outputs is None:
            self.outputs = self.model(images, return_features=True)
        return self.outputs if return_features else self.outputs[0]


def _images(directions, per, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = [3 * torch.eye(FEATURES)[d] + 0.1 * torch.randn(FEATURES, generator=gen)
            for d in directions for _ in range(per)]
    return torch.stack(rows).reshape(-1, 3, 2, 2)


def _id_train_batches():
    x = _images(range(CLASSES), 60, seed=0)  # 60 per class: more than kNN's default k = 50
    y = torch.arange(CLASSES).repeat_interleave(60)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]


def _yaml(value) -> str:
    """A default as a ``--set`` value."""
    return str(value).lower() if isinstance(value, bool) or value is None else repr(value)


@pytest.mark.parametrize("name", list(SCORES))
def test_score_contract(name):
    cls = score_class(name)
    assert issubclass(cls, Score) and cls.name == name and name.isidentifier()
    assert isinstance(cls.forward_passes, int) and cls.forward_passes >= 1

    # arguments: keywords with defaults; stage 6's own ones never settable from a config
    args = score_arguments(name)
    assert not set(args) & set(cls.stage_args)
    assert score_arguments(name, args) == args
    with pytest.raises(ValueError, match=f"score {name!r} has no argument 'no_such_argument'"):
        build_score(name, no_such_argument=1)
    overrides = [f"evaluate.score_args.{name}.{arg}={_yaml(value)}" for arg, value in args.items()
                 if value is None or isinstance(value, (bool, int, float, str))]
    cfg = load_config("smoke", [f"evaluate.score={name}", *overrides])
    assert cfg.evaluate.score == name
    score = build_score(name, **args)
    assert isinstance(score, cls)

    # setup when it needs one, then one score per image, higher = more ID on an obvious case
    model = Prototypes().eval()
    if cls.needs_setup:
        assert score.setup(model, _id_train_batches()) is score
    id_images, ood_images = _images(range(CLASSES), 4, seed=1), _images(range(6, 9), 4, seed=2)
    images = torch.cat([id_images, ood_images])
    before = images.clone()
    out = score(model, images)
    assert torch.equal(images, before)  # the batch is read-only
    assert isinstance(out, torch.Tensor) and out.shape == (len(images),) and out.dtype.is_floating_point
    assert not out.requires_grad and torch.isfinite(out).all()
    assert out[:len(id_images)].min() > out[len(id_images):].max(), out
    # with the forward pass shared as in stage 6, twice over: the same scores, the outputs untouched
    shared = OneForward(model, images)
    torch.testing.assert_close(score(shared, images), out)
    if shared.outputs is not None:
        kept = [t.clone() for t in shared.outputs]
        torch.testing.assert_close(score(shared, images), out)
        assert all(torch.equal(a, b) for a, b in zip(shared.outputs, kept))
    # an image's score does not depend on the rest of its batch
    halves = torch.cat([score(model, images[:5]), score(model, images[5:])])
    torch.testing.assert_close(halves, out, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# stages

def test_stages_are_numbered_from_0_in_order():
    assert [stage.number for stage in runs.STAGES.values()] == list(range(len(runs.STAGES)))


@functools.cache
def _configs() -> list:
    """The smoke config with every registered method in the places a method can be named."""
    overrides = [[], ["classifier.id_generated=idgen"]]
    overrides += [[f"classifier.outliers={name}"] for name in outliers.method_names()]
    overrides += [[f"sample.method={name}", f"classifier.outliers={name}"]
                  for name in outliers.method_names(outliers.EMBEDDINGS)]
    return [load_config("smoke", o) for o in overrides]


@pytest.mark.parametrize("name", list(runs.STAGES))
def test_stage_contract(name):
    stage = runs.STAGES[name]
    assert stage.name == name
    earlier = {a for s in runs.STAGES.values() if s.number < stage.number for a in s.outputs}
    assert stage.outputs and set(stage.outputs) <= set(runs.ARTEFACTS)
    assert set(stage.inputs) <= earlier
    sections = {f.name for f in dataclasses.fields(load_config("smoke"))}
    for cfg in _configs():
        assert set(runs.stage_inputs(cfg, name)) <= earlier
        for section in runs.stage_sections(cfg, name):
            top, _, key = section.partition(".")
            assert top in sections, section
            assert not key or hasattr(getattr(cfg, top), key), section
    # notebook NN_<what it does>.ipynb runs stage NN
    assert len(list(NOTEBOOKS.glob(f"{stage.number:02d}_*.ipynb"))) == 1
    # the module that runs it: a run(cfg, run_dir, ...) and its own entry of the table
    module = importlib.import_module(f"ncis_core.stages.{stage.module}")
    assert callable(module.run) and list(inspect.signature(module.run).parameters)[:2] == ["cfg", "run_dir"]
    assert getattr(module, "STAGE", stage) is stage
