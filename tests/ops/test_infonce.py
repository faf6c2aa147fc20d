"""similarity_cross_entropy and infonce_loss. The shared OpTester (tests/ops/op_tester.py) checks values and
gradients against float64 over backend x device x dtype x shapes, gradcheck, opcheck, torch.compile, autocast
and CUDA graphs; this file adds hand-computed values, open_clip equality, non-contiguous and mixed-dtype
inputs and errors (multi-rank: test_infonce_distributed.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pyprotoclip
from pyprotoclip import _library
from pyprotoclip.ops import infonce_loss, reference, similarity_cross_entropy
from tests.ops.op_tester import Case, OpTester, scalar
from tests.utils import assert_close_verbose

COMPILED = "cpu" in _library.compiled_devices()
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


# ---- the shared op tester: values and every gradient vs float64, gradcheck, opcheck, compile, autocast ----


class TestSimilarityCrossEntropy(OpTester):
    output_names = ("loss",)
    arg_names = ("q", "k", "scale")
    # one row, m = 1, sizes that divide no tile, n > m
    shapes = [(1, 1, 8), (7, 123, 64), (257, 507, 96), (300, 40, 33)]
    small_shape = (9, 13, 16)
    gradcheck_shape = (3, 4, 5)
    slacks = {"grad scale": 2e-2}

    def make_case(self, shape, device, dtype):
        n, m, d = shape
        q, k = _features(n, d, device, dtype), _features(m, d, device, dtype)
        confident = min(n, m) // 2  # some targets are the query itself: large margins
        k[:confident] = q[:confident]
        targets = torch.randint(0, m, (n,), device=device)
        targets[:confident] = torch.arange(confident, device=device)
        return Case([q, k, scalar(1 / 0.07, device, dtype)], {"targets": targets})

    def fn(self, q, k, scale, *, backend, targets):
        return similarity_cross_entropy(q, k, targets, scale, backend=backend)

    def expected_fn(self, q, k, scale, *, targets):
        return reference.similarity_cross_entropy(q, k, targets, scale)[0]

    def opcheck_cases(self, device):
        case = self.make_case(self.small_shape, device, torch.float32)
        q, k, scale = (a.requires_grad_() for a in case.args)
        targets = case.kwargs["targets"]
        ops = torch.ops.pyprotoclip
        _, lse = ops.similarity_cross_entropy(q, k, targets, scale)
        grad_loss = torch.rand(q.shape[0], device=device)
        return [
            (ops.similarity_cross_entropy.default, (q, k, targets, scale)),
            (ops._similarity_cross_entropy_backward.default,
             (grad_loss, q.detach(), k.detach(), targets, scale.detach(), lse.detach())),
        ]


class TestInfonceLoss(OpTester):
    """The single-process path of infonce_loss: the symmetric op, both directions from one pass."""

    output_names = ("loss",)
    arg_names = ("image_features", "text_features", "logit_scale")
    shapes = [(1, 8), (7, 64), (300, 96), (517, 33)]
    small_shape = (33, 16)
    gradcheck_shape = (4, 5)
    slacks = {"loss": 1e-3, "grad image_features": 1e-3, "grad text_features": 1e-3, "grad logit_scale": 1e-2}

    def make_case(self, shape, device, dtype):
        b, d = shape
        image, text = _features(b, d, "cpu", torch.float64), _features(b, d, "cpu", torch.float64)
        text[: b // 3] = F.normalize(image[: b // 3] + 0.1 * text[: b // 3], dim=1)  # near-duplicate pairs
        return Case([image.to(device, dtype), text.to(device, dtype), scalar(1 / 0.07, device, dtype)], {})

    def fn(self, image, text, scale, *, backend):
        return infonce_loss(image, text, scale, backend=backend)

    def expected_fn(self, image, text, scale):
        return reference.infonce_loss(image, text, scale)

    def opcheck_cases(self, device):
        q, k, scale = (a.requires_grad_() for a in self.make_case(self.small_shape, device, torch.float32).args)
        ops = torch.ops.pyprotoclip
        _, _, lse_rows, lse_cols = ops.symmetric_similarity_cross_entropy(q, k, scale)
        n = q.shape[0]
        grads = (torch.rand(n, device=device), torch.rand(n, device=device))
        return [
            (ops.symmetric_similarity_cross_entropy.default, (q, k, scale)),
            (ops._symmetric_similarity_cross_entropy_backward.default,
             (*grads, q.detach(), k.detach(), scale.detach(), lse_rows.detach(), lse_cols.detach())),
        ]


# ---- cases the tester does not cover ----------------------------------------------------------------


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


# ---- registration ------------------------------------------------------------------------------------


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


@needs_compiled
@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (8, torch.float32), (33, torch.bfloat16), (300, torch.float32)])
def test_infonce_eager_gives_the_bits_of_the_registered_op(batch, dtype):
    # eager calls take one autograd node around the kernels; it must not change a bit of loss or gradients
    image, text = _features(batch, 24, "cpu", dtype), _features(batch, 24, "cpu", dtype)
    log_scale = torch.tensor(math.log(1 / 0.07))

    def registered(i, t, ls):
        rows, cols, _, _ = torch.ops.pyprotoclip.symmetric_similarity_cross_entropy(i, t, ls.exp())
        return 0.5 * (rows.mean() + cols.mean())

    def weighted(fn):
        return lambda i, t, ls: 0.3 * fn(i, t, ls)

    ours = _grads(weighted(lambda i, t, ls: infonce_loss(i, t, ls.exp(), backend="compiled")), image, text, log_scale)
    theirs = _grads(weighted(registered), image, text, log_scale)
    assert torch.equal(ours[0], theirs[0])
    for a, b in zip(ours[1], theirs[1]):
        assert torch.equal(a, b)
