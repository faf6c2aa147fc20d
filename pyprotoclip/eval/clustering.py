"""Clustering quality of the image embeddings and the modality gap (ProtoCLIP's paper reports both)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clustering_scores(image_features: torch.Tensor, labels: torch.Tensor, *, seed: int = 0, n_redo: int = 3) -> dict[str, float]:
    """k-means of the L2-normalised image embeddings with K = the number of classes present, scored against
    the labels: adjusted Rand index and adjusted mutual information (scikit-learn's definitions).

    image_features: (N, D); labels: (N,) int64, rows with label < 0 left out.
    """
    from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score

    from pyprotoclip.cluster import KMeans

    keep = labels >= 0
    x, y = F.normalize(image_features[keep].float(), dim=-1), labels[keep]
    k = int(torch.unique(y).numel())
    if k < 2 or x.shape[0] <= k:
        raise ValueError(f"labels: clustering needs at least 2 classes and more samples than classes, got {k} and {x.shape[0]}")
    pred = KMeans(k, n_iter=50, metric="l2", n_redo=n_redo, seed=seed).fit_predict(x)
    return {"clustering_ari": float(adjusted_rand_score(y.numpy(), pred.cpu().numpy())),
            "clustering_ami": float(adjusted_mutual_info_score(y.numpy(), pred.cpu().numpy())), "clustering_k": k}


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """|mean(normalise(I)) - mean(normalise(T))| over the N pairs (Liang et al.'s modality gap)."""
    return float((F.normalize(image_features.float(), dim=-1).mean(0) - F.normalize(text_features.float(), dim=-1).mean(0)).norm())
