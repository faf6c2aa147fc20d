"""Out-of-distribution detection metrics from per-sample scores (higher score = more in-distribution).

The definitions are those of the PALM code (jeff024/PALM ``util/evaluations/metrics.py``), which the
OOD literature around it shares:

* ``fpr95``: the fraction of OOD scores strictly above ``np.percentile(id_scores, 5)`` (numpy's linear
  interpolation), i.e. the false-positive rate at 95% true-positive rate on the ID set.
* ``auroc``: ``sklearn.metrics.roc_auc_score`` with ID as the positive class.
* ``aupr_in`` / ``aupr_out``: by default average precision (``sklearn.metrics.average_precision_score``)
  with ID as positive (scores), resp. OOD as positive (scores negated). ``aupr="trapezoid"`` gives the
  official code's AUIN / AUOUT instead: the trapezoidal area under its own precision-recall curve, anchored at
  precision 0.5 and 0.
* ``detection_error``: min over thresholds of (ID rejected + OOD accepted) / (all samples), the official DTERR.
"""

from __future__ import annotations

from typing import Any

import numpy as np

AUPR_DEFINITIONS = ("average_precision", "trapezoid")


def _scores(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a 1-D array of numbers, got {type(values).__name__} ({exc})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of scores, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected at least one score, got an empty array")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite scores, found {int((~np.isfinite(arr)).sum())} NaN/Inf")
    return arr


def official_curve(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp), each (n_id + n_ood + 1,): how many ID / OOD scores lie at or above each threshold, the
    thresholds sweeping the sorted scores upward; tied scores share one point. The official ``get_curve``
    (an O(n) loop over the sorted scores, ID before OOD on a tie, then a backward pass merging ties), vectorised.
    """
    n_k, n_n = id_scores.size, ood_scores.size
    values = np.concatenate([id_scores, ood_scores])
    is_ood = np.concatenate([np.zeros(n_k, dtype=np.int64), np.ones(n_n, dtype=np.int64)])
    order = np.lexsort((is_ood, values))  # by value, ID first on a tie
    values, is_ood = values[order], is_ood[order]
    tp = np.concatenate([[n_k], n_k - np.cumsum(1 - is_ood)])
    fp = np.concatenate([[n_n], n_n - np.cumsum(is_ood)])
    # tie merge: every point inside a run of equal values (not its first) takes the value after the run
    n = values.size
    if n > 1:
        new_run = np.concatenate([[True], values[1:] != values[:-1]])
        run_id = np.cumsum(new_run) - 1
        run_last = np.flatnonzero(np.concatenate([new_run[1:], [True]]))  # last index of each run
        inside = ~new_run
        after = run_last[run_id[inside]] + 1
        tp[np.flatnonzero(inside)] = tp[after]
        fp[np.flatnonzero(inside)] = fp[after]
    return tp, fp


def ood_metrics(id_scores: Any, ood_scores: Any, *, aupr: str = "average_precision") -> dict[str, float]:
    """FPR95, AUROC, AUPR-in, AUPR-out and detection error of ID vs OOD scores (higher = more ID).

    id_scores: (n_id,), ood_scores: (n_ood,) numbers (numpy, lists or tensors), both non-empty and finite.
    aupr: "average_precision" (default) or "trapezoid" (the official code's curve). Returns floats in [0, 1]:
    {"fpr95", "auroc", "aupr_in", "aupr_out", "detection_error"}.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    if aupr not in AUPR_DEFINITIONS:
        raise ValueError(f"aupr: expected one of {AUPR_DEFINITIONS}, got {aupr!r}")
    known = _scores("id_scores", id_scores)
    novel = _scores("ood_scores", ood_scores)
    labels = np.concatenate([np.ones(known.size), np.zeros(novel.size)])
    data = np.concatenate([known, novel])
    out = {
        "fpr95": float(np.sum(novel > np.percentile(known, 5)) / novel.size),
        "auroc": float(roc_auc_score(labels, data)),
    }
    tp, fp = official_curve(known, novel)
    if aupr == "average_precision":
        out["aupr_in"] = float(average_precision_score(labels, data))
        out["aupr_out"] = float(average_precision_score(1 - labels, -data))
    else:
        tpr = np.concatenate([[1.0], tp / tp[0], [0.0]])
        fpr = np.concatenate([[1.0], fp / fp[0], [0.0]])
        denom = (tp + fp).astype(np.float64)
        keep = np.concatenate([[True], denom > 0, [True]])
        denom[denom == 0] = -1.0
        pin = np.concatenate([[0.5], tp / denom, [0.0]])
        out["aupr_in"] = float(-np.trapezoid(pin[keep], tpr[keep]))
        denom = (tp[0] - tp + fp[0] - fp).astype(np.float64)
        keep = np.concatenate([[True], denom > 0, [True]])
        denom[denom == 0] = -1.0
        pout = np.concatenate([[0.0], (fp[0] - fp) / denom, [0.5]])
        out["aupr_out"] = float(np.trapezoid(pout[keep], 1.0 - fpr[keep]))
    out["detection_error"] = float(((tp[0] - tp + fp) / (tp[0] + fp[0])).min())
    return out
