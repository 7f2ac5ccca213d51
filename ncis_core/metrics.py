"""OOD detection metrics with an explicit positive class: FPR95, AUROC, AUPR-In, AUPR-Out.

Higher score = more in-distribution; only ``fpr95`` depends on the positive class (``"id"``: keep
95 % of ID, report the OOD accepted; ``"ood"``: OpenOOD's). Values are fractions in [0, 1].

    >>> m = ood_metrics([0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.65])
    >>> m["auroc"], m["fpr95"]
    (0.9166666666666667, 0.3333333333333333)
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["METRIC_KEYS", "CONVENTIONS", "FPR95_RULES", "ood_metrics", "mean_row"]

METRIC_KEYS = ("fpr95", "auroc", "aupr_in", "aupr_out")

#: One line per positive-class convention; tables print the one they use.
CONVENTIONS = {
    "id": "ID positive (this paper line): FPR95 = fraction of OOD with score >= the threshold that "
          "keeps 95% of ID (higher score = more ID)",
    "ood": "OOD positive (OpenOOD): FPR95 = fraction of ID with score <= the threshold that "
           "flags 95% of OOD (higher score = more ID)",
}

# 95 % decided in integers (19·n ≤ 20·k), never by a float comparison that could round wrongly
_RECALL_NUM, _RECALL_DEN = 19, 20


def ood_metrics(id_scores: Any, ood_scores: Any, positive: str = "id",
                fpr95_rule: str = "first_above") -> dict[str, float]:
    """FPR95, AUROC, AUPR-In and AUPR-Out of one ID/OOD pair of score arrays, as floats.

    Args:
        id_scores, ood_scores: 1-D scores of the same dtype (arrays, lists or tensors; not bfloat16).
        positive: ``"id"`` or ``"ood"``: which class is positive for FPR95.
        fpr95_rule: ``"first_above"`` (the first ROC point with recall ≥ 95 %) or ``"closest"``
            (the original's: the point with recall closest to 95 %).

    Raises:
        ValueError: an empty, non-1-D, non-numeric or non-finite array, different dtypes, or an
            unknown ``positive``.

        >>> ood_metrics([3.0, 2.0, 1.0], [0.0, 2.5], positive="ood")["fpr95"]
        0.6666666666666666
    """
    if positive not in CONVENTIONS:
        raise ValueError(f"positive must be one of {list(CONVENTIONS)}, got {positive!r}")
    if fpr95_rule not in FPR95_RULES:
        raise ValueError(f"fpr95_rule must be one of {list(FPR95_RULES)}, got {fpr95_rule!r}")
    fpr_at = FPR95_RULES[fpr95_rule]
    id_scores = _as_scores(id_scores, "id_scores")
    ood_scores = _as_scores(ood_scores, "ood_scores")
    if id_scores.dtype != ood_scores.dtype:
        raise ValueError(f"id_scores and ood_scores have different dtypes ({id_scores.dtype} vs "
                         f"{ood_scores.dtype}); cast both to the same dtype so that ties compare exactly")
    # float64 for sklearn: negation and comparisons are then exact for every accepted input dtype
    scores = np.concatenate([id_scores, ood_scores]).astype(np.float64)
    is_id = np.concatenate([np.ones(len(id_scores), np.int64), np.zeros(len(ood_scores), np.int64)])
    if positive == "id":
        fpr95 = fpr_at(is_id, scores)
    else:
        fpr95 = fpr_at(1 - is_id, -scores)
    return {
        "fpr95": fpr95,
        "auroc": float(roc_auc_score(is_id, scores)),
        "aupr_in": float(average_precision_score(is_id, scores)),
        "aupr_out": float(average_precision_score(1 - is_id, -scores)),
    }


def _fpr_at_95_tpr(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """FPR at the first ROC point (largest threshold, ties included) whose TPR is ≥ 95 %."""
    fpr, tpr, _ = roc_curve(is_positive, scores, drop_intermediate=False)
    n_pos = int(is_positive.sum())
    # back to exact counts (tpr = count / n_pos) so the 95 % test is done on integers
    kept = np.rint(tpr * n_pos).astype(np.int64)
    first = int(np.argmax(kept * _RECALL_DEN >= _RECALL_NUM * n_pos))  # exists: the last TPR is 1
    return float(fpr[first])


def _fpr_at_closest_recall(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """FPR at the ROC point whose recall is closest to 95 % (the original code's rule)."""
    # distinct thresholds, highest first: point j accepts every score >= the j-th distinct value
    fpr, tpr, _ = roc_curve(is_positive, scores, drop_intermediate=False)
    n_pos = int(is_positive.sum())
    tps = np.rint(tpr * n_pos).astype(np.int64)[1:]  # [1:]: roc_curve's extra (0, 0) point
    fpr = fpr[1:]
    full = int(np.searchsorted(tps, n_pos))  # the first point that reaches full recall
    # the first minimum of |recall − 0.95| towards the highest threshold: ties take the higher recall
    recall = tps[full::-1] / n_pos
    return float(fpr[full::-1][int(np.argmin(np.abs(recall - 0.95)))])


#: ``fpr95_rule`` → the function ``(is_positive, scores) -> FPR at 95 % recall``.
FPR95_RULES = {"first_above": _fpr_at_95_tpr, "closest": _fpr_at_closest_recall}


def _as_scores(values: Any, name: str) -> np.ndarray:
    """A finite, non-empty, 1-D real numpy array, or a ValueError that says what is wrong."""
    if type(values).__module__.startswith("torch"):
        try:
            values = values.detach().cpu().numpy()
        except TypeError as err:  # e.g. bfloat16 has no numpy dtype
            raise ValueError(f"{name}: cannot convert the tensor to numpy ({err}); cast it with "
                             f".float() first") from err
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be real numbers (int or float), got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            raise ValueError(f"{name} holds {int(np.isnan(array).sum())} NaN and "
                             f"{int(np.isinf(array).sum())} infinite values (first at index "
                             f"{int(np.argmax(bad))})")
    return array


def mean_row(rows: list[dict]) -> dict[str, float]:
    """The unweighted mean over OOD sets (``rows``) of every numeric entry of the first row.

        >>> mean_row([{"set": "a", "fpr95": 0.2, "auroc": 0.9}, {"set": "b", "fpr95": 0.4, "auroc": 0.7}])
        {'fpr95': 0.30000000000000004, 'auroc': 0.8}
    """
    if not rows:
        raise ValueError("mean_row needs at least one row")
    keys = [k for k, v in rows[0].items() if isinstance(v, Real) and not isinstance(v, bool)]
    for i, row in enumerate(rows):
        missing = [k for k in keys if not isinstance(row.get(k), Real) or isinstance(row.get(k), bool)]
        if missing:
            raise ValueError(f"row {i} lacks numeric {missing}, which row 0 has")
    return {k: float(np.mean([row[k] for row in rows])) for k in keys}
