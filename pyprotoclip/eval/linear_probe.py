"""Linear probe: logistic regression on frozen, unnormalised image features, with a held-out split."""

from __future__ import annotations

import numpy as np
import torch


def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (when every class has >= 2 samples) random train/test split of row indices."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    stratify = labels if counts.min() >= 2 and len(counts) <= len(labels) * min(test_fraction, 1 - test_fraction) else None
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.sort(train_idx), np.sort(test_idx)


def linear_probe(
    features: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    *,
    test_fraction: float = 0.5,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 1000,
) -> dict:
    """Fit scikit-learn's LogisticRegression (after per-feature standardisation fitted on the
    training split) on ``features[train]`` and report accuracy on ``features[test]``.

    features: (N, D) float. labels: (N,) int; rows with label < 0 are left out.
    Returns {"top1" (test accuracy), "train_top1", "num_train", "num_test", "num_classes"}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float32)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"labels: expected shape ({x.shape[0]},) matching features (N, D), got {y.shape} and {x.shape}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    keep = y >= 0
    x, y = x[keep], y[keep]
    if len(np.unique(y)) < 2:
        raise ValueError("labels: the linear probe needs at least two classes among labelled samples")
    train_idx, test_idx = split_indices(y, test_fraction, seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    clf.fit(x[train_idx], y[train_idx])
    return {
        "top1": float(clf.score(x[test_idx], y[test_idx])),
        "train_top1": float(clf.score(x[train_idx], y[train_idx])),
        "num_train": int(len(train_idx)),
        "num_test": int(len(test_idx)),
        "num_classes": int(len(np.unique(y))),
    }
