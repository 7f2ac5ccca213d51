"""What an OOD score is, and the registry stage 6, the config check and the planner ask.

A score is a subclass of :class:`Score` (OpenOOD's postprocessor shape): ``setup(model,
id_train_batches)`` fits whatever it needs on ID training data (a no-op unless ``needs_setup``),
and ``score(model, images)`` returns one number per image, **higher = more ID**. Its constructor's
keyword arguments, each with a default, are its settings: a run overrides them with
``evaluate.score_args.<name>.<argument>``. :func:`register_score` adds a class under its ``name``;
:func:`build_score` builds one by name. So a new score is one module plus one
``@register_score``: stage 6, ``load_config``'s checks and ``plan`` pick it up with no other edit.

Example:
    >>> import torch
    >>> @register_score
    ... class NegativeL1(Score):
    ...     '''Minus the L1 norm of the logits.'''
    ...     name = "neg_l1"
    ...     def __call__(self, model, images):
    ...         return -model(images).abs().sum(dim=1)
    >>> build_score("neg_l1")(lambda x: x, torch.tensor([[1.0, -2.0]]))
    tensor([-3.])
    >>> unregister_score("neg_l1")
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

__all__ = ["Score", "SCORES", "register_score", "unregister_score", "score_class", "score_names",
           "score_arguments", "build_score"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class Score:
    """The interface of an OOD score (subclass it and decorate the subclass with :func:`register_score`).

    Class attributes:
        name: the name in configs, tables and ``scores.npz`` keys.
        needs_setup: whether :meth:`setup` must see ID training data first; stage 6 builds the
            ID-train loader only when some score of the run says so.
        stage_args: constructor arguments that stage 6 fills in itself and a config may not set
            (the energy score's ``sign``, from ``evaluate.energy_sign`` and the checkpoint).
        forward_passes: network passes per scored image, a forward counting 1 and a backward 1
            (ODIN: 3); only ``plan``'s cost estimate reads it.

    ``model`` is a classifier returning logits, and ``(logits, features)`` with
    ``return_features=True`` (penultimate features; every network of :mod:`ncis_core.models.resnet`);
    ``images`` is a normalised ``B × 3 × H × W`` batch on the model's device. Stage 6 runs the network
    once per batch for all its scores: a gradient-free call on the batch's own ``images`` returns
    the outputs computed for the first one, so treat them as read-only (no in-place operations);
    a call with gradients on, or on another tensor (ODIN's perturbed input), runs the network.
    """

    name: ClassVar[str] = ""
    needs_setup: ClassVar[bool] = False
    stage_args: ClassVar[tuple[str, ...]] = ()
    forward_passes: ClassVar[int] = 1

    def setup(self, model: nn.Module, id_train_batches: Batches) -> "Score":
        """Fit on ID training data: ``(normalised images, labels)`` batches on the model's device.

        A no-op here; scores with ``needs_setup = True`` override it. The number of classes is the
        width of the model's logits. Returns ``self``.
        """
        return self

    def __call__(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """One score per image (a 1-D tensor of length ``B``), higher = more ID."""
        raise NotImplementedError


SCORES: dict[str, type[Score]] = {}


def _parameters(cls: type[Score]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls).parameters)


def register_score(cls: type[Score]) -> type[Score]:
    """Add a :class:`Score` subclass under ``cls.name`` (a class decorator; a name is taken once).

    Every constructor argument must be a keyword with a default: a config may leave any out.
    """
    if not (isinstance(cls, type) and issubclass(cls, Score)):
        raise TypeError(f"register_score takes a subclass of ncis_core.scores.Score, not {cls!r}")
    if not (isinstance(cls.name, str) and cls.name.isidentifier()):
        raise ValueError(f"{cls.__qualname__}.name must be an identifier (a config key), not {cls.name!r}")
    if cls.name in SCORES:
        taken = SCORES[cls.name]
        raise ValueError(f"a score named {cls.name!r} is already registered "
                         f"({taken.__module__}.{taken.__qualname__})")
    for arg, param in _parameters(cls).items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.default is param.empty:
            raise TypeError(f"score {cls.name!r}: constructor argument {arg!r} needs a default "
                            f"(and no *args/**kwargs), so a config may leave it out")
    unknown = set(cls.stage_args) - set(_parameters(cls))
    if unknown:
        raise TypeError(f"score {cls.name!r}: stage_args {sorted(unknown)} are not constructor arguments")
    SCORES[cls.name] = cls
    return cls


def unregister_score(name: str) -> None:
    """Remove a score (a test that registers a toy score cleans up with this)."""
    SCORES.pop(name, None)


def score_names() -> list[str]:
    """The registered names, in registration order."""
    return list(SCORES)


def score_class(name: str) -> type[Score]:
    """The class registered as ``name``; an unknown name is one line listing the registered ones."""
    try:
        return SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; registered scores: {', '.join(SCORES)}") from None


def _checked(name: str, args: dict[str, Any], allow_stage_args: bool) -> dict[str, Any]:
    """``args`` with the score's defaults filled in, int → float where the default is a float;
    refuses an argument the score does not take, or a value of another type than its default."""
    cls = score_class(name)
    params = _parameters(cls)
    settable = [a for a in params if allow_stage_args or a not in cls.stage_args]
    for arg in args:
        if arg in params and arg not in settable:
            raise ValueError(f"score {name!r}: argument {arg!r} is set by stage 6, not in score_args")
        if arg not in params:
            takes = f"its arguments: {', '.join(settable)}" if settable else "it takes no arguments"
            raise ValueError(f"score {name!r} has no argument {arg!r}; {takes}")
    out = {}
    for arg in settable:
        default = params[arg].default
        value = args.get(arg, default)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `temperature=1000` on the command line reads as an int
        elif default is not None and (not isinstance(value, type(default))
                                      or isinstance(value, bool) != isinstance(default, bool)):
            raise ValueError(f"score {name!r}: argument {arg} = {value!r} should be of type "
                             f"{type(default).__name__} (its default is {default!r})")
        out[arg] = value
    return out


def score_arguments(name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The arguments a config may set on score ``name`` (``stage_args`` left out), ``args`` over
    the defaults: what a results file records. Raises ValueError as :func:`build_score` does."""
    return _checked(name, dict(args or {}), allow_stage_args=False)


def build_score(name: str, **args: Any) -> Score:
    """The score registered as ``name``, built with ``args`` (the rest at their defaults).

    Raises:
        ValueError: an unknown name (listing the registered ones), an argument the score does not
            take (listing those it does), a value of the wrong type, or one its constructor refuses.
    """
    return score_class(name)(**_checked(name, args, allow_stage_args=True))
