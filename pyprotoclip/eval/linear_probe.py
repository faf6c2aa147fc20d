"""Linear probe: logistic regression on frozen, unnormalised image features.

Two protocols. The standard one (:func:`linear_probe_train_test`): fit on features of a training
split, test on the evaluation split, with C (the inverse L2 strength) chosen by a small sweep on a
held-out part of the training split, CLIP-paper style, then refitted on the whole training part. The
fallback (:func:`linear_probe`): a stratified split of the evaluation data itself.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

# the C sweep: half-decade steps from 1e-3 to 1e2 (the CLIP paper sweeps 1e-6..1e6 with a binary search)
DEFAULT_CS = tuple(float(c) for c in np.round(np.logspace(-3, 2, 11), 6))
VAL_FRACTION = 0.2


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (when every class has >= 2 samples) random train/test split of row indices."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 and len(counts) <= len(labels) * min(test_fraction, 1 - test_fraction) else None
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.sort(train_idx), np.sort(test_idx)


def _numpy(features, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float32)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"{what}: expected shape ({x.shape[0]},) matching features (N, D), got {y.shape} and {x.shape}")
    keep = y >= 0
    return x[keep], y[keep]


def _classifier(C: float, seed: int, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int, max_iter: int):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # weakly regularised sweep points may not converge
        return _classifier(C, seed, max_iter).fit(x, y)


def linear_probe(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict:
    """The fallback protocol: fit scikit-learn's LogisticRegression (after per-feature standardisation
    fitted on the training part) on ``features[train]`` and report accuracy on ``features[test]``, a
    stratified split of the same data.

    features: (N, D) float. labels: (N,) int; rows with label < 0 are left out.
    Returns {"top1" (test accuracy), "train_top1", "num_train", "num_test", "num_classes", "C", "protocol"}.
    """
    x, y = _numpy(features, labels, "labels")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    if len(np.unique(y)) < 2:
        raise ValueError("labels: the linear probe needs at least two classes among labelled samples")
    train_idx, test_idx = split_indices(y, test_fraction, seed)
    clf = _fit(x[train_idx], y[train_idx], C, seed, max_iter)
    train_pct = round(100 * (1 - test_fraction))
    return {
        "top1": float(clf.score(x[test_idx], y[test_idx])),
        "train_top1": float(clf.score(x[train_idx], y[train_idx])),
        "num_train": int(len(train_idx)),
        "num_test": int(len(test_idx)),
        "num_classes": int(len(np.unique(y))),
        "C": float(C),
        "protocol": f"{train_pct}/{100 - train_pct} split of the evaluation data, C={C:.3g}",
    }


def linear_probe_train_test(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    *,
    C: float | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict:
    """The standard protocol: fit on the training split, test on the evaluation split.

    With ``C=None``, C is the value of ``Cs`` with the best accuracy on a stratified ``val_fraction``
    of the training rows after fitting on the rest (the smallest such C on ties); the probe is then
    refitted with it on every training row. Rows with label < 0 are left out on both sides.
    Returns {"top1" (evaluation-split accuracy), "train_top1", "num_train", "num_test", "num_classes"
    (classes among the training labels), "missing_classes" (evaluation classes with no training sample:
    their samples are always wrong), "num_test_missing" (the evaluation samples of those classes), "C",
    "protocol", "c_sweep" ({C: held-out accuracy}, with C=None only)}.
    """
    x_tr, y_tr = _numpy(train_features, train_labels, "train-data")
    x_te, y_te = _numpy(test_features, test_labels, "labels")
    if len(np.unique(y_tr)) < 2:
        raise ValueError("train-data: the linear probe needs at least two classes among the training split's labelled samples")
    if len(y_te) == 0:
        raise ValueError("labels: no sample of the evaluation data has a class label")
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"train-data: features of width {x_tr.shape[1]} vs {x_te.shape[1]} on the evaluation data")
    missing = np.setdiff1d(np.unique(y_te), np.unique(y_tr))
    out: dict = {"missing_classes": int(len(missing)), "num_test_missing": int(np.isin(y_te, missing).sum())}
    if C is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
        fit_idx, val_idx = split_indices(y_tr, val_fraction, seed)
        sweep = {float(c): float(_fit(x_tr[fit_idx], y_tr[fit_idx], c, seed, max_iter).score(x_tr[val_idx], y_tr[val_idx]))
                 for c in Cs}
        best = max(sweep.values())
        C = min(c for c, acc in sweep.items() if acc == best)
        out["c_sweep"] = sweep
        how = f"C={C:.3g} chosen on a {round(100 * val_fraction)}% held-out part of the training split"
    else:
        how = f"C={C:.3g} (--probe-c)"
    clf = _fit(x_tr, y_tr, C, seed, max_iter)
    out.update(
        top1=float(clf.score(x_te, y_te)),
        train_top1=float(clf.score(x_tr, y_tr)),
        num_train=int(len(y_tr)),
        num_test=int(len(y_te)),
        num_classes=int(len(np.unique(y_tr))),
        C=float(C),
        protocol=f"train->eval, {how}",
    )
    return out
