"""The registry of outlier methods that every part of the kit iterates over; :func:`register_method` adds one.

>>> "ncis" in method_names(), method_names(produces=NOTHING)
(True, ['none'])
"""

from __future__ import annotations

import dataclasses
import typing

from . import idgen, knn_boundary, linear, ncis, none
from .spec import EMBEDDINGS, NEEDS, NOTHING, PROMPT_IMAGES, OutlierMethod

__all__ = ["EMBEDDINGS", "PROMPT_IMAGES", "NOTHING", "NEEDS", "OutlierMethod", "BUILT_IN", "register_method",
           "unregister_method", "get_method", "method_names", "methods", "method_params",
           "check_method_args"]

# The built-in methods, in the order tables list them: one line per method module.
BUILT_IN = (
    none.METHOD,          # no outliers (cross-entropy only)
    idgen.METHOD,         # the plain class prompt rendered (the control)
    linear.METHOD,        # tail sampling in embedding space (the paper's ablation)
    ncis.METHOD,          # tail sampling in the cVPN's latent space, mapped back (the method)
    knn_boundary.METHOD,  # Dream-OOD's boundary sampler on the same embeddings
)

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
    """The method's parameters: its defaults overridden by ``method_args[name]``; None without any."""
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
    """Refuse ``sample.method_args`` keys naming an unknown method or parameter (ValueError)."""
    for name in (method_args or {}):
        method = get_method(name) if name in _REGISTRY else None
        if method is None:
            raise ValueError(f"sample.method_args.{name}: no outlier method {name!r}; "
                             f"registered: {', '.join(_REGISTRY)}")
        if method.params is None:
            raise ValueError(f"sample.method_args.{name}: {name} has no parameters")
        method_params(method, method_args)


for _method in BUILT_IN:
    register_method(_method)
