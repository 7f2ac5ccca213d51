"""OOD scores as plug-ins (higher = more ID): :mod:`.spec`, the registry :mod:`.base`, one module per score.

Nothing is imported here: the names below are read from :mod:`.base` on first use.
"""

__all__ = ["Score", "SCORES", "register_score", "unregister_score", "score_class", "score_names",
           "score_arguments", "build_score", "EnergyScore", "MSPScore", "MaxLogitScore",
           "ODINScore", "MahalanobisScore", "KNNScore"]


def __getattr__(name: str):
    if name in __all__:
        from . import base

        if hasattr(base, name):
            return getattr(base, name)
        return next(cls for cls in base.BUILT_IN if cls.__name__ == name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
