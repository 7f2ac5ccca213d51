"""Pure models and their math: no files, no config, no progress bars (DESIGN.md, "models")."""

from .cvpn import (CVPN, ConditionalAdditiveCoupling, Orthogonal, count_invariants,
                   invariant_energy, skew_expm)

__all__ = ["CVPN", "ConditionalAdditiveCoupling", "Orthogonal", "count_invariants",
           "invariant_energy", "skew_expm"]
