"""OOD metrics: agreement with sklearn, FPR95 against a brute force, both conventions, bad inputs."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ncis_core.metrics import CONVENTIONS, METRIC_KEYS, mean_row, ood_metrics


def brute_fpr95(id_s, ood_s, positive):
    """Try every distinct score as the threshold, one at a time, from the strictest side."""
    id_s, ood_s = np.asarray(id_s, float), np.asarray(ood_s, float)
    thresholds = np.unique(np.concatenate([id_s, ood_s]))
    if positive == "id":
        for t in thresholds[::-1]:  # from the highest: keep ID with score >= t
            if 20 * np.sum(id_s >= t) >= 19 * len(id_s):
                return np.mean(ood_s >= t)
    else:
        for t in thresholds:  # from the lowest: flag as OOD every score <= t
            if 20 * np.sum(ood_s <= t) >= 19 * len(ood_s):
                return np.mean(id_s <= t)
    raise AssertionError("unreachable: the loosest threshold keeps everything")


def _random_scores(seed, discrete=False):
    rng = np.random.default_rng(seed)
    n_id, n_ood = rng.integers(5, 300, size=2)
    if discrete:  # many ties, within and across the two sets
        return rng.integers(0, 6, n_id).astype(float), rng.integers(0, 5, n_ood).astype(float)
    return rng.normal(1.0, 1.0, n_id), rng.normal(0.0, 1.2, n_ood)


@pytest.mark.parametrize("positive", ["id", "ood"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("discrete", [False, True])
def test_matches_sklearn_and_brute_force(seed, positive, discrete):
    id_s, ood_s = _random_scores(seed, discrete)
    m = ood_metrics(id_s, ood_s, positive=positive)
    assert set(m) == set(METRIC_KEYS)
    scores = np.concatenate([id_s, ood_s])
    is_id = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    assert abs(m["auroc"] - roc_auc_score(is_id, scores)) < 1e-9
    assert abs(m["auroc"] - roc_auc_score(1 - is_id, -scores)) < 1e-9  # symmetric: swap + negate
    assert abs(m["aupr_in"] - average_precision_score(is_id, scores)) < 1e-9
    assert abs(m["aupr_out"] - average_precision_score(1 - is_id, -scores)) < 1e-9
    assert m["fpr95"] == pytest.approx(brute_fpr95(id_s, ood_s, positive), abs=1e-12)
    assert all(0.0 <= v <= 1.0 and isinstance(v, float) for v in m.values())


def test_only_fpr95_depends_on_the_convention():
    id_s, ood_s = _random_scores(11)
    a, b = ood_metrics(id_s, ood_s, "id"), ood_metrics(id_s, ood_s, "ood")
    assert {k: a[k] for k in ("auroc", "aupr_in", "aupr_out")} == \
        {k: b[k] for k in ("auroc", "aupr_in", "aupr_out")}


def test_hand_worked_example_where_conventions_differ():
    # ID: 18 scores of 10 and 2 of 0.  OOD: 19 scores of 5 and 1 of 20.
    # positive="id": keeping >= 95 % of ID (19 of 20) needs tau = 0 (tau = 10 keeps only 18 = 90 %);
    #   OOD with score >= 0: all 20  -> FPR95 = 20/20 = 1.0.
    # positive="ood": flagging >= 95 % of OOD (19 of 20) as "score <= tau" gives tau = 5;
    #   ID with score <= 5: the two 0s -> FPR95 = 2/20 = 0.1.
    # AUROC: ID 10 beats the 19 fives (18*19 = 342 pairs), loses to the 20; ID 0 loses to all
    #   -> 342 / 400 = 0.855 under both conventions.
    id_s = np.array([10.0] * 18 + [0.0] * 2)
    ood_s = np.array([5.0] * 19 + [20.0])
    assert ood_metrics(id_s, ood_s, "id")["fpr95"] == 1.0
    assert ood_metrics(id_s, ood_s, "ood")["fpr95"] == 0.1
    assert ood_metrics(id_s, ood_s, "id")["auroc"] == pytest.approx(0.855)
    assert ood_metrics(id_s, ood_s, "ood")["auroc"] == pytest.approx(0.855)


def test_exactly_95_percent_counts_as_kept():
    # 20 ID scores 1..20: tau = 2 keeps 19/20 = 95 % exactly, so OOD at 1.5 is rejected
    id_s = np.arange(1.0, 21.0)
    assert ood_metrics(id_s, np.array([1.5]))["fpr95"] == 0.0
    assert ood_metrics(id_s, np.array([2.0]))["fpr95"] == 1.0  # a tie at tau is accepted


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_all_scores_equal(positive):
    m = ood_metrics(np.full(7, 0.3), np.full(5, 0.3), positive)
    assert m["fpr95"] == 1.0 and m["auroc"] == 0.5


@pytest.mark.parametrize("positive", ["id", "ood"])
def test_perfect_separation(positive):
    m = ood_metrics(np.linspace(1, 2, 50), np.linspace(-2, 0.5, 30), positive)
    assert m["fpr95"] == 0.0 and m["auroc"] == 1.0
    # average precision sums 1/n steps, so it may land one ulp below 1
    assert m["aupr_in"] == pytest.approx(1.0, abs=1e-12) and m["aupr_out"] == pytest.approx(1.0, abs=1e-12)


def test_reversed_scores_are_the_worst_case():
    m = ood_metrics(np.linspace(-2, 0.5, 30), np.linspace(1, 2, 50))
    assert m["fpr95"] == 1.0 and m["auroc"] == 0.0


def test_integer_scores_and_lists_are_accepted():
    assert ood_metrics([3, 2, 1], [0, 2]) == ood_metrics(np.array([3.0, 2, 1]), np.array([0.0, 2]))


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    id_s, ood_s = _random_scores(3)
    expected = ood_metrics(id_s.astype(np.float32), ood_s.astype(np.float32))
    got = ood_metrics(torch.tensor(id_s, dtype=torch.float32, requires_grad=True),
                      torch.tensor(ood_s, dtype=torch.float32))
    assert got == expected
    with pytest.raises(ValueError, match=r"\.float\(\)"):
        ood_metrics(torch.ones(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16))


@pytest.mark.parametrize("id_s, ood_s, message", [
    (np.array([]), np.array([1.0]), "id_scores is empty"),
    (np.array([1.0]), np.array([]), "ood_scores is empty"),
    (np.array([1.0, np.nan]), np.array([0.0]), "NaN"),
    (np.array([1.0]), np.array([0.0, -np.inf]), "infinite"),
    (np.ones((2, 2)), np.array([0.0]), "1-D"),
    (np.array(1.0), np.array([0.0]), "1-D"),
    (np.array([1.0], np.float32), np.array([0.0], np.float64), "different dtypes"),
    (np.array([1, 2]), np.array([0.5]), "different dtypes"),
    (np.array(["a", "b"]), np.array(["c"]), "real numbers"),
    (np.array([True, False]), np.array([False]), "real numbers"),
    (np.array([1.0, None], dtype=object), np.array([0.0]), "real numbers"),
])
def test_bad_inputs_raise(id_s, ood_s, message):
    with pytest.raises(ValueError, match=message):
        ood_metrics(id_s, ood_s)


def test_unknown_convention():
    with pytest.raises(ValueError, match="positive must be one of"):
        ood_metrics([1.0], [0.0], positive="in")


def test_mean_row_and_conventions():
    rows = [{"set": "a", "fpr95": 0.2, "auroc": 0.9}, {"set": "b", "fpr95": 0.4, "auroc": 0.7},
            {"set": "c", "fpr95": 0.0, "auroc": 1.0}]
    assert mean_row(rows) == pytest.approx({"fpr95": 0.2, "auroc": 0.8666666666666667})
    with pytest.raises(ValueError, match="auroc"):
        mean_row([{"fpr95": 0.1, "auroc": 0.5}, {"fpr95": 0.2}])
    with pytest.raises(ValueError, match="at least one row"):
        mean_row([])
    assert set(CONVENTIONS) == {"id", "ood"} and all("\n" not in v for v in CONVENTIONS.values())


def original_fpr_at_recall(pos, neg, recall_level=0.95):
    """The original code's FPR95 (Outlier Exposure's ``fpr_and_fdr_at_recall`` as used by
    Energy-OOD / Dream-OOD / NCIS), written out step by step with its own cumulative sums,
    independent of sklearn: positives = the scores of the positive class (higher = positive)."""
    y_score = np.concatenate([pos, neg]).astype(np.float64)
    y_true = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[order], y_true[order]
    distinct = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    recall = tps / tps[-1]
    last_ind = tps.searchsorted(tps[-1])
    sl = slice(last_ind, None, -1)
    recall, fps = np.r_[recall[sl], 1], np.r_[fps[sl], 0]
    cutoff = np.argmin(np.abs(recall - recall_level))
    return fps[cutoff] / len(neg)


@pytest.mark.parametrize("positive", ["id", "ood"])
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("discrete", [False, True])
def test_closest_rule_matches_the_original_code(seed, positive, discrete):
    id_s, ood_s = _random_scores(seed, discrete)
    m = ood_metrics(id_s, ood_s, positive=positive, fpr95_rule="closest")
    expected = original_fpr_at_recall(id_s, ood_s) if positive == "id" else \
        original_fpr_at_recall(-ood_s, -id_s)
    assert m["fpr95"] == pytest.approx(expected, abs=1e-12)
    # the other metrics do not depend on the rule
    first = ood_metrics(id_s, ood_s, positive=positive)
    assert {k: m[k] for k in ("auroc", "aupr_in", "aupr_out")} == \
        {k: first[k] for k in ("auroc", "aupr_in", "aupr_out")}


def test_the_two_fpr95_rules_differ_where_recall_95_is_not_hit():
    # 10 ID scores 10..1 (one each), OOD 0.5 and 9.5: recall steps of 10 %, so 95 % is never hit.
    # first_above: threshold 1 (100 % of ID) → both OOD accepted? 9.5 ≥ 1 yes, 0.5 no → 1/2.
    # closest: recall 90 % and 100 % are equally close (|.9−.95| vs |1−.95| in float64: 0.05 each,
    # up to rounding) — the original takes the first minimum walking down from full recall.
    id_s, ood_s = np.arange(10, 0, -1, dtype=float), np.array([0.5, 9.5])
    assert ood_metrics(id_s, ood_s)["fpr95"] == 0.5
    assert ood_metrics(id_s, ood_s, fpr95_rule="closest")["fpr95"] == \
        original_fpr_at_recall(id_s, ood_s)


def test_closest_rule_on_a_hand_worked_case():
    # ID 20..1, OOD 1.5 and 0. Recall 19/20 = 95 % exactly at the thresholds 2 and 1.5 (1.5 adds
    # an OOD image, not an ID one). first_above: the highest threshold keeping ≥ 95 %: 2 → no OOD
    # ≥ 2 → 0. closest: the original walks down from full recall (threshold 1) and stops at the
    # first point of recall 95 %: 1.5, which accepts the OOD 1.5 → 1/2.
    id_s = np.arange(20, 0, -1, dtype=float)
    assert ood_metrics(id_s, [1.5, 0.0], fpr95_rule="first_above")["fpr95"] == 0.0
    assert ood_metrics(id_s, [1.5, 0.0], fpr95_rule="closest")["fpr95"] == 0.5
    # ID 19..1, OOD 1 and 0.5: first_above needs 19/19 (18/19 = 94.7 % < 95 %): threshold 1
    # accepts the OOD 1 → 1/2; closest takes 18/19 (|0.947 − 0.95| < |1 − 0.95|): threshold 2 → 0.
    id_s = np.arange(19, 0, -1, dtype=float)
    assert ood_metrics(id_s, [1.0, 0.5], fpr95_rule="first_above")["fpr95"] == 0.5
    assert ood_metrics(id_s, [1.0, 0.5], fpr95_rule="closest")["fpr95"] == 0.0


def test_unknown_fpr95_rule():
    with pytest.raises(ValueError, match="fpr95_rule"):
        ood_metrics([1.0, 2.0], [0.0], fpr95_rule="nearest")
