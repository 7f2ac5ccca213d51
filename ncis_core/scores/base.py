"""The registry of OOD scores (:class:`~ncis_core.scores.spec.Score` subclasses) that stage 6, the config
check and the planner ask: :func:`register_score` adds one, :func:`build_score` builds one."""

from __future__ import annotations

import inspect
from typing import Any

from . import energy, knn, mahalanobis, maxlogit, msp, odin
from .spec import Batches, Score

__all__ = ["Score", "Batches", "SCORES", "BUILT_IN", "register_score", "unregister_score", "score_class",
           "score_names", "score_arguments", "build_score"]

# The built-in scores, in the order of the registry (and of its listings): one line per score module.
BUILT_IN = (
    energy.EnergyScore,
    msp.MSPScore,
    maxlogit.MaxLogitScore,
    odin.ODINScore,
    mahalanobis.MahalanobisScore,
    knn.KNNScore,
)

SCORES: dict[str, type[Score]] = {}


def _parameters(cls: type[Score]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls).parameters)


def register_score(cls: type[Score]) -> type[Score]:
    """Add a :class:`Score` subclass under ``cls.name`` (a class decorator; keyword arguments only)."""
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
    """``args`` over the score's defaults, type-checked against them (int → float allowed)."""
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
    """The config-settable arguments of score ``name``, ``args`` over the defaults (what results record)."""
    return _checked(name, dict(args or {}), allow_stage_args=False)


def build_score(name: str, **args: Any) -> Score:
    """The score registered as ``name``, built with ``args`` (the rest at their defaults).

    Raises:
        ValueError: an unknown name or argument, a value of the wrong type, or one refused.
    """
    return score_class(name)(**_checked(name, args, allow_stage_args=True))


for _score in BUILT_IN:
    register_score(_score)
