"""Direct ``torch.ops.pyprotoclip.*`` calls (no Python validation in front) with bad shapes, dtypes and
out-of-range targets: every one must fail with the kernels' own check (csrc/<stem>_checks.h, shared by the
CPU and CUDA kernels), a RuntimeError naming the argument, and never read or write out of bounds. Edge
cases that are valid (no rows, K > N, NaN points) must return in-range results of the right shape.

The checks that read values (target ranges, temperature > 0) run for CPU tensors only (on CUDA they would
synchronise; the Python API validates there), so this file runs on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from pyprotoclip import _library

pytestmark = pytest.mark.skipif("cpu" not in _library.compiled_devices(), reason="pyprotoclip._C has no CPU kernels")

ops = torch.ops.pyprotoclip if "cpu" in _library.compiled_devices() else None


def _t(v):
    return torch.tensor(v)


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


N, M, K, D = 4, 6, 5, 8


def _similarity_cases():
    q, k, t, s = _r(N, D), _r(M, D), torch.arange(N), _t(2.0)
    lse = torch.zeros(N)
    return [
        ("q", lambda: ops.similarity_cross_entropy(_r(D), k, t, s)),
        ("k", lambda: ops.similarity_cross_entropy(q, _r(M), t, s)),
        ("k", lambda: ops.similarity_cross_entropy(q, _r(M, D + 1), t, s)),
        ("k", lambda: ops.similarity_cross_entropy(q, k.half(), t, s)),
        ("q", lambda: ops.similarity_cross_entropy(q.long(), k.long(), t, s)),
        ("scale", lambda: ops.similarity_cross_entropy(q, k, t, _t([1.0, 2.0]))),
        ("scale", lambda: ops.similarity_cross_entropy(q, k, t, _t(2))),
        ("scale", lambda: ops.similarity_cross_entropy(q, k, t, torch.zeros(0))),
        ("targets", lambda: ops.similarity_cross_entropy(q, k, t[:-1], s)),
        ("targets", lambda: ops.similarity_cross_entropy(q, k, t.view(N, 1), s)),
        ("targets", lambda: ops.similarity_cross_entropy(q, k, t.int(), s)),
        ("targets", lambda: ops.similarity_cross_entropy(q, k, _t([0, 1, 2, M]), s)),
        ("targets", lambda: ops.similarity_cross_entropy(q, k, _t([0, -1, 2, 3]), s)),
        ("targets", lambda: ops.similarity_cross_entropy(q, _r(0, D), t, s)),  # no columns at all
        ("grad_loss", lambda: ops._similarity_cross_entropy_backward(torch.ones(N - 1), q, k, t, s, lse)),
        ("lse", lambda: ops._similarity_cross_entropy_backward(torch.ones(N), q, k, t, s, lse[:1])),
        ("targets", lambda: ops._similarity_cross_entropy_backward(torch.ones(N), q, k, _t([0, 1, 2, M]), s, lse)),
        ("k", lambda: ops.symmetric_similarity_cross_entropy(q, k, s)),  # rows differ
        ("k", lambda: ops.symmetric_similarity_cross_entropy(q, _r(N, D + 1), s)),
        ("scale", lambda: ops.symmetric_similarity_cross_entropy(q, q, _t([1.0, 2.0]))),
        ("grads", lambda: ops._symmetric_similarity_cross_entropy_backward(
            torch.ones(N - 1), torch.ones(N), q, q, s, lse, lse)),
        ("lse", lambda: ops._symmetric_similarity_cross_entropy_backward(
            torch.ones(N), torch.ones(N), q, q, s, lse, lse[:2])),
        ("k", lambda: ops._symmetric_similarity_cross_entropy_backward(
            torch.ones(N), torch.ones(N), q, k, s, lse, lse)),
    ]


def _proto_cases():
    f, p, tau = _r(N, D), _r(K, D), _t(0.1)
    idx, probs = torch.arange(N) % K, torch.full((N, K), 1.0 / K)
    tf, tc, tt = _r(N, 3), _r(K, 3), _t(0.5)
    lse = torch.zeros(N)
    loss = ops.proto_softmax_loss

    def back(grad_loss, grad_lse, targets, lse_, teacher_lse):
        return ops._proto_softmax_loss_backward(grad_loss, grad_lse, f, p, tau, *targets, lse_, teacher_lse,
                                                [True, True, True])

    hard, teacher = (idx, None, None, None, None), (None, None, tf, tc, tt)
    return [
        ("features", lambda: loss(_r(D), p, tau, idx, None, None, None, None)),
        ("prototypes", lambda: loss(f, _r(K), tau, idx, None, None, None, None)),
        ("prototypes", lambda: loss(f, _r(K, D + 1), tau, idx, None, None, None, None)),
        ("prototypes", lambda: loss(f, p.double(), tau, idx, None, None, None, None)),
        ("prototypes", lambda: loss(f, _r(0, D), tau, None, torch.zeros(N, 0), None, None, None)),
        ("features", lambda: loss(f.long(), p.long(), tau, idx, None, None, None, None)),
        ("temperature", lambda: loss(f, p, _t([0.1, 0.2]), idx, None, None, None, None)),
        ("temperature", lambda: loss(f, p, _t(0.0), idx, None, None, None, None)),
        ("temperature", lambda: loss(f, p, _t(-0.1), idx, None, None, None, None)),
        ("temperature", lambda: loss(f, p, _t(float("nan")), idx, None, None, None, None)),
        ("temperature", lambda: loss(f, p, _t(1), idx, None, None, None, None)),
        ("target_index", lambda: loss(f, p, tau, None, None, None, None, None)),
        ("target_index", lambda: loss(f, p, tau, idx, probs, None, None, None)),
        ("target_index", lambda: loss(f, p, tau, _t([0, 1, 2, K]), None, None, None, None)),
        ("target_index", lambda: loss(f, p, tau, _t([0, -1, 2, 3]), None, None, None, None)),
        ("target_index", lambda: loss(f, p, tau, idx[:-1], None, None, None, None)),
        ("target_index", lambda: loss(f, p, tau, idx.int(), None, None, None, None)),
        ("target_probs", lambda: loss(f, p, tau, None, probs[:, :-1], None, None, None)),
        ("target_probs", lambda: loss(f, p, tau, None, probs[:-1], None, None, None)),
        ("target_probs", lambda: loss(f, p, tau, None, probs.long(), None, None, None)),
        ("teacher_features", lambda: loss(f, p, tau, None, None, tf[:-1], tc, tt)),
        ("teacher_features", lambda: loss(f, p, tau, None, None, tf.long(), tc.long(), tt)),
        ("teacher_prototypes", lambda: loss(f, p, tau, None, None, tf, tc[:-1], tt)),
        ("teacher_prototypes", lambda: loss(f, p, tau, None, None, tf, _r(K, 4), tt)),
        ("teacher_prototypes", lambda: loss(f, p, tau, None, None, tf, tc.double(), tt)),
        ("teacher_prototypes", lambda: loss(f, p, tau, None, None, tf, None, tt)),
        ("teacher_prototypes", lambda: loss(f, p, tau, None, None, tf, tc, None)),
        ("teacher_temperature", lambda: loss(f, p, tau, None, None, tf, tc, _t(0.0))),
        ("teacher_temperature", lambda: loss(f, p, tau, None, None, tf, tc, _t(float("inf")))),
        ("teacher_temperature", lambda: loss(f, p, tau, None, None, tf, tc, _t([0.5, 0.5]))),
        ("grad_loss", lambda: back(torch.ones(N - 1), None, hard, lse, torch.zeros(0))),
        ("lse", lambda: back(torch.ones(N), None, hard, lse[:1], torch.zeros(0))),
        ("grad_lse", lambda: back(torch.ones(N), torch.ones(2), hard, lse, torch.zeros(0))),
        ("teacher_lse", lambda: back(torch.ones(N), None, teacher, lse, torch.zeros(1))),
        ("target_index", lambda: back(torch.ones(N), None, (_t([0, 1, 2, K]), None, None, None, None), lse,
                                      torch.zeros(0))),
        ("temperature", lambda: ops.proto_assign(f, p, _t(0.0))),
        ("prototypes", lambda: ops.proto_assign(f, _r(0, D), tau)),
        ("prototypes", lambda: ops.proto_assign(f, _r(K, D - 1), tau)),
        ("k", lambda: ops.proto_assign_topk(f, p, tau, 0)),
        ("k", lambda: ops.proto_assign_topk(f, p, tau, K + 1)),
        ("k", lambda: ops.proto_assign_topk(f, p, tau, -3)),
        ("temperature", lambda: ops.proto_assign_topk(f, p, _t(-1.0), 2)),
        ("grad_probs", lambda: ops._proto_assign_backward(torch.ones(N, K - 1), f, p, tau, [True, True, True])),
        ("grad_probs", lambda: ops._proto_assign_backward(torch.ones(N * K), f, p, tau, [True, True, True])),
    ]


def _kmeans_cases():
    x, c = _r(N, D), _r(K, D)
    return [
        ("x", lambda: ops.kmeans_update(_r(D), c, None, "l2")),
        ("centroids", lambda: ops.kmeans_update(x, _r(K), None, "l2")),
        ("centroids", lambda: ops.kmeans_update(x, _r(K, D + 1), None, "l2")),
        ("centroids", lambda: ops.kmeans_update(x, _r(0, D), None, "l2")),
        ("centroids", lambda: ops.kmeans_update(x, c.long(), None, "cosine")),
        ("x", lambda: ops.kmeans_update(x.long(), c, None, "l2")),
        ("weights", lambda: ops.kmeans_update(x, c, torch.ones(N + 1), "l2")),
        ("weights", lambda: ops.kmeans_update(x, c, torch.ones(N, 1), "l2")),
        ("weights", lambda: ops.kmeans_update(x, c, torch.ones(N, dtype=torch.int64), "l2")),
        ("metric", lambda: ops.kmeans_update(x, c, None, "dot")),
        ("metric", lambda: ops.kmeans_update(x, c, None, "")),
    ]


CASES = [("similarity", *c) for c in _similarity_cases()] + [("proto", *c) for c in _proto_cases()] + [
    ("kmeans", *c) for c in _kmeans_cases()]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{i}-{c[1]}" for i, c in enumerate(CASES)])
def test_direct_call_rejects_bad_input(case):
    stem, name, call = CASES[case]
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        call()


def test_direct_calls_valid_edges_stay_in_range():
    """No rows, K > N, NaN points and a zero-stride (expanded) input: results of the right shape, indices in range."""
    s, tau = torch.tensor(2.0), torch.tensor(0.5)
    loss, lse = ops.similarity_cross_entropy(_r(0, D), _r(M, D), torch.zeros(0, dtype=torch.int64), s)
    assert loss.shape == lse.shape == (0,)
    rows = ops.symmetric_similarity_cross_entropy(_r(0, D), _r(0, D), s)
    assert all(r.shape == (0,) for r in rows)
    values, indices = ops.proto_assign_topk(_r(0, D), _r(K, D), tau, K)
    assert values.shape == indices.shape == (0, K)
    loss, lse, teacher_lse = ops.proto_softmax_loss(_r(0, D), _r(K, D), tau, torch.zeros(0, dtype=torch.int64),
                                                    None, None, None, None)
    assert loss.shape == (0,) and teacher_lse.shape == (0,)
    assign, score, sums, counts = ops.kmeans_update(_r(0, D), _r(0, D), None, "l2")
    assert assign.shape == (0,) and sums.shape == (0, D)
    # K > N, NaN points, an expanded (zero-stride) x: every assignment a valid centroid index
    x = _r(3, D)
    x[1, 2] = float("nan")
    for metric in ("l2", "cosine"):
        for pts in (x, _r(1, D).expand(5, D)):
            assign, score, sums, counts = ops.kmeans_update(pts, _r(9, D), None, metric)
            assert assign.shape == (pts.shape[0],) and bool(((assign >= 0) & (assign < 9)).all())
            assert sums.shape == (9, D) and counts.shape == (9,)
    # the proto kernels on an expanded and a transposed input equal the same values made contiguous
    f = _r(1, D).expand(N, D)
    p = _r(D, K).t()
    torch.testing.assert_close(ops.proto_assign(f, p, tau), ops.proto_assign(f.contiguous(), p.contiguous(), tau))
