"""kmeans_update. The shared OpTester (tests/ops/op_tester.py) checks assignments, scores, sums and counts
against float64 over backend x device x dtype x shapes (weighted or not, l2 and cosine), opcheck,
torch.compile, autocast and CUDA graphs; this file adds the running arg-min across centroid blocks, ties,
hand-computed values, non-contiguous and mixed-dtype inputs and errors."""

from __future__ import annotations

import pytest
import torch

from pyprotoclip import _library
from pyprotoclip.ops import reference
from pyprotoclip.ops.kmeans import kmeans_update
from tests.ops.op_tester import CUDA, Case, OpTester, skip_unavailable
from tests.utils import assert_close_verbose

COMPILED = "cpu" in _library.compiled_devices()
needs_compiled = pytest.mark.skipif(not COMPILED, reason="pyprotoclip._C not built")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _oracle_check(x, c, w, metric, out, *, margin, score_atol=1e-4):
    """Assignments equal the float64 oracle wherever its best and second-best differ by more than
    ``margin``; elsewhere the chosen centroid must be within ``margin`` of the best. Scores match
    the oracle's value for the chosen centroid; sums/counts match float64 sums over the kernel's own
    assignment (so a legitimate near-tie flip cannot fail the sum check). Runs on the CPU."""
    assign, score, sums, counts = (t.cpu() for t in out)
    x, c, w = x.cpu(), c.cpu(), None if w is None else w.cpu()
    n, k = x.shape[0], c.shape[0]
    x64, c64 = x.double(), c.double()
    if metric == "cosine":
        x64 = torch.nn.functional.normalize(x64, dim=1, eps=1e-12)
        c64 = torch.nn.functional.normalize(c64, dim=1, eps=1e-12)
        table = -(x64 @ c64.t())  # lower is better, like distances
    else:
        table = torch.cdist(x64, c64).square()
    top = table.topk(min(2, k), dim=1, largest=False).values
    clear = (top[:, 1] - top[:, 0] > margin) if k > 1 else torch.ones(n, dtype=torch.bool)
    oracle_assign = table.argmin(1)
    assert torch.equal(assign[clear], oracle_assign[clear]), f"{int((assign[clear] != oracle_assign[clear]).sum())} clear assignments differ"
    chosen = table.gather(1, assign.view(-1, 1)).squeeze(1)
    assert bool((chosen - top[:, 0] <= margin).all()), "an assignment is not (near-)optimal"
    want_score = -chosen if metric == "cosine" else chosen
    assert_close_verbose(score, want_score, atol=score_atol, rtol=1e-4, name="score")
    w64 = torch.ones(n, dtype=torch.float64) if w is None else w.double()
    want_sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, assign, x64 * w64[:, None])
    want_counts = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w64)
    assert_close_verbose(sums, want_sums, atol=1e-4, rtol=1e-5, name="sums")
    assert_close_verbose(counts, want_counts, atol=1e-4, rtol=1e-6, name="counts")
    assert assign.dtype == torch.int64 and score.dtype == sums.dtype == counts.dtype == torch.float32


# ---- the shared op tester --------------------------------------------------------------------------


