"""kmeans_update: kernels vs the float64 reference, the reference vs hand-computed values, errors,
opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

from pyprotoclip import _library
from pyprotoclip.ops import reference
from pyprotoclip.ops.kmeans import kmeans_update
from tests.conftest import DEVICES
from tests.utils import assert_close_verbose

COMPILED = "cpu" in _library.compiled_devices()
BACKENDS = ["reference"] + (["compiled"] if COMPILED else [])
needs_compiled = pytest.mark.skipif(not COMPILED, reason="pyprotoclip._C not built")


def _oracle_check(x, c, w, metric, out, *, margin):
    """Assignments equal the float64 oracle wherever its best and second-best differ by more than
    ``margin``; elsewhere the chosen centroid must be within ``margin`` of the best. Scores match
    the oracle's value for the chosen centroid; sums/counts match float64 sums over the kernel's own
    assignment (so a legitimate near-tie flip cannot fail the sum check)."""
    assign, score, sums, counts = out
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
    assert_close_verbose(score, want_score, atol=1e-4, rtol=1e-4, name="score")
    w64 = torch.ones(n, dtype=torch.float64) if w is None else w.double()
    want_sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, assign, x64 * w64[:, None])
    want_counts = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w64)
    assert_close_verbose(sums, want_sums, atol=1e-4, rtol=1e-5, name="sums")
    assert_close_verbose(counts, want_counts, atol=1e-4, rtol=1e-6, name="counts")
    assert assign.dtype == torch.int64 and score.dtype == sums.dtype == counts.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n,k,d", [(1, 1, 8), (7, 3, 5), (257, 13, 33), (1000, 100, 64)])
def test_matches_reference(backend, metric, weighted, n, k, d):
    x = torch.randn(n, d)
    c = torch.randn(k, d)
    if n > 10:
        x[:5] = c[:5]  # points sitting on centroids: distance 0 (clamped), similarity 1
        x[5:10] = x[10:15]  # duplicate points: same assignment
    w = torch.rand(n) * 3 if weighted else None
    out = kmeans_update(x, c, metric=metric, weights=w, backend=backend)
    _oracle_check(x, c, w, metric, out, margin=1e-4)
    if n > 15:
        assert torch.equal(out[0][5:10], out[0][10:15])


@needs_compiled
def test_large_k_running_argmin_and_threads():
    # k above the kernel's centroid block (8192) exercises the running argmin across blocks; rows
    # above one GEMM block exercise several row blocks and the parallel accumulation.
    torch.set_num_threads(2)
    x = torch.randn(1200, 4)
    c = torch.randn(8200, 4)
    c[8195] = x[0]  # exact hit in the second centroid block
    out = kmeans_update(x, c, backend="compiled")  # k > n: one shard of a sharded k-means
    _oracle_check(x, c, None, "l2", out, margin=1e-4)
    assert int(out[0][0]) == 8195


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_low_precision_inputs(backend, dtype, metric):
    x = torch.randn(300, 24).to(dtype)
    c = torch.randn(17, 24).to(dtype)
    out = kmeans_update(x, c, metric=metric, backend=backend)
    # The kernels accumulate in fp32 from the exactly representable low-precision values.
    _oracle_check(x.float(), c.float(), None, metric, out, margin=1e-4)


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


@needs_compiled
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(weighted):
    x, c = torch.randn(37, 9), torch.randn(5, 9)
    w = torch.rand(37) if weighted else None
    for metric in ("l2", "cosine"):
        torch.library.opcheck(torch.ops.pyprotoclip.kmeans_update.default, (x, c, w, metric))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    x, c = torch.randn(50, 8), torch.randn(4, 8)

    def f(x, c):
        assign, score, sums, counts = kmeans_update(x, c, backend=backend)
        return sums / counts.clamp_min(1)[:, None], score.sum(), assign

    eager = f(x, c)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(x, c)
    assert torch.equal(eager[2], compiled[2])
    assert_close_verbose(compiled[0], eager[0], atol=1e-6, name="centroids")


@pytest.mark.cuda
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(metric, dtype):
    x = torch.randn(3000, 64, device="cuda").to(dtype)
    c = torch.randn(9000, 64, device="cuda").to(dtype)[:300]
    w = torch.rand(3000, device="cuda")
    out = kmeans_update(x, c, metric=metric, weights=w, backend="compiled")
    # bf16 GEMMs on tensor cores: the margin for "clear" assignments is wider.
    margin = 1e-3 if dtype == torch.float32 else 5e-2
    _oracle_check(x.float().cpu(), c.float().cpu(), w.cpu(), metric, tuple(t.cpu() for t in out), margin=margin)
    assert "cuda" in DEVICES
