"""Pure models: :mod:`.cvpn` and :mod:`.resnet` (classifiers, energy head); no files, config or bars.

Nothing is imported here; the cVPN's names below are read from :mod:`.cvpn` on first use."""

__all__ = ["CVPN", "ConditionalAdditiveCoupling", "Orthogonal", "count_invariants",
           "invariant_energy", "skew_expm"]


def __getattr__(name: str):
    if name in __all__:
        from . import cvpn

        return getattr(cvpn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
