"""OOD scores as plug-ins: one module per score, one registry (:mod:`ncis_core.scores.base`).

Registered here (higher = more ID, all of them):

* ``energy`` (:mod:`.energy`) — ``sign · T · logsumexp(f(x)/T)``, the paper's score;
* ``msp`` (:mod:`.msp`) — maximum softmax probability;
* ``maxlogit`` (:mod:`.maxlogit`) — the largest logit;
* ``odin`` (:mod:`.odin`) — temperature scaling plus an input perturbation (``temperature``, ``epsilon``);
* ``mahalanobis`` (:mod:`.mahalanobis`) — tied-covariance class Gaussians on penultimate features,
  fitted in ``setup``;
* ``knn`` (:mod:`.knn`) — minus the squared distance to the K-th nearest normalised ID training
  feature (``k``), features stored in ``setup``.

A new score: a module with a :class:`Score` subclass decorated by :func:`register_score`, imported
below. A run chooses scores with ``evaluate.score`` / ``evaluate.extra_scores`` and sets their
arguments with ``evaluate.score_args.<name>.<argument>``.

Example:
    >>> from ncis_core.scores import build_score
    >>> build_score("odin", temperature=10.0).temperature
    10.0
"""

from .base import (SCORES, Score, build_score, register_score, score_arguments, score_class,
                   score_names, unregister_score)

# importing a score's module registers it; the order is the registry's (and its listings')
from .energy import EnergyScore
from .msp import MSPScore
from .maxlogit import MaxLogitScore
from .odin import ODINScore
from .mahalanobis import MahalanobisScore
from .knn import KNNScore

__all__ = ["Score", "SCORES", "register_score", "unregister_score", "score_class", "score_names",
           "score_arguments", "build_score", "EnergyScore", "MSPScore", "MaxLogitScore",
           "ODINScore", "MahalanobisScore", "KNNScore"]
