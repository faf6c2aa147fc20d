"""OOD metrics against hand-computed tiny cases, scikit-learn and a transcription of the official code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

import pyprotoclip.eval
from pyprotoclip.eval import ood_metrics


def official_cal_metric(known, novel):
    """jeff024/PALM util/evaluations/metrics.py cal_metric + get_curve, verbatim but for np.trapz -> np.trapezoid."""
    known, novel = np.array(known, dtype=np.float64), np.array(novel, dtype=np.float64)
    known.sort()
    novel.sort()
    all = np.concatenate((known, novel))
    all.sort()
    num_k, num_n = known.shape[0], novel.shape[0]
    tp = -np.ones([num_k + num_n + 1], dtype=int)
    fp = -np.ones([num_k + num_n + 1], dtype=int)
    tp[0], fp[0] = num_k, num_n
    k, n = 0, 0
    for l in range(num_k + num_n):
        if k == num_k:
            tp[l + 1:] = tp[l]
            fp[l + 1:] = np.arange(fp[l] - 1, -1, -1)
            break
        elif n == num_n:
            tp[l + 1:] = np.arange(tp[l] - 1, -1, -1)
            fp[l + 1:] = fp[l]
            break
        else:
            if novel[n] < known[k]:
                n += 1
                tp[l + 1] = tp[l]
                fp[l + 1] = fp[l] - 1
            else:
                k += 1
                tp[l + 1] = tp[l] - 1
                fp[l + 1] = fp[l]
    j = num_k + num_n - 1
    for l in range(num_k + num_n - 1):
        if all[j] == all[j - 1]:
            tp[j] = tp[j + 1]
            fp[j] = fp[j + 1]
        j -= 1
    results = {"FPR": np.sum(novel > np.percentile(known, 5)) / len(novel)}
    tpr = np.concatenate([[1.], tp / tp[0], [0.]])
    fpr = np.concatenate([[1.], fp / fp[0], [0.]])
    results["AUROC"] = roc_auc_score([1] * len(known) + [0] * len(novel), np.concatenate((known, novel)))
    results["DTERR"] = ((tp[0] - tp + fp) / (tp[0] + fp[0])).min()
    denom = tp + fp
    denom[denom == 0.] = -1.
    pin_ind = np.concatenate([[True], denom > 0., [True]])
    pin = np.concatenate([[.5], tp / denom, [0.]])
    results["AUIN"] = -np.trapezoid(pin[pin_ind], tpr[pin_ind])
    denom = tp[0] - tp + fp[0] - fp
    denom[denom == 0.] = -1.
    pout_ind = np.concatenate([[True], denom > 0., [True]])
    pout = np.concatenate([[0.], (fp[0] - fp) / denom, [.5]])
    results["AUOUT"] = np.trapezoid(pout[pout_ind], 1. - fpr[pout_ind])
    return results


def test_exported_as_pyprotoclip_eval_ood_metrics():
    assert pyprotoclip.eval.ood_metrics is ood_metrics
    assert set(ood_metrics([1.0], [0.0])) == {"fpr95", "auroc", "aupr_in", "aupr_out", "detection_error"}


def test_hand_computed_tiny_case():
    m = ood_metrics([1, 2, 3, 4], [0, 0.5, 3.5])
    assert m["fpr95"] == pytest.approx(1 / 3)  # threshold np.percentile = 1.15; only 3.5 lies above
    assert m["auroc"] == pytest.approx(9 / 12)  # 9 of the 12 (ID, OOD) pairs are ordered right
    assert m["aupr_in"] == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 5) / 4)  # precision at each ID hit
    assert m["aupr_out"] == pytest.approx((1 + 2 / 2 + 3 / 6) / 3)  # by -score: 0, 0.5 (OOD), 1, 2, 3 (ID), 3.5 (OOD)
    assert m["detection_error"] == pytest.approx(1 / 7)  # accept >= 1: one OOD accepted, no ID rejected


def test_perfect_and_reversed_separation():
    m = ood_metrics([5, 6, 7], [1, 2])
    assert (m["fpr95"], m["auroc"], m["aupr_in"], m["aupr_out"], m["detection_error"]) == (0.0, 1.0, 1.0, 1.0, 0.0)
    m = ood_metrics([1, 2], [5, 6, 7])
    assert m["fpr95"] == 1.0 and m["auroc"] == 0.0


def test_fpr95_is_strict_and_interpolated():
    ident = np.arange(20.0)  # the 5th percentile is 0.95
    assert ood_metrics(ident, [0.95, 0.96, -1.0, 3.0])["fpr95"] == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_and_the_official_code(seed):
    rng = np.random.default_rng(seed)
    known = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounding makes ties, within and across the sets
    novel = np.round(rng.normal(0.0, 1.0, 200), 1)
    labels = np.r_[np.ones(300), np.zeros(200)]
    data = np.r_[known, novel]
    m = ood_metrics(known, novel)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, data), abs=1e-15)
    assert m["aupr_in"] == pytest.approx(average_precision_score(labels, data), abs=1e-15)
    assert m["aupr_out"] == pytest.approx(average_precision_score(1 - labels, -data), abs=1e-15)
    fpr, tpr, _ = roc_curve(labels, data, drop_intermediate=False)
    assert m["detection_error"] == pytest.approx(((300 * (1 - tpr) + 200 * fpr) / 500).min(), abs=1e-15)
    off = official_cal_metric(known, novel)
    t = ood_metrics(known, novel, aupr="trapezoid")
    for ours, theirs in (("fpr95", "FPR"), ("auroc", "AUROC"), ("detection_error", "DTERR"), ("aupr_in", "AUIN"),
                         ("aupr_out", "AUOUT")):
        assert t[ours] == pytest.approx(off[theirs], abs=1e-12), ours


def test_accepts_tensors_and_lists():
    a = ood_metrics(torch.tensor([1.0, 2.0, 3.0]), [0.5, 2.5])
    b = ood_metrics(np.array([1.0, 2.0, 3.0]), np.array([0.5, 2.5]))
    assert a == b


@pytest.mark.parametrize("id_scores,ood_scores,match", [
    ([1.0, 2.0], [], "ood_scores: expected at least one score"),
    ([], [1.0], "id_scores: expected at least one score"),
    ([1.0, float("nan")], [1.0], "id_scores: expected finite"),
    ([[1.0, 2.0]], [1.0], "id_scores: expected a 1-D array"),
    (["a"], [1.0], "id_scores: expected a 1-D array of numbers"),
])
def test_bad_input(id_scores, ood_scores, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(id_scores, ood_scores)


def test_bad_aupr_definition():
    with pytest.raises(ValueError, match="aupr"):
        ood_metrics([1.0], [0.0], aupr="auc")
