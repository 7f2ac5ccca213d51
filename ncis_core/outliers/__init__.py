"""Outlier methods as plug-ins (tensors in, tensors out): :mod:`.spec`, the registry :mod:`.base`,
one module per method, the tail rule :mod:`.tail` and :mod:`.inputs`.

Nothing is imported here: the registry's names below are read from :mod:`.base` on first use.
"""

__all__ = ["EMBEDDINGS", "PROMPT_IMAGES", "NOTHING", "NEEDS", "OutlierMethod", "register_method",
           "unregister_method", "get_method", "method_names", "methods", "method_params",
           "check_method_args"]


def __getattr__(name: str):
    if name in __all__:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
