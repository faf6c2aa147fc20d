"""k-means driver on top of the fused ``kmeans_update`` op: init, Lloyd iterations, empty-cluster
splitting, subsampling, and multi-rank fitting (each rank its shard, sums/counts all-reduced).

The iterations follow faiss's ``Clustering``: train on at most ``max_points_per_centroid * K``
points, re-seed empty clusters by splitting a large one, report the objective of every iteration;
then one full pass labels every point against the final centroids.
"""

from __future__ import annotations

import math
import numbers
import time

import torch
import torch.distributed as dist

from pyprotoclip import distributed as pdist
from pyprotoclip.ops import KMEANS_METRICS as METRICS
from pyprotoclip.ops import checks, kmeans_update, skip_value_checks

BACKENDS = ("auto", "faiss", "compiled", "reference")
INITS = ("k-means++", "random")
# faiss's relative perturbation when a centroid is copied to re-seed an empty cluster.
SPLIT_EPS = 1.0 / 1024.0
# k-means++ runs on a sample of at most max(this, 4K) points: it is O(K * sample * d) and inherently
# sequential, and the iterations fix what a sampled seeding misses.
KMEANSPP_MIN_SAMPLE = 10_000
# k-means++ draws centres one at a time up to this many rounds, then in equal batches per round
# (each batch drawn from the same D^2 distribution), so large K costs at most this many passes.
KMEANSPP_MAX_ROUNDS = 128


def _is_int(value: object) -> bool:
    # an int (numpy's too), not a bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _objective(score: torch.Tensor, weights: torch.Tensor | None, metric: str) -> torch.Tensor:
    """sum_i w_i * dist_i as a float64 0-d tensor; for cosine dist = |x^ - c^|^2 = 2 - 2 cos."""
    s = score.double()
    dist_ = s if metric == "l2" else 2.0 - 2.0 * s
    return (dist_ if weights is None else dist_ * weights.double()).sum()


def split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor) -> int:
    """Re-seed every empty cluster (count 0) in place, as faiss does: copy the centroid of the
    currently largest cluster with a small symmetric perturbation (x(1+eps) / x(1-eps) on alternate
    coordinates, opposite signs for the two copies) and give each half its count.
    Deterministic (largest count, ties to the lowest index), so every rank does the same.

    centroids: (K, d) float32, counts: (K,) float32, both modified. Returns the number of splits.
    """
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    d = centroids.shape[1]
    sign = torch.ones(d, dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0
    for ci in empty:
        cj = int(torch.argmax(counts))
        if float(counts[cj]) <= 0:
            break
        base = centroids[cj].clone()
        centroids[ci] = base * (1.0 + SPLIT_EPS * sign)
        centroids[cj] = base * (1.0 - SPLIT_EPS * sign)
        half = counts[cj] / 2
        counts[ci] = half
        counts[cj] = counts[cj] - half
    return len(empty)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, dim=1, eps=1e-12)


