"""Fused k-means update: assignment, score, per-centroid sums and counts in one pass over the points.

This is the whole data-dependent part of a Lloyd iteration; the new centroids are ``sums / counts``.
Under torch.distributed each rank runs it on its own shard and all-reduces ``sums`` and ``counts``
(see :class:`pyprotoclip.cluster.KMeans`).
"""

from __future__ import annotations

import torch

from pyprotoclip import _library
from pyprotoclip.ops import _backend, checks, reference

_OPS_LOADED = _library.load()[0] is not None
METRICS = ("l2", "cosine")

KMeansUpdate = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _validate(
    x: object, centroids: object, metric: object, weights: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    x = checks.float_matrix("x", x)
    centroids = checks.float_matrix("centroids", centroids)
    checks.same_device([("x", x), ("centroids", centroids)])
    checks.same_width([("x", x), ("centroids", centroids)])
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if weights is not None:
        weights = checks.weights_vector("weights", weights, x.shape[0], x)
    checks.finite_all([("x", x), ("centroids", centroids)])
    return x, centroids, weights


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

    x: (n, d) float32/bfloat16/float16/float64.  centroids: (k, d) floating, same device; k may exceed n
    (one rank's shard of a sharded k-means, or a few points labelled against many centroids).
    weights: optional (n,) non-negative floating.  Ties go to the lowest centroid index.
    Returns assign (n,) int64, score (n,) float32, sums (k, d) float32, counts (k,) float32;
    accumulation is in float32 whatever the input dtype. The compiled kernels read x once and use
    O(tile + k*d) extra memory, never O(n*k); the reference materialises the (n, k) matrix.
    Not differentiable. ``backend``: "auto" | "compiled" | "reference". float64 x: "auto" runs the
    reference (exact float64 accumulation, results still returned as float32 as above); the kernels
    compute in float32, so "compiled" raises a ValueError naming x.
    """
    x, centroids, weights = _validate(x, centroids, metric, weights)
    with torch.no_grad():  # not differentiable: no output takes part in autograd, whatever the inputs
        # float64: the reference with "auto", a ValueError with "compiled", as for every op (_backend.choose)
        if _backend.choose(backend, x, "kmeans_update", "x") == "reference":
            assign, score, sums, counts = reference.kmeans_update(x, centroids, weights, metric)
            return assign, score.float(), sums.float(), counts.float()
        return torch.ops.pyprotoclip.kmeans_update(x, centroids, weights, metric)


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
