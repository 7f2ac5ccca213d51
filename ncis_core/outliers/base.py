"""What an outlier method is, and the registry every part of the kit iterates over.

An :class:`OutlierMethod` says what it **needs** (stage 1's embeddings, the trained cVPN, the class
tokens' rows of the generator's embedding table), what it **produces** — outlier *embeddings* that
stage 4 renders into images, *prompt images* (the plain class prompt rendered, nothing injected), or
*nothing* (the plain cross-entropy baseline) — and, for methods with parameters, a dataclass of them
whose defaults are the paper's (overridden in a run by ``sample.method_args.<name>.<key>``).

Stage 3 (``sample.method``), the rendering of every other method's images, stage 5's outlier source
(``classifier.outliers``), ``compare --methods``, the UMAP maps and the explorer all ask this
registry, so a new method is one module plus one :func:`register_method` call.

Example:
    >>> from ncis_core.outliers import method_names
    >>> "ncis" in method_names()
    True
    >>> method_names(produces=NOTHING)
    ['none']
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable

# config.py imports this module to validate method names: it imports nothing of the kit

__all__ = ["EMBEDDINGS", "PROMPT_IMAGES", "NOTHING", "NEEDS", "OutlierMethod", "register_method",
           "unregister_method", "get_method", "method_names", "methods", "method_params",
           "check_method_args", "method_inputs"]

EMBEDDINGS = "embeddings"        # outlier embeddings (C × M × D); stage 4 renders them
PROMPT_IMAGES = "prompt_images"  # images of the plain class prompt, nothing injected
NOTHING = "nothing"              # no outliers: stage 5 trains without the energy term
_PRODUCES = (EMBEDDINGS, PROMPT_IMAGES, NOTHING)
NEEDS = ("embeddings", "cvpn", "class_token_rows")


@dataclass(frozen=True)
class OutlierMethod:
    """One outlier method.

    Args:
        name: the name in configs, tables and folders (``outliers_<name>/``).
        label: how figures and the explorer write it (e.g. ``"NCIS"``).
        summary: one line for tables and ``--help``.
        produces: :data:`EMBEDDINGS`, :data:`PROMPT_IMAGES` or :data:`NOTHING`.
        needs: a subset of :data:`NEEDS` (``embeddings``: stage 1's file; ``cvpn``: stage 2's
            checkpoint; ``class_token_rows``: the generator's embedding-table rows of the class tokens).
        sample: for :data:`EMBEDDINGS`: ``sample(inputs, params, progress) -> dict`` with ``outliers``
            (C × M × D float32) and optionally ``log_density`` (C × M, under the Gaussian a draw came
            from; NaN where the method draws from none). ``inputs`` is a
            :class:`~ncis_core.outliers.inputs.SampleInputs`.
        params: a frozen dataclass of the method's parameters (defaults = the paper's), or None.
        flops: ``flops(params, rows_per_class, dim) -> float``, the FLOPs the sampler spends per
            class (for ``python -m ncis_core plan``), or None when negligible.
    """

    name: str
    label: str
    summary: str
    produces: str
    needs: tuple[str, ...] = ()
    sample: Callable[[Any, Any, bool], dict] | None = None  # (SampleInputs, params, progress)
    params: type | None = None
    flops: Callable[[Any, int, int], float] | None = None

    def __post_init__(self):
        if self.produces not in _PRODUCES:
            raise ValueError(f"outlier method {self.name!r}: produces must be one of {_PRODUCES}")
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"outlier method {self.name!r}: unknown needs {sorted(unknown)}; use {NEEDS}")
        if (self.produces == EMBEDDINGS) != (self.sample is not None):
            raise ValueError(f"outlier method {self.name!r}: a sample function exactly when it "
                             f"produces embeddings")


_REGISTRY: dict[str, OutlierMethod] = {}
_RESERVED = ("folder",)  # classifier.outliers=folder: any folder of images, not a method


def register_method(method: OutlierMethod) -> OutlierMethod:
    """Add ``method`` to the registry (a name may be registered once)."""
    if method.name in _REGISTRY or method.name in _RESERVED:
        raise ValueError(f"an outlier method named {method.name!r} is already registered")
    if not method.name.isidentifier():
        raise ValueError(f"outlier method names are identifiers (folders, config keys): {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> OutlierMethod:
    """The registered method ``name``; an unknown name is one line listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown outlier method {name!r}; registered: {', '.join(_REGISTRY)}") from None


def methods(produces: str | tuple[str, ...] | None = None) -> list[OutlierMethod]:
    """The registered methods in registration order, optionally only those producing ``produces``."""
    kinds = (produces,) if isinstance(produces, str) else produces
    return [m for m in _REGISTRY.values() if kinds is None or m.produces in kinds]


def method_names(produces: str | tuple[str, ...] | None = None) -> list[str]:
    """Names of :func:`methods`."""
    return [m.name for m in methods(produces)]


def method_params(method: OutlierMethod, method_args: dict | None) -> Any:
    """The method's parameters: its dataclass defaults, overridden by ``method_args[method.name]``
    (``sample.method_args``); None for a method without parameters."""
    if method.params is None:
        return None
    given = dict((method_args or {}).get(method.name) or {})
    fields = {f.name: f for f in dataclasses.fields(method.params)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"sample.method_args.{method.name}: unknown keys {unknown}; "
                         f"{method.name} takes {', '.join(fields)}")
    for key, value in given.items():
        want = type(getattr(method.params(), key))
        if want is type(None):  # an Optional[T] parameter (default None): None or a T
            if value is None:
                continue
            want = next(t for t in typing.get_args(typing.get_type_hints(method.params)[key])
                        if t is not type(None))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            given[key] = float(value)
        elif not isinstance(given[key], want) or (want is int and isinstance(value, bool)):
            raise ValueError(f"sample.method_args.{method.name}.{key} = {value!r}: expected {want.__name__}")
    params = method.params(**given)
    check = getattr(params, "check", None)
    if check is not None:
        check()
    return params


def check_method_args(method_args: dict | None) -> None:
    """Refuse ``sample.method_args`` naming an unknown method, a method without parameters, or a
    parameter the method does not take (one line each, naming the key)."""
    for name in (method_args or {}):
        method = get_method(name) if name in _REGISTRY else None
        if method is None:
            raise ValueError(f"sample.method_args.{name}: no outlier method {name!r}; "
                             f"registered: {', '.join(_REGISTRY)}")
        if method.params is None:
            raise ValueError(f"sample.method_args.{name}: {name} has no parameters")
        method_params(method, method_args)


def method_inputs(cfg, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(artefacts, config sections)`` that method ``name``'s outlier embeddings depend on."""
    method = get_method(name)
    artefacts = tuple(a for need, a in (("embeddings", "embeddings"), ("cvpn", "cvpn_best"))
                      if need in method.needs)
    sections = ("sample", "cvpn.holdout_fraction") + (
        ("diffusion", "embed.resolution") if "class_token_rows" in method.needs else ())
    return artefacts, sections