def kmeans_plusplus(
    x: torch.Tensor, k: int, generator: torch.Generator, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling, weighted by ``weights``) of k centres from x (n, d) float32.

    Exact k-means++ for k <= KMEANSPP_MAX_ROUNDS; above, each round draws k/rounds centres at once
    from the current D^2 distribution (one GEMM per round). Returns (k, d) float32 rows of x.
    """
    n = x.shape[0]
    x = x.float()
    x_sq = (x * x).sum(1)
    w = torch.ones(n, dtype=torch.float32, device=x.device) if weights is None else weights.float()
    rounds = min(k, KMEANSPP_MAX_ROUNDS)
    per_round = math.ceil(k / rounds)
    chosen = torch.empty(0, dtype=torch.long, device=x.device)
    d2 = torch.full((n,), float("inf"), device=x.device)
    while chosen.numel() < k:
        m = min(per_round, k - chosen.numel())
        p = (w * d2) if chosen.numel() else w.clone()
        p[chosen] = 0.0
        if not bool((p > 0).any()):
            # Fewer distinct (weighted) points than k: take any unchosen ones; the duplicates
            # become empty clusters that the iterations split.
            p = torch.ones(n, device=x.device)
            p[chosen] = 0.0
        m = min(m, int((p > 0).sum()))
        new = torch.multinomial(p.cpu().double(), m, replacement=False, generator=generator).to(x.device)
        chosen = torch.cat([chosen, new])
        c = x[new]
        dist_new = (x_sq[:, None] - 2.0 * (x @ c.t()) + (c * c).sum(1)).clamp_min_(0.0).amin(1)
        d2 = torch.minimum(d2, dist_new)
    return x[chosen].clone()


class KMeans:
    """k-means (L2) or spherical k-means (cosine) on torch tensors, single- or multi-rank.

    KMeans(n_clusters, n_iter=20, metric="l2", init="k-means++", n_redo=1, seed=0,
           max_points_per_centroid=256, tol=1e-4, backend="auto", group=None, verbose=False)

    * metric "l2": minimise sum_i w_i |x_i - c_{a_i}|^2. "cosine": points and centroids are
      L2-normalised and the objective is sum_i w_i |x^_i - c_{a_i}|^2 = sum_i w_i (2 - 2 cos), so
      lower is better for both; centroids_ are unit vectors.
    * init: "k-means++" (on a sample of max(10000, 4K) points), "random" (K distinct points), or a
      (K, d) tensor of initial centroids.
    * Each of ``n_redo`` runs uses seed + redo; the run with the lowest final inertia is kept.
    * Iterations use at most ``max_points_per_centroid * K`` points (a seeded random subset), stop
      early when the objective improves by less than ``tol`` (relative; ``tol=None``: exactly ``n_iter``
      iterations, as faiss runs), and re-seed empty clusters
      by splitting the largest one. A final pass then labels every point.
    * backend: "auto"/"compiled"/"reference" run the iterations with ``pyprotoclip.ops.kmeans_update``
      on that op backend; "faiss" uses faiss (faiss-gpu when installed and x is on CUDA), single-rank.
    * Multi-rank (``group`` or the default group when torch.distributed is initialised): every rank
      passes its own shard; the init is chosen on rank 0 from a sample gathered from all ranks and
      broadcast; sums, counts and the objective are all-reduced every iteration, so every rank holds
      the same centroids_. labels_ are for the local shard; inertia_ and history_ are global.

    Attributes after fit: centroids_ (K, d) float32, labels_ (n_local,) int64, inertia_ (float,
    final objective over all points), history_ (list of float, the objective of each iteration of
    the kept run), n_iter_ (iterations run), iteration_times_ (seconds per iteration).
    """

    def __init__(
        self,
        n_clusters: int,
        *,
        n_iter: int = 20,
        metric: str = "l2",
        init: str | torch.Tensor = "k-means++",
        n_redo: int = 1,
        seed: int = 0,
        max_points_per_centroid: int = 256,
        tol: float | None = 1e-4,
        backend: str = "auto",
        group: dist.ProcessGroup | None = None,
        verbose: bool = False,
    ) -> None:
        if not _is_int(n_clusters) or n_clusters < 1:
            raise ValueError(f"n_clusters: expected an int >= 1, got {n_clusters!r}")
        if not _is_int(n_iter) or n_iter < 0:
            raise ValueError(f"n_iter: expected an int >= 0, got {n_iter!r}")
        if metric not in METRICS:
            raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
        if isinstance(init, torch.Tensor):
            if init.dim() != 2 or init.shape[0] != n_clusters or not init.is_floating_point():
                raise ValueError(f"init: expected a floating ({n_clusters}, d) tensor, got {tuple(init.shape)} {init.dtype}")
            if init.shape[1] == 0:
                raise ValueError(f"init: expected a ({n_clusters}, d) tensor with d >= 1, got {tuple(init.shape)}")
            checks.finite("init", init)
        elif init not in INITS:
            raise ValueError(f"init: expected one of {INITS} or a (K, d) tensor, got {init!r}")
        if not _is_int(n_redo) or n_redo < 1:
            raise ValueError(f"n_redo: expected an int >= 1, got {n_redo!r}")
        if not _is_int(max_points_per_centroid) or max_points_per_centroid < 1:
            raise ValueError(f"max_points_per_centroid: expected an int >= 1, got {max_points_per_centroid!r}")
        if tol is not None and not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and tol >= 0):
            raise ValueError(f"tol: expected a float >= 0 or None, got {tol!r}")
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if not _is_int(seed):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        self.n_clusters = n_clusters
        self.n_iter = n_iter
        self.metric = metric
        self.init = init
        self.n_redo = n_redo
        self.seed = int(seed)
        self.max_points_per_centroid = max_points_per_centroid
        self.tol = None if tol is None else float(tol)
        self.backend = backend
        self.group = group
        self.verbose = verbose

    # ---- helpers ----------------------------------------------------------------------------

    def _check_compiled_dtype(self, x: torch.Tensor) -> None:
        # the op would say the same, but only once the iterations start; fit's and predict's argument is x
        if self.backend == "compiled" and x.dtype == torch.float64:
            raise ValueError(
                "x: KMeans(backend='compiled') has no float64 kernel (the kernels compute in float32), got dtype "
                "torch.float64; use backend='reference' or 'auto' for an exact float64 result, or pass float32"
            )

    def _op_backend(self) -> str:
        return "auto" if self.backend in ("auto", "faiss") else self.backend

    def _log(self, msg: str) -> None:
        if self.verbose and pdist.rank(self.group) == 0:
            print(f"[kmeans] {msg}", flush=True)

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate (m_r, d) from every rank in rank order (m_r may differ)."""
        if not pdist.is_distributed(self.group):
            return rows
        w = pdist.world_size(self.group)
        sizes = torch.zeros(w, dtype=torch.long, device=rows.device)
        sizes[pdist.rank(self.group)] = rows.shape[0]
        pdist.all_reduce_sum(sizes, self.group)
        padded = rows.new_zeros((int(sizes.max()), rows.shape[1]))
        padded[: rows.shape[0]] = rows
        gathered = pdist.all_gather_no_grad(padded, self.group).view(w, -1, rows.shape[1])
        return torch.cat([gathered[r, : int(sizes[r])] for r in range(w)])

    def _init_centroids(
        self, xs: torch.Tensor, ws: torch.Tensor | None, n_sub_total: int, generator: torch.Generator
    ) -> torch.Tensor:
        k, d = self.n_clusters, xs.shape[1]
        if isinstance(self.init, torch.Tensor):
            c = self.init.detach().to(device=xs.device, dtype=torch.float32).clone()
        else:
            # Every rank contributes its share of one global init sample; rank 0 seeds from it.
            sample = min(n_sub_total, max(KMEANSPP_MIN_SAMPLE, 4 * k))
            quota = min(xs.shape[0], math.ceil(sample * xs.shape[0] / n_sub_total))
            pick = torch.randperm(xs.shape[0], generator=generator)[:quota].to(xs.device)
            xi = self._gather_rows(xs[pick].float())
            wi = None if ws is None else self._gather_rows(ws[pick].float()[:, None])[:, 0]
            if self.metric == "cosine":
                xi = _normalize(xi)
            c = torch.empty((k, d), dtype=torch.float32, device=xs.device)
            if pdist.rank(self.group) == 0:
                if self.init == "random":
                    c = xi[torch.randperm(xi.shape[0], generator=generator)[:k].to(xs.device)].clone()
                else:
                    c = kmeans_plusplus(xi, k, generator, wi)
        if self.metric == "cosine":
            c = _normalize(c)
        return pdist.broadcast(c.contiguous(), 0, self.group)

    # ---- fit / predict ------------------------------------------------------------------------

    def fit(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> "KMeans":
        """Cluster x (n_local, d) float32/bfloat16/float16 (this rank's shard), with optional
        non-negative (n_local,) weights. Returns self. float64 x runs the exact reference with
        backend "auto"/"reference"; with "compiled" it is a ValueError naming x, raised before any work."""
        x = checks.float_matrix("x", x)
        self._check_compiled_dtype(x)
        checks.finite("x", x)
        if weights is not None:
            weights = checks.weights_vector("weights", weights, x.shape[0], x)
        k, d = self.n_clusters, x.shape[1]
        if isinstance(self.init, torch.Tensor) and self.init.shape[1] != d:
            raise ValueError(f"init: expected shape ({k}, {d}) to match x, got {tuple(self.init.shape)}")
        n_total = int(pdist.all_reduce_sum(torch.tensor([x.shape[0]], device=x.device), self.group))
        if n_total < k:
            raise ValueError(f"x: expected at least n_clusters={k} points (over all ranks), got {n_total}")
        if weights is not None and float(pdist.all_reduce_sum(weights.double().sum().reshape(1), self.group)) <= 0:
            raise ValueError("weights: expected a positive total weight, got 0")
        if self.backend == "faiss":
            return self._fit_faiss(x, weights)

        best = None
        for redo in range(self.n_redo):
            run = self._fit_once(x, weights, n_total, self.seed + redo)
            self._log(f"run {redo}: inertia {run['inertia']:.6g}")
            if best is None or run["inertia"] < best["inertia"]:
                best = run
        self.centroids_ = best["centroids"]
        self.labels_ = best["labels"]
        self.inertia_ = best["inertia"]
        self.history_ = best["history"]
        self.n_iter_ = best["n_iter"]
        self.iteration_times_ = best["times"]
        return self

    def _fit_once(self, x: torch.Tensor, weights: torch.Tensor | None, n_total: int, seed: int) -> dict:
        k = self.n_clusters
        backend = self._op_backend()
        generator = torch.Generator().manual_seed(seed * 1_000_003 + pdist.rank(self.group))
        limit = self.max_points_per_centroid * k
        xs, ws = x, weights
        if n_total > limit:
            m = min(x.shape[0], math.ceil(limit * x.shape[0] / n_total))
            keep = torch.randperm(x.shape[0], generator=generator)[:m].to(x.device)
            xs, ws = x[keep], None if weights is None else weights[keep]
            self._log(f"subsampling {limit} of {n_total} points for the iterations")
        n_sub_total = int(pdist.all_reduce_sum(torch.tensor([xs.shape[0]], device=x.device), self.group))
        centroids = self._init_centroids(xs, ws, n_sub_total, generator)

        history: list[float] = []
        times: list[float] = []
        n_iter = 0
        for it in range(self.n_iter):
            t0 = time.perf_counter()
            _, score, sums, counts = _assign_with_sums(xs, centroids, ws, self.metric, backend)
            packed = torch.cat([sums.flatten(), counts])
            obj = _objective(score, ws, self.metric).reshape(1)
            pdist.all_reduce_sum(packed, self.group)
            pdist.all_reduce_sum(obj, self.group)
            sums, counts = packed[:-k].view_as(sums), packed[-k:].clone()
            filled = counts > 0
            new = centroids.clone()
            new[filled] = sums[filled] / counts[filled, None]
            nsplit = split_empty_clusters(new, counts)
            if self.metric == "cosine":
                new = _normalize(new)
            centroids = new
            history.append(float(obj))
            times.append(time.perf_counter() - t0)
            n_iter = it + 1
            self._log(f"iter {it:3d}  objective {history[-1]:.6g}  time {times[-1]:.3f}s" + (f"  split {nsplit}" if nsplit else ""))
            if self.tol is not None and it > 0 and history[-2] - history[-1] <= self.tol * abs(history[-2]):
                break

        # Final full pass: labels of every local point, objective over all points of all ranks.
        labels, score, _, _ = _assign_with_sums(x, centroids, weights, self.metric, backend)
        inertia = float(pdist.all_reduce_sum(_objective(score, weights, self.metric).reshape(1), self.group))
        return {"centroids": centroids, "labels": labels, "inertia": inertia, "history": history,
                "n_iter": n_iter, "times": times}

    def _fit_faiss(self, x: torch.Tensor, weights: torch.Tensor | None) -> "KMeans":
        try:
            import faiss
        except ImportError as exc:  # pragma: no cover - faiss is a test dependency
            raise RuntimeError("KMeans(backend='faiss') needs faiss-cpu or faiss-gpu installed") from exc
        if pdist.is_distributed(self.group):
            raise ValueError("backend: 'faiss' clusters one process's points; use 'auto' under torch.distributed")
        k, d = self.n_clusters, x.shape[1]
        xf = x.detach().float()
        if self.metric == "cosine":
            xf = _normalize(xf)
        xn = xf.cpu().numpy()
        wn = None if weights is None else weights.detach().float().cpu().numpy()
        use_gpu = x.is_cuda and hasattr(faiss, "StandardGpuResources")
        best = None
        for redo in range(self.n_redo):
            init = None
            if isinstance(self.init, torch.Tensor) or self.init == "k-means++":
                # faiss seeds at random; for the other inits we seed here and hand it the centroids.
                gen = torch.Generator().manual_seed(self.seed + redo)
                init = self._init_centroids(xf, weights, x.shape[0], gen).cpu().numpy()
            km = faiss.Kmeans(d, k, niter=max(self.n_iter, 1), nredo=1, seed=self.seed + redo, verbose=self.verbose,
                              spherical=self.metric == "cosine", max_points_per_centroid=self.max_points_per_centroid,
                              min_points_per_centroid=1, gpu=bool(use_gpu))
            km.train(xn, weights=wn, init_centroids=init)
            stats = km.iteration_stats
            # faiss reports sum of squared distances (l2) or of similarities (spherical, IP index).
            hist = [float(s["obj"]) for s in stats]
            if self.metric == "cosine":
                total = float(wn.sum()) if wn is not None else float(min(xn.shape[0], self.max_points_per_centroid * k))
                hist = [2.0 * total - 2.0 * h for h in hist]
            centroids = torch.from_numpy(km.centroids.copy()).to(x.device)
            labels, score, _, _ = _assign_with_sums(x, centroids, weights, self.metric, self._op_backend())
            run = {"centroids": centroids, "labels": labels, "inertia": float(_objective(score, weights, self.metric)),
                   "history": hist, "n_iter": len(stats),
                   "times": [b["time"] - a["time"] for a, b in zip([{"time": 0.0}] + stats[:-1], stats)]}
            if best is None or run["inertia"] < best["inertia"]:
                best = run
        self.centroids_, self.labels_, self.inertia_ = best["centroids"], best["labels"], best["inertia"]
        self.history_, self.n_iter_, self.iteration_times_ = best["history"], best["n_iter"], best["times"]
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Index (n,) int64 of the nearest (l2) / most similar (cosine) centroid of each row of x."""
        if not hasattr(self, "centroids_"):
            raise RuntimeError("KMeans.predict: call fit first")
        x = checks.float_matrix("x", x)
        self._check_compiled_dtype(x)
        if x.shape[1] != self.centroids_.shape[1]:
            raise ValueError(f"x: expected feature size {self.centroids_.shape[1]} (as the centroids), got {tuple(x.shape)}")
        return kmeans_update(x, self.centroids_.to(x.device), metric=self.metric, backend=self._op_backend())[0]

    def fit_predict(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """fit(x, weights) and return labels_ (n_local,) int64."""
        return self.fit(x, weights).labels_


def _assign_with_sums(x, centroids, weights, metric, backend):
    # The points were validated once in fit(): the passes skip the per-call value checks (a device
    # synchronisation each on a GPU). Centroids are means of finite points.
    with skip_value_checks():
        return kmeans_update(x, centroids, metric=metric, weights=weights, backend=backend)