class KMeansUpdateTester(OpTester):
    """kmeans_update with one metric; shapes (n, k, d, weighted). Not differentiable."""

    metric = "l2"
    output_names = ("assign", "score", "sums", "counts")
    arg_names = ("x", "centroids")
    shapes = [(n, k, d, weighted) for n, k, d in [(1, 1, 8), (7, 3, 5), (257, 13, 33), (1000, 100, 64)]
              for weighted in (False, True)]
    small_shape = (50, 4, 8, True)
    differentiable = False
    test_gradcheck = None  # not differentiable
    deterministic_on_cuda = False  # the CUDA kernel adds sums and counts with atomics

    def make_case(self, shape, device, dtype):
        n, k, d, weighted = shape
        x, c = torch.randn(n, d, dtype=torch.float64), torch.randn(k, d, dtype=torch.float64)
        if n > 15:
            x[: min(k, 5)] = c[: min(k, 5)]  # points sitting on centroids: distance 0 (clamped), similarity 1
            x[5:10] = x[10:15]  # duplicate points: same assignment
        w = torch.rand(n, device=device) * 3 if weighted else None
        return Case([x.to(device, dtype), c.to(device, dtype)], {"weights": w})

    def fn(self, x, c, *, backend, weights):
        return kmeans_update(x, c, metric=self.metric, weights=weights, backend=backend)

    def expected_fn(self, x, c, *, weights):
        return reference.kmeans_update(x, c, weights, self.metric)

    def check(self, got, oracle, same_dtype_ref, *, case, dtype, backend, device):
        # the float64 oracle decides only clear assignments (near-ties may go either way); see _oracle_check
        x, c = case.args
        low_precision_cuda = device == "cuda" and dtype not in (torch.float32, torch.float64)
        # CUDA: cuBLAS sums in another order (fp32); bf16/fp16 cosine rounds the normalised centroids to bf16/fp16
        margin = 5e-2 if low_precision_cuda else 1e-3 if device == "cuda" else 1e-4
        score_atol = 5e-3 if low_precision_cuda and self.metric == "cosine" else 1e-4
        _oracle_check(x.float(), c.float(), case.kwargs["weights"], self.metric, got, margin=margin,
                      score_atol=score_atol)
        if x.shape[0] > 15 and device == "cpu":  # (cuBLAS does not promise equal bits for equal rows)
            assert torch.equal(got[0][5:10], got[0][10:15]), "duplicate points, different assignments"

    def opcheck_cases(self, device):
        x, c = self.make_case(self.small_shape, device, torch.float32).args
        w = torch.rand(x.shape[0], device=device)
        op = torch.ops.pyprotoclip.kmeans_update.default
        return [(op, (x, c, weights, self.metric)) for weights in (None, w)]


class TestKMeansUpdateL2(KMeansUpdateTester):
    metric = "l2"


class TestKMeansUpdateCosine(KMeansUpdateTester):
    metric = "cosine"


# ---- cases the tester does not cover -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_large_k_running_argmin_and_threads(device):
    # k above the kernel's centroid block (CPU 512, CUDA 65536) exercises the running argmin across
    # blocks; rows above one tile (CPU 256) exercise several tiles and the parallel accumulation.
    skip_unavailable("compiled", device)
    torch.set_num_threads(2)
    block = 512 if device == "cpu" else 65536
    x = torch.randn(1200, 4, device=device)
    c = torch.randn(block + 8, 4, device=device)
    c[block + 3] = x[0]  # exact hit in the second centroid block
    c[block + 5] = c[2] = x[1] + 1e-3  # the same centroid in both blocks: the first block's index wins
    out = kmeans_update(x, c, backend="compiled")  # k > n: one shard of a sharded k-means
    _oracle_check(x, c, None, "l2", out, margin=1e-4 if device == "cpu" else 1e-3)
    assert int(out[0][0]) == block + 3
    assert int(out[0][1]) == 2


