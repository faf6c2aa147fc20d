"""KMeans driver: blobs recovered exactly, parity with faiss, empty clusters, determinism, multi-rank."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyprotoclip.cluster import KMeans, split_empty_clusters
from tests.utils import assert_close_verbose


def _blobs(n=1500, k=6, d=8, std=0.4, seed=0):
    from sklearn.datasets import make_blobs

    x, y = make_blobs(n_samples=n, centers=k, n_features=d, cluster_std=std, center_box=(-10, 10), random_state=seed)
    return torch.tensor(x, dtype=torch.float32), y


def _mixture(n=4000, k=20, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    return centers[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g)


def test_compiled_backend_on_float64_is_an_error_naming_fits_argument(monkeypatch):
    import inspect

    assert list(inspect.signature(KMeans.fit).parameters)[1] == "x"
    x = _mixture(n=200, k=4, d=4).double()
    calls = []
    with monkeypatch.context() as m, pytest.raises(
            ValueError, match=r"^x: KMeans\(backend='compiled'\) has no float64 kernel.*got dtype torch\.float64"):
        m.setattr(KMeans, "_init_centroids", lambda *a, **k: calls.append(1))
        KMeans(4, backend="compiled").fit(x)
    assert not calls  # raised before any work
    km = KMeans(4, backend="reference", n_iter=2).fit(x.float())
    km.backend = "compiled"
    with pytest.raises(ValueError, match=r"^x: KMeans\(backend='compiled'\)"):
        km.predict(x)
    assert KMeans(4, backend="auto", n_iter=2).fit(x).centroids_.shape == (4, 4)  # auto: the exact reference


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("backend", ["auto", "reference", "faiss"])
def test_recovers_blobs_exactly(metric, backend):
    from sklearn.cluster import KMeans as SKKMeans
    from sklearn.metrics import adjusted_rand_score

    x, y = _blobs()
    km = KMeans(6, metric=metric, backend=backend, seed=1).fit(x)
    sk = SKKMeans(6, n_init=3, random_state=0).fit(x.numpy())
    if metric == "l2":
        assert adjusted_rand_score(sk.labels_, km.labels_.numpy()) == 1.0
    else:  # blobs around the origin are not angular clusters: just check a sane partition
        assert len(set(km.labels_.tolist())) == 6
    assert km.centroids_.shape == (6, 8) and km.centroids_.dtype == torch.float32
    assert km.labels_.shape == (1500,) and km.labels_.dtype == torch.int64
    assert torch.equal(km.predict(x), km.labels_)
    assert km.n_iter_ == len(km.history_) >= 1


def test_inertia_matches_labels_and_history_decreases():
    x = _mixture()
    km = KMeans(20, n_iter=15, tol=0.0, init="random").fit(x)
    d2 = (x[:, None, :] - km.centroids_[None]).square().sum(-1)
    assert torch.equal(km.labels_, d2.argmin(1))
    assert abs(km.inertia_ - float(d2.min(1).values.double().sum())) <= 1e-4 * km.inertia_
    h = torch.tensor(km.history_)
    assert bool((h[1:] <= h[:-1] * (1 + 1e-6)).all()), km.history_  # Lloyd never increases the objective


def test_objective_within_one_percent_of_faiss():
    x = _mixture(n=6000, k=32, d=16, seed=3)
    ours = KMeans(32, n_iter=25, seed=0).fit(x)
    theirs = KMeans(32, n_iter=25, seed=0, backend="faiss", init="random").fit(x)
    assert ours.inertia_ <= 1.01 * theirs.inertia_, (ours.inertia_, theirs.inertia_)
    # From the same initial centroids both are the same Lloyd iterations.
    init = x[torch.randperm(6000, generator=torch.Generator().manual_seed(0))[:32]]
    a = KMeans(32, n_iter=10, tol=0.0, init=init).fit(x)
    b = KMeans(32, n_iter=10, tol=0.0, init=init, backend="faiss").fit(x)
    assert abs(a.inertia_ - b.inertia_) <= 1e-3 * b.inertia_, (a.inertia_, b.inertia_)


def test_cosine_centroids_are_unit_and_weights_matter():
    x = _mixture(n=2000, k=10, d=12)
    km = KMeans(10, metric="cosine").fit(x)
    assert_close_verbose(km.centroids_.norm(dim=1), torch.ones(10), atol=1e-5, name="norms")
    w = torch.ones(2000)
    w[:1000] = 0.0
    kw = KMeans(10, n_iter=5, seed=0).fit(x, weights=w)
    ku = KMeans(10, n_iter=5, seed=0).fit(x[1000:])
    assert abs(kw.inertia_ - ku.inertia_) <= 0.05 * ku.inertia_ or kw.inertia_ < ku.inertia_ * 1.5


def test_split_empty_clusters_like_faiss():
    c = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 0.0]])
    counts = torch.tensor([10.0, 30.0, 0.0])
    assert split_empty_clusters(c, counts) == 1
    eps = 1.0 / 1024
    assert_close_verbose(c[2], torch.tensor([4 * (1 + eps), 5 * (1 - eps), 6 * (1 + eps)]), atol=1e-6, name="new")
    assert_close_verbose(c[1], torch.tensor([4 * (1 - eps), 5 * (1 + eps), 6 * (1 - eps)]), atol=1e-6, name="old")
    assert counts.tolist() == [10.0, 15.0, 15.0]


def test_empty_cluster_recovery():
    x, _ = _blobs(n=600, k=3, d=4)
    # Two centroids far away from every point: both empty after the first assignment.
    init = torch.cat([x[:1], x[300:301], torch.full((2, 4), 1e3)])
    km = KMeans(4, n_iter=10, init=init, tol=0.0, verbose=True).fit(x)
    counts = torch.bincount(km.labels_, minlength=4)
    assert bool((counts > 0).all()), counts
    assert km.history_[-1] < km.history_[0]


def test_deterministic_for_a_seed():
    x = _mixture(n=3000, k=16, d=8)
    a = KMeans(16, seed=5, max_points_per_centroid=64).fit(x)  # 1024 of 3000 points: subsampled
    b = KMeans(16, seed=5, max_points_per_centroid=64).fit(x)
    c = KMeans(16, seed=6, max_points_per_centroid=64).fit(x)
    assert torch.equal(a.centroids_, b.centroids_) and torch.equal(a.labels_, b.labels_)
    assert a.history_ == b.history_
    assert not torch.equal(a.centroids_, c.centroids_)


def test_n_redo_keeps_the_best():
    x = _mixture(n=2000, k=12, d=6)
    runs = [KMeans(12, init="random", seed=s, n_iter=8).fit(x).inertia_ for s in range(3)]
    best = KMeans(12, init="random", seed=0, n_redo=3, n_iter=8).fit(x)
    assert best.inertia_ == pytest.approx(min(runs))


def test_bf16_points():
    x, y = _blobs(n=900, k=3, d=8)
    km = KMeans(3, seed=0).fit(x.bfloat16())
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(y, km.labels_.numpy()) == 1.0


@pytest.mark.parametrize("kwargs,match", [
    ({"n_clusters": 0}, "n_clusters"),
    ({"n_clusters": 3, "metric": "dot"}, "metric"),
    ({"n_clusters": 3, "init": "kmeans"}, "init"),
    ({"n_clusters": 3, "init": torch.zeros(2, 4)}, "init"),
    ({"n_clusters": 3, "backend": "sklearn"}, "backend"),
    ({"n_clusters": 3, "n_iter": -1}, "n_iter"),
    ({"n_clusters": 3, "max_points_per_centroid": 0}, "max_points_per_centroid"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KMeans(**kwargs)


def test_fit_errors():
    with pytest.raises(ValueError, match="x"):
        KMeans(5).fit(torch.randn(3, 2))  # fewer points than clusters
    with pytest.raises(ValueError, match="x"):
        KMeans(2).fit(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="weights"):
        KMeans(2).fit(torch.randn(4, 2), weights=-torch.ones(4))
    with pytest.raises(ValueError, match="x"):
        KMeans(2).fit(torch.randn(4, 2)).predict(torch.randn(4, 3))


def test_predict_few_points_against_more_centroids():
    km = KMeans(8, seed=0).fit(torch.randn(40, 2))
    x = km.centroids_[[5, 2, 7]] + 1e-4
    assert km.predict(x).tolist() == [5, 2, 7]


# ---- multi-rank (gloo) ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, x, init, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        shard = x.chunk(world)[rank]
        fixed = KMeans(init.shape[0], n_iter=8, tol=0.0, init=init, max_points_per_centroid=10_000).fit(shard)
        seeded = KMeans(init.shape[0], n_iter=3, seed=3).fit(shard)
        torch.save({"fixed": (fixed.centroids_, fixed.labels_, fixed.inertia_, fixed.history_),
                    "seeded": seeded.centroids_}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_fit_equals_single_process():
    x = _mixture(n=1200, k=8, d=6, seed=7)
    init = x[torch.randperm(1200, generator=torch.Generator().manual_seed(1))[:8]].clone()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_rank_main, args=(2, _free_port(), x, init, out_dir), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2))
    single = KMeans(8, n_iter=8, tol=0.0, init=init, max_points_per_centroid=10_000).fit(x)
    c0, l0, i0, h0 = r0["fixed"]
    c1, l1, i1, h1 = r1["fixed"]
    assert torch.equal(c0, c1), "ranks disagree on the centroids"
    assert torch.equal(r0["seeded"], r1["seeded"]), "ranks disagree with a rank-0 init"
    assert_close_verbose(c0, single.centroids_, atol=1e-5, name="centroids")
    assert torch.equal(torch.cat([l0, l1]), single.labels_)
    assert i0 == i1 and i0 == pytest.approx(single.inertia_, rel=1e-6)
    assert h0 == pytest.approx(single.history_, rel=1e-6)
