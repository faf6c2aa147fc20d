"""similarity_cross_entropy and infonce_loss: kernels vs the float64 reference, hand values, open_clip,
multi-rank semantics, opcheck, torch.compile and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pyprotoclip
from pyprotoclip.ops import infonce_loss, reference, similarity_cross_entropy
from tests.conftest import DEVICES
from tests.utils import assert_close_verbose, low_precision_error_ok

COMPILED = pyprotoclip.build_info()["compiled"]
needs_compiled = pytest.mark.skipif(not COMPILED, reason="pyprotoclip._C is not built")
BACKENDS = ["compiled", "reference"]


def _features(n: int, d: int, device: str, dtype=torch.float32, *, normalize: bool = True) -> torch.Tensor:
    x = torch.randn(n, d, dtype=torch.float64)
    if normalize:
        x = F.normalize(x, dim=1)
    return x.to(device=device, dtype=dtype)


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.mean().backward()  # the losses are means over rows in use
    return out.detach(), [leaf.grad for leaf in leaves]


def _skip_unavailable(backend: str) -> None:
    if backend == "compiled" and not COMPILED:
        pytest.skip("pyprotoclip._C is not built")


# ---- similarity_cross_entropy vs the float64 reference -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,m,d", [(1, 1, 8), (7, 123, 64), (257, 507, 96), (300, 40, 33)])
def test_similarity_matches_reference_fp32(backend, device, n, m, d):
    _skip_unavailable(backend)
    q, k = _features(n, d, device), _features(m, d, device)
    k[: min(n, m) // 2] = q[: min(n, m) // 2]  # confident rows: some targets are the query itself
    targets = torch.randint(0, m, (n,), device=device)
    targets[: min(n, m) // 2] = torch.arange(min(n, m) // 2, device=device)
    scale = torch.tensor(1 / 0.07, device=device)
    fn = lambda q_, k_, s_: similarity_cross_entropy(q_, k_, targets, s_, backend=backend)  # noqa: E731
    loss, (gq, gk, gs) = _grads(fn, q, k, scale)
    oracle = lambda q_, k_, s_: reference.similarity_cross_entropy(q_, k_, targets, s_)[0]  # noqa: E731
    loss64, (gq64, gk64, gs64) = _grads(oracle, q.double(), k.double(), scale.double())
    assert loss.dtype == torch.float32 and loss.shape == (n,)
    assert_close_verbose(loss, loss64, atol=1e-5, name="loss")
    assert_close_verbose(gq, gq64, atol=1e-5, name="grad q")
    assert_close_verbose(gk, gk64, atol=1e-5, name="grad k")
    assert_close_verbose(gs, gs64, atol=1e-5, rtol=1e-5, name="grad scale")


@needs_compiled
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,d", [(7, 123, 64), (257, 507, 96)])
def test_similarity_low_precision_error_no_worse_than_reference(device, dtype, n, m, d):
    q, k = _features(n, d, device, dtype), _features(m, d, device, dtype)
    targets = torch.randint(0, m, (n,), device=device)
    scale = torch.tensor(1 / 0.07, device=device)
    kern = _grads(lambda a, b, s: similarity_cross_entropy(a, b, targets, s, backend="compiled"), q, k, scale)
    ref = _grads(lambda a, b, s: reference.similarity_cross_entropy(a, b, targets, s)[0], q, k, scale)
    oracle = _grads(lambda a, b, s: reference.similarity_cross_entropy(a, b, targets, s)[0], q.double(), k.double(), scale.double())
    low_precision_error_ok(kern[0], ref[0], oracle[0], slack=2e-3, name="loss")
    for name, a, b, c in zip(["q", "k", "scale"], kern[1], ref[1], oracle[1]):
        assert a.dtype == b.dtype
        low_precision_error_ok(a, b, c, slack=2e-3 if name != "scale" else 2e-2, name=f"grad {name}")


@needs_compiled
def test_similarity_non_contiguous_inputs():
    q_t = _features(64, 40, "cpu").t().contiguous().t()[:, :32]  # strided view
    k_t = _features(50, 48, "cpu")[:, 8:40]
    targets = torch.randint(0, 50, (40,))[::1]
    q = q_t[:40]
    scale = torch.tensor(5.0)
    got = similarity_cross_entropy(q, k_t, targets, scale, backend="compiled")
    want = reference.similarity_cross_entropy(q.double(), k_t.double(), targets, scale.double())[0]
    assert not q.is_contiguous() and not k_t.is_contiguous()
    assert_close_verbose(got, want, atol=1e-5, name="loss")


@needs_compiled
def test_similarity_gradcheck_compiled():
    # finite differences of the compiled fp32 forward against the compiled backward
    q, k = _features(3, 5, "cpu"), _features(4, 5, "cpu")
    targets = torch.tensor([2, 0, 3])
    q.requires_grad_(), k.requires_grad_()
    scale = torch.tensor(2.0, requires_grad=True)
    fn = lambda a, b, s: similarity_cross_entropy(a, b, targets, s, backend="compiled")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, scale), eps=1e-2, atol=5e-3, rtol=1e-2)


def test_reference_gradcheck_float64():
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([2, 0, 3])
    assert torch.autograd.gradcheck(lambda a, b, c: reference.similarity_cross_entropy(a, b, targets, c)[0], (q, k, s))


# ---- infonce_loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b,d", [(1, 8), (7, 64), (300, 96), (517, 33)])
def test_infonce_matches_reference_fp32(backend, device, b, d):
    _skip_unavailable(backend)
    image, text = _features(b, d, device), _features(b, d, device)
    text[: b // 3] = F.normalize(image[: b // 3] + 0.1 * text[: b // 3], dim=1)
    scale = torch.tensor(1 / 0.07, device=device)
    loss, grads = _grads(lambda i, t, s: infonce_loss(i, t, s, backend=backend), image, text, scale)
    loss64, grads64 = _grads(reference.infonce_loss, image.double(), text.double(), scale.double())
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close_verbose(loss, loss64, atol=1e-5, name="loss")
    for name, g, g64 in zip(["image", "text", "scale"], grads, grads64):
        assert_close_verbose(g, g64, atol=1e-5, rtol=1e-5, name=f"grad {name}")


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_infonce_low_precision(dtype):
    image, text = _features(300, 64, "cpu", dtype), _features(300, 64, "cpu", dtype)
    scale = torch.tensor(1 / 0.07)
    kern = _grads(lambda i, t, s: infonce_loss(i, t, s, backend="compiled"), image, text, scale)
    ref = _grads(lambda i, t, s: infonce_loss(i, t, s, backend="reference"), image, text, scale)
    oracle = _grads(reference.infonce_loss, image.double(), text.double(), scale.double())
    low_precision_error_ok(kern[0], ref[0], oracle[0], slack=1e-3, name="loss")
    for name, a, b, c in zip(["image", "text", "scale"], kern[1], ref[1], oracle[1]):
        low_precision_error_ok(a, b, c, slack=1e-3 if name != "scale" else 1e-2, name=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_hand_computed_2x2(backend):
    _skip_unavailable(backend)
    eye = torch.eye(2)
    # logits = identity: each row's CE is log(e + 1) - 1, in both directions
    expected = math.log(math.e + 1) - 1
    got = infonce_loss(eye, eye.clone(), torch.tensor(1.0), backend=backend)
    assert abs(got.item() - expected) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_hand_computed_3x3(backend):
    _skip_unavailable(backend)
    image = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    text = [[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]]
    s = 2.0
    logits = [[s * sum(a * b for a, b in zip(i, t)) for t in text] for i in image]

    def ce(rows):
        return sum(math.log(sum(math.exp(v) for v in row)) - row[r] for r, row in enumerate(rows)) / len(rows)

    cols = [list(col) for col in zip(*logits)]
    expected = 0.5 * (ce(logits) + ce(cols))
    got = infonce_loss(torch.tensor(image), torch.tensor(text), torch.tensor(s), backend=backend)
    assert abs(got.item() - expected) < 1e-6
    # and the generic op, one direction
    got_rows = similarity_cross_entropy(torch.tensor(image), torch.tensor(text), torch.arange(3), s, backend=backend)
    assert abs(got_rows.mean().item() - ce(logits)) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_equals_open_clip(backend):
    _skip_unavailable(backend)
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = _features(64, 32, "cpu"), _features(64, 32, "cpu")
    log_scale = torch.tensor(math.log(1 / 0.07))
    ours = _grads(lambda i, t, ls: infonce_loss(i, t, ls.exp(), backend=backend), image, text, log_scale)
    theirs = _grads(lambda i, t, ls: open_clip_loss.ClipLoss()(i, t, ls.exp()), image, text, log_scale)
    assert_close_verbose(ours[0], theirs[0], atol=1e-5, name="loss")
    for name, a, b in zip(["image", "text", "log scale"], ours[1], theirs[1]):
        assert_close_verbose(a, b, atol=1e-5, rtol=1e-5, name=f"grad {name}")


def test_infonce_mixed_dtypes_promote():
    image, text = _features(6, 8, "cpu"), _features(6, 8, "cpu")
    s = torch.tensor(5.0)
    got = infonce_loss(image, text.bfloat16(), s)
    want = infonce_loss(image, text.bfloat16().float(), s)
    assert_close_verbose(got, want, atol=1e-6, name="loss")


def test_infonce_float64_auto_is_exact():
    image, text = _features(5, 4, "cpu", torch.float64), _features(5, 4, "cpu", torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64)
    assert_close_verbose(infonce_loss(image, text, s), reference.infonce_loss(image, text, s), atol=1e-12, name="loss")


# ---- registration, compile -----------------------------------------------------------------------


@needs_compiled
def test_opcheck_all_ops():
    q, k = _features(9, 16, "cpu"), _features(13, 16, "cpu")
    targets = torch.randint(0, 13, (9,))
    scale = torch.tensor(4.0, requires_grad=True)
    ops = torch.ops.pyprotoclip
    torch.library.opcheck(ops.similarity_cross_entropy.default, (q.requires_grad_(), k.requires_grad_(), targets, scale))
    loss, lse = ops.similarity_cross_entropy(q, k, targets, scale)
    torch.library.opcheck(ops._similarity_cross_entropy_backward.default, (torch.rand(9), q.detach(), k.detach(), targets, scale.detach(), lse.detach()))
    k2 = _features(9, 16, "cpu").requires_grad_()
    torch.library.opcheck(ops.symmetric_similarity_cross_entropy.default, (q, k2, scale))
    _, _, lr, lc = ops.symmetric_similarity_cross_entropy(q, k2, scale)
    torch.library.opcheck(
        ops._symmetric_similarity_cross_entropy_backward.default,
        (torch.rand(9), torch.rand(9), q.detach(), k2.detach(), scale.detach(), lr.detach(), lc.detach()),
    )


@needs_compiled
def test_torch_compile_fullgraph():
    image, text = _features(33, 16, "cpu"), _features(33, 16, "cpu")
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)

    def step(i, t, ls):
        return infonce_loss(i, t, ls.exp(), backend="compiled")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    i1, t1 = image.clone().requires_grad_(), text.clone().requires_grad_()
    got = compiled(i1, t1, log_scale)
    got.backward()
    g_scale = log_scale.grad.clone()
    log_scale.grad = None
    i2, t2 = image.clone().requires_grad_(), text.clone().requires_grad_()
    want = step(i2, t2, log_scale)
    want.backward()
    assert_close_verbose(got, want, atol=1e-6, name="loss")
    assert_close_verbose(i1.grad, i2.grad, atol=1e-6, name="grad image")
    assert_close_verbose(g_scale, log_scale.grad, atol=1e-6, name="grad scale")


def test_torch_ops_usable_after_import():
    if not COMPILED:
        pytest.skip("pyprotoclip._C is not built")
    assert hasattr(torch.ops.pyprotoclip, "similarity_cross_entropy")
    assert pyprotoclip.library_path().endswith(".so")


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image,text,scale,match",
    [
        (torch.randn(4, 8), torch.randn(5, 8), 1.0, "text_features"),
        (torch.randn(4, 8), torch.randn(4, 7), 1.0, "text_features"),
        (torch.randn(8), torch.randn(8), 1.0, "image_features"),
        (torch.randn(0, 8), torch.randn(0, 8), 1.0, "image_features"),
        (torch.randint(0, 3, (4, 8)), torch.randn(4, 8), 1.0, "image_features"),
        (torch.tensor([[float("nan")] * 8] * 4), torch.randn(4, 8), 1.0, "image_features"),
        (torch.randn(4, 8), torch.full((4, 8), float("inf")), 1.0, "text_features"),
        (torch.randn(4, 8), torch.randn(4, 8), float("nan"), "logit_scale"),
        (torch.randn(4, 8), torch.randn(4, 8), torch.tensor([1.0, 2.0]), "logit_scale"),
        (torch.randn(4, 8), torch.randn(4, 8), "big", "logit_scale"),
    ],
)
def test_infonce_bad_input_raises_value_error(image, text, scale, match):
    with pytest.raises(ValueError, match=match):
        infonce_loss(image, text, scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_infonce_different_devices_raises():
    with pytest.raises(ValueError, match="text_features"):
        infonce_loss(torch.randn(4, 8), torch.randn(4, 8, device="cuda"), 1.0)


@pytest.mark.parametrize(
    "targets,match",
    [(torch.tensor([0, 5]), "targets"), (torch.tensor([0, -1]), "targets"), (torch.tensor([0.0, 1.0]), "targets"), (torch.tensor([0]), "targets")],
)
def test_similarity_bad_targets(targets, match):
    with pytest.raises(ValueError, match=match):
        similarity_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), targets, 1.0)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        infonce_loss(torch.randn(2, 4), torch.randn(2, 4), 1.0, backend="fast")


@needs_compiled
def test_direct_op_call_checks_bounds():
    with pytest.raises(RuntimeError, match="targets"):
        torch.ops.pyprotoclip.similarity_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 3]), torch.tensor(1.0))


@needs_compiled
def test_direct_op_scale_of_shape_one_gets_gradient_of_same_shape():
    q = _features(4, 8, "cpu").requires_grad_()
    k = _features(6, 8, "cpu").requires_grad_()
    scale = torch.tensor([2.0], requires_grad=True)
    loss, _ = torch.ops.pyprotoclip.similarity_cross_entropy(q, k, torch.tensor([0, 1, 2, 5]), scale)
    loss.sum().backward()
    s64 = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    reference.similarity_cross_entropy(q.detach().double(), k.detach().double(), torch.tensor([0, 1, 2, 5]), s64)[0].sum().backward()
    assert scale.grad.shape == (1,)
    assert_close_verbose(scale.grad[0], s64.grad, atol=1e-5, name="grad scale")