def _with_threads(threads, fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        return fn()
    finally:
        torch.set_num_threads(before)


@needs_compiled
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d,dtype", [
    (3000, 1100, 16, torch.float32),    # several tiles, three centroid blocks
    (200, 5000, 16, torch.float32),     # one tile, ten blocks: the blocks are split over the threads
    (200, 300, 16, torch.float32),      # one task: run inline, outside the parallel region
    (4500, 600, 1000, torch.bfloat16),  # a converted (bf16 -> fp32) x in row blocks of 4352 rows at 1 thread
])
def test_cpu_results_do_not_depend_on_the_thread_count(metric, n, k, d, dtype):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(n, d, generator=g).to(dtype), torch.randn(k, d, generator=g)
    c[k - 3] = x[0].float()  # an exact hit in the last block
    w = torch.rand(n, generator=g)
    outs = [_with_threads(t, lambda: kmeans_update(x, c, metric=metric, weights=w, backend="compiled")) for t in (1, 2, 3, 4)]
    for got in outs[1:]:
        for name, a, b in zip(("assign", "score", "sums", "counts"), outs[0], got):
            assert torch.equal(a, b), name
    assert int(outs[0][0][0]) == k - 3
    # the l2 score is |x|^2 + |c|^2 - 2 x.c in fp32: an absolute error ~ eps |x|^2 (~1e-3 at d=2048), seen
    # where the distance is ~0 (the exact hit)
    _oracle_check(x.float(), c, w, metric, outs[0], margin=1e-3, score_atol=1e-4 * max(1, d // 128))


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_that_require_grad(device):
    # prototypes as an nn.Parameter: the kernels' GEMMs write into buffers (out=), which autograd refuses for
    # inputs that need grad, on the caller's thread and in parallel_for's workers alike
    skip_unavailable("compiled", device)
    x, c = torch.randn(600, 8, device=device), torch.randn(16, 8, device=device)
    for metric in ("l2", "cosine"):
        want = kmeans_update(x, c, metric=metric, backend="reference")[0]
        for xg, cg in ((x, c.clone().requires_grad_()), (x.clone().requires_grad_(), c)):
            got = _with_threads(2, lambda: kmeans_update(xg, cg, metric=metric, backend="compiled"))
            assert torch.equal(got[0], want) and not any(t.requires_grad for t in got), metric
            direct = _with_threads(2, lambda: torch.ops.pyprotoclip.kmeans_update(xg, cg, None, metric))
            assert torch.equal(direct[0], want), metric  # the raw op too, outside no_grad


@needs_compiled
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_direct_op_nan_scores_never_win(metric):
    # the public call rejects NaN; the raw op must still skip NaN scores: a NaN centroid in the first
    # block never wins, and a point whose every score is NaN keeps centroid 0
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(700, 8, generator=g), torch.randn(1030, 8, generator=g)
    c[1] = float("nan")
    x[300] = float("nan")
    assign = _with_threads(2, lambda: torch.ops.pyprotoclip.kmeans_update(x, c, None, metric)[0])
    assert int(assign[300]) == 0
    assert not bool((assign == 1).any())
    keep = torch.ones(700, dtype=torch.bool)
    keep[300] = False
    want = kmeans_update(x[keep], torch.cat([c[:1], c[2:]]), metric=metric, backend="reference")[0]
    want = want + (want >= 1).long()  # indices after the removed centroid 1
    assert torch.equal(assign[keep], want)


@needs_compiled
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_centroid_groups_merge_to_the_first_extremum(metric):
    # 200 points (one tile) and 3 centroid blocks: on 2-3 threads the blocks are split into groups whose
    # results are merged; a tie across groups goes to the lower index, NaN scores never win
    g = torch.Generator().manual_seed(4)
    x, c = torch.randn(200, 8, generator=g), torch.randn(1300, 8, generator=g)
    c[7] = c[1290] = x[0]  # the same centroid, an exact hit, in the first and the last block
    c[600] = float("nan")      # a NaN centroid in a later group
    x[5] = float("nan")        # a point whose every score is NaN
    outs = [_with_threads(t, lambda: torch.ops.pyprotoclip.kmeans_update(x, c, None, metric)) for t in (1, 2, 3)]
    for got in outs[1:]:
        assert torch.equal(got[0], outs[0][0])
    assign = outs[0][0]
    assert int(assign[0]) == 7 and int(assign[5]) == 0 and not bool((assign == 600).any())
    keep = torch.arange(200) != 5
    clean = torch.cat([c[:600], c[601:]])
    want = kmeans_update(x[keep], clean, metric=metric, backend="reference")[0]
    assert torch.equal(assign[keep], want + (want >= 600).long())


@needs_compiled
def test_ties_go_to_lowest_index():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    c = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    for backend in ("compiled", "reference"):
        assign = kmeans_update(x, c, backend=backend)[0]
        # x0 ties 2/3 at 0; x1, x2 are at distance 1 from all four: the first wins.
        assert assign.tolist() == [2, 0, 0, 2], backend


def test_reference_by_hand():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [0.0, 3.0]])
    c = torch.tensor([[1.0, 0.0], [10.0, 1.0]])
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    assign, score, sums, counts = reference.kmeans_update(x, c, w, "l2")
    assert assign.tolist() == [0, 0, 1, 0]
    assert_close_verbose(score, torch.tensor([1.0, 1.0, 1.0, 10.0]), atol=1e-6, name="score")
    assert_close_verbose(sums, torch.tensor([[4.0, 3.0], [5.0, 0.0]]), atol=1e-6, name="sums")
    assert_close_verbose(counts, torch.tensor([4.0, 0.5]), atol=1e-6, name="counts")
    # cosine: similarities of the normalised vectors; sums of the normalised points
    assign, score, sums, counts = reference.kmeans_update(x[1:], c, None, "cosine")
    assert assign.tolist() == [0, 0, 1]
    assert_close_verbose(score, torch.tensor([1.0, 1.0, 1.0 / 101.0**0.5]), atol=1e-6, name="cos score")
    assert_close_verbose(sums, torch.tensor([[2.0, 0.0], [0.0, 1.0]]), atol=1e-6, name="cos sums")


