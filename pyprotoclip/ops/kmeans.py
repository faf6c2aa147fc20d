"""Fused k-means update: assignment, score, per-centroid sums and counts in one pass over the points.

This is the whole data-dependent part of a Lloyd iteration; the new centroids are ``sums / counts``.
Under torch.distributed each rank runs it on its own shard and all-reduces ``sums`` and ``counts``
(see :class:`pyprotoclip.cluster.KMeans`).
"""

from __future__ import annotations

import torch

from pyprotoclip import _library
from pyprotoclip.ops import _backend, _checks, reference

_OPS_LOADED = _library.load()[0] is not None
METRICS = ("l2", "cosine")

KMeansUpdate = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _validate(
    x: object, centroids: object, metric: object, weights: object, *, require_k_le_n: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = _checks.float_matrix("x", x)
    centroids = _checks.float_matrix("centroids", centroids)
    _checks.same_device([("x", x), ("centroids", centroids)])
    _checks.same_width([("x", x), ("centroids", centroids)])
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    n, k = x.shape[0], centroids.shape[0]
    if require_k_le_n and k > n:
        raise ValueError(f"centroids: expected at most n={n} centroids (one per point of x), got k={k}")
    if weights is not None:
        weights = _checks.tensor("weights", weights)
        if weights.dim() != 1 or weights.shape[0] != n:
            raise ValueError(f"weights: expected shape ({n},) to match x, got {tuple(weights.shape)}")
        if weights.dtype not in _checks.FLOAT_DTYPES:
            raise ValueError(f"weights: expected a floating dtype, got {weights.dtype}")
        if weights.device != x.device:
            raise ValueError(f"weights: expected device {x.device} (as x), got {weights.device}")
        _checks.finite("weights", weights)
        if _checks.value_checks_enabled() and bool((weights < 0).any()):
            raise ValueError(f"weights: expected non-negative values, got min {float(weights.min())}")
    _checks.finite("x", x)
    _checks.finite("centroids", centroids)
    return x, centroids, weights


def _dispatch(
    x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None, metric: str, backend: str
) -> KMeansUpdate:
    # float64 + auto -> the reference, as for every op (_backend.choose)
    if _backend.choose(backend, x, "kmeans_update") == "reference":
        assign, score, sums, counts = reference.kmeans_update(x, centroids, weights, metric)
        return assign, score.float(), sums.float(), counts.float()
    return torch.ops.pyprotoclip.kmeans_update(x, centroids, weights, metric)


def kmeans_update(
    x: torch.Tensor,
    centroids: torch.Tensor,
    *,
    metric: str = "l2",
    weights: torch.Tensor | None = None,
    backend: str = "auto",
) -> KMeansUpdate:
    """One k-means (Lloyd) pass over the points, fused: assignment, score, sums and counts.

    l2:      assign_i = argmin_j |x_i - c_j|^2,   score_i = that squared distance (as faiss reports it)
    cosine:  assign_i = argmax_j <x^_i, c^_j>,    score_i = that similarity, with v^ = v / max(|v|, 1e-12)
    sums_j   = sum_{i: assign_i = j} w_i * x_i    (x^_i for cosine: sums of the *normalised* points,
                                                   so normalize(sums_j) is the spherical k-means update)
    counts_j = sum_{i: assign_i = j} w_i          (w_i = 1 without weights)

    x: (n, d) float32/bfloat16/float16.  centroids: (k, d) floating, same device, k <= n.
    weights: optional (n,) non-negative floating.  Ties go to the lowest centroid index.
    Returns assign (n,) int64, score (n,) float32, sums (k, d) float32, counts (k,) float32;
    accumulation is in float32 whatever the input dtype. The compiled kernels read x once and use
    O(tile + k*d) extra memory, never O(n*k); the reference materialises the (n, k) matrix.
    Not differentiable. ``backend``: "auto" | "compiled" | "reference".
    """
    x, centroids, weights = _validate(x, centroids, metric, weights, require_k_le_n=True)
    return _dispatch(x, centroids, weights, metric, backend)


def _assign(x: torch.Tensor, centroids: torch.Tensor, metric: str, backend: str) -> KMeansUpdate:
    """kmeans_update without the k <= n rule, for predicting a few points against many centroids."""
    x, centroids, _ = _validate(x, centroids, metric, None, require_k_le_n=False)
    return _dispatch(x, centroids, None, metric, backend)


# ---- fake for the compiled op -----------------------------------------------------------------

if _OPS_LOADED:

    @torch.library.register_fake("pyprotoclip::kmeans_update")
    def _kmeans_update_fake(x, centroids, weights, metric):
        torch._check(x.shape[1] == centroids.shape[1])
        if weights is not None:
            torch._check(weights.shape[0] == x.shape[0])
        n = x.shape[0]
        k, d = centroids.shape
        return (
            x.new_empty((n,), dtype=torch.int64),
            x.new_empty((n,), dtype=torch.float32),
            x.new_empty((k, d), dtype=torch.float32),
            x.new_empty((k,), dtype=torch.float32),
        )