@needs_compiled
def test_non_contiguous_and_fp32_centroids_with_bf16_points():
    base = torch.randn(40, 50)
    x = base.t()[:, :40]  # (50, 40) non-contiguous
    c = torch.randn(6, 40)
    out = kmeans_update(x, c, backend="compiled")
    _oracle_check(x, c, None, "l2", out, margin=1e-4)
    xb, cf = torch.randn(64, 16).bfloat16(), torch.randn(5, 16)
    out = kmeans_update(xb, cf, backend="compiled")
    _oracle_check(xb.float(), cf, None, "l2", out, margin=1e-4)


@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(6, 4), torch.randn(2, 3), {}), "centroids"),          # d mismatch
    (lambda: (torch.randn(0, 4), torch.randn(1, 4), {}), "x"),                  # empty
    (lambda: (torch.randn(6, 0), torch.randn(1, 0), {}), "x"),                  # empty features
    (lambda: (torch.tensor([[float("nan"), 0.0]] * 3), torch.randn(1, 2), {}), "x"),
    (lambda: (torch.randn(3, 2), torch.tensor([[float("inf"), 0.0]]), {}), "centroids"),
    (lambda: (torch.randn(3, 2), torch.randn(1, 2), {"weights": torch.ones(2)}), "weights"),
    (lambda: (torch.randn(3, 2), torch.randn(1, 2), {"weights": -torch.ones(3)}), "weights"),
    (lambda: (torch.randn(3, 2), torch.randn(1, 2), {"weights": torch.ones(3, 1)}), "weights"),
    (lambda: (torch.randn(3, 2), torch.randn(1, 2), {"metric": "dot"}), "metric"),
    (lambda: (torch.randn(3), torch.randn(1, 2), {}), "x"),
    (lambda: (torch.randint(0, 3, (3, 2)), torch.randn(1, 2), {}), "x"),
])
def test_errors(make, match):
    x, c, kw = make()
    with pytest.raises(ValueError, match=match):
        kmeans_update(x, c, **kw)


@needs_compiled
def test_direct_op_checks_bounds():
    with pytest.raises(RuntimeError, match="weights"):
        torch.ops.pyprotoclip.kmeans_update(torch.randn(3, 2), torch.randn(1, 2), torch.ones(2), "l2")
    with pytest.raises(RuntimeError, match="metric"):
        torch.ops.pyprotoclip.kmeans_update(torch.randn(3, 2), torch.randn(1, 2), None, "dot")
