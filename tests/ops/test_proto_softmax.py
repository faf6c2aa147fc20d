"""proto_assign and proto_cross_entropy. The shared OpTester (tests/ops/op_tester.py) checks the loss in the
hard / soft / teacher target modes, the probabilities and their top-k: values and every gradient against
float64 over backend x device x dtype x shapes, gradcheck, opcheck, torch.compile, autocast and CUDA graphs.
This file adds multi-block shapes, reductions, the lse output's gradient, non-contiguous inputs,
hand-computed 2x3 values and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pyprotoclip import _library
from pyprotoclip.ops import reference
from pyprotoclip.ops import proto_assign, proto_cross_entropy
from tests.ops.op_tester import CUDA, Case, OpTester, scalar, skip_unavailable, to64
from tests.utils import assert_close_verbose

COMPILED = "cpu" in _library.compiled_devices()
needs_compiled = pytest.mark.skipif(not COMPILED, reason="pyprotoclip._C is not built")
BACKENDS = ["compiled", "reference"]
MODES = ["hard", "soft", "teacher"]
# (B, K, d): one row, K = 1, sizes that divide nothing, K < B
SHAPES = [(1, 1, 8), (1, 17, 4), (7, 123, 64), (257, 507, 96), (300, 40, 33)]
# K large enough that B spans several row blocks of the kernels: on CPU block_rows(136, 65536) = 128 (64 with
# the teacher's second buffer), on CUDA (budget 64M values) 1024 (512).
MULTI_BLOCK = {"cpu": (136, 65536, 4), "cuda": (1100, 65536, 4)}
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
TAU, TAU_T = 0.1, 0.05


def _skip_unavailable(backend: str, device: str = "cpu") -> None:
    if backend == "compiled" and not COMPILED:
        pytest.skip("pyprotoclip._C is not built")


def _problem(b: int, k: int, d: int, mode: str, device: str = "cpu", dtype=torch.float32, dt: int = 12):
    """Normalised features and prototypes with some confident rows (a feature equal to a prototype), and the
    target arguments of ``mode``. Everything in float64 first, then cast, so the oracle sees the same values."""
    f = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    p = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    f[: b // 3] = p[torch.randint(0, k, (b // 3,))]
    if mode == "hard":
        kw = {"target": torch.randint(0, k, (b,))}
    elif mode == "soft":
        # peaked soft targets, with exact zeros
        q = torch.softmax(3 * torch.randn(b, k, dtype=torch.float64), dim=1)
        q[q < 1e-3] = 0
        kw = {"target": (q / q.sum(1, keepdim=True)).to(dtype)}
    else:
        t = F.normalize(torch.randn(b, dt, dtype=torch.float64), dim=1)
        c = F.normalize(torch.randn(k, dt, dtype=torch.float64), dim=1)
        kw = {"teacher_features": t.to(dtype), "teacher_prototypes": c.to(dtype), "teacher_temperature": TAU_T}
    kw = {name: (v.to(device) if isinstance(v, torch.Tensor) else v) for name, v in kw.items()}
    return f.to(device=device, dtype=dtype), p.to(device=device, dtype=dtype), kw


def _loss_and_grads(fn, f, p, tau=TAU, *, reduction="mean", weights=None):
    f = f.detach().clone().requires_grad_()
    p = p.detach().clone().requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64 if f.dtype == torch.float64 else torch.float32, device=f.device)
    t.requires_grad_()
    out = fn(f, p, t)
    (out if weights is None else out * weights).sum().backward()
    return out.detach(), f.grad, p.grad, t.grad


def _oracle(f, p, kw, **extra):
    """float64 reference on the same (possibly low-precision) values."""
    kw64 = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in kw.items()}
    return _loss_and_grads(
        lambda a, b, t: proto_cross_entropy(a, b, t, backend="reference", **kw64, **extra), f.double(), p.double()
    )


NAMES = ["loss", "grad features", "grad prototypes", "grad temperature"]


def _op_args(kw, device="cpu"):
    """target_index, target_probs, teacher_features, teacher_prototypes, teacher_temperature for the op."""
    target = kw.get("target")
    index = target if target is not None and target.dtype == torch.int64 else None
    probs = target if target is not None and target.is_floating_point() else None
    tt = kw.get("teacher_temperature")
    return [index, probs, kw.get("teacher_features"), kw.get("teacher_prototypes"),
            None if tt is None else torch.tensor(float(tt), device=device)]


def _smooth(case: Case) -> Case:
    """The case with tau = 0.5: at tau = 0.1 the compiled kernels' finite-difference step (1e-2, they compute in
    fp32) is too coarse for gradcheck."""
    f, p, tau = case.args
    return Case([f, p, torch.full_like(tau, 0.5)], case.kwargs)


# ---- the shared op tester --------------------------------------------------------------------------


class ProtoCrossEntropyTester(OpTester):
    """proto_cross_entropy(reduction="none") against one target mode; the tester weights the rows."""

    mode = "hard"
    output_names = ("loss",)
    arg_names = ("features", "prototypes", "temperature")
    shapes = SHAPES
    small_shape = (9, 13, 8)
    gradcheck_shape = (3, 5, 4)
    slack, cuda_slack, cuda_fp32_tol = 1e-3, 2e-3, 2e-5  # as the CUDA tests before the tester

    def make_case(self, shape, device, dtype):
        f, p, kw = _problem(*shape, self.mode, device=device, dtype=dtype)
        return Case([f, p, scalar(TAU, device, dtype)], kw)

    def gradcheck_case(self):
        return _smooth(super().gradcheck_case())

    def fn(self, f, p, tau, *, backend, **kw):
        return proto_cross_entropy(f, p, tau, backend=backend, reduction="none", **kw)

    def expected_fn(self, f, p, tau, **kw):
        return proto_cross_entropy(f, p, tau, backend="reference", reduction="none", **kw)

    def opcheck_cases(self, device):
        case = self.make_case(self.small_shape, device, torch.float32)
        f, p, tau = (a.requires_grad_() for a in case.args)
        args = _op_args(case.kwargs, device)
        ops = torch.ops.pyprotoclip
        _, lse, tlse = ops.proto_softmax_loss(f, p, tau, *args)
        n = f.shape[0]
        detached = (f.detach(), p.detach(), tau.detach(), *args, lse.detach(), tlse.detach(), [True, True, True])
        cases = [(ops.proto_softmax_loss.default, (f, p, tau, *args))] + [
            (ops._proto_softmax_loss_backward.default, (torch.rand(n, device=device), grad_lse, *detached))
            for grad_lse in (None, torch.rand(n, device=device))
        ]
        if device == "cpu":  # the loss with the rows' own gradients: a CPU kernel only
            cases += [(ops._proto_softmax_loss_and_grad.default, (*detached[:8], mask))
                      for mask in ([True, True, True], [True, False, False])]
        return cases


class TestProtoCrossEntropyHard(ProtoCrossEntropyTester):
    mode = "hard"


class TestProtoCrossEntropySoft(ProtoCrossEntropyTester):
    mode = "soft"


class TestProtoCrossEntropyTeacher(ProtoCrossEntropyTester):
    mode = "teacher"


class TestProtoAssign(OpTester):
    output_names = ("probs",)
    arg_names = ("features", "prototypes", "temperature")
    shapes = SHAPES
    small_shape = (9, 13, 8)
    gradcheck_shape = (3, 5, 4)
    slack, cuda_slack, cuda_fp32_tol = 1e-3, 2e-3, 2e-5
    # dL/dtau sums p_ij (g_ij - sum_l g_il p_il) x_ij over all n*k entries, a sum that cancels: the fp32 reference
    # itself is 2e-5 off (relative) at (257, 507)
    fp32_rtols = {"grad temperature": 5e-5}

    def make_case(self, shape, device, dtype):
        f, p, _ = _problem(*shape, "hard", device=device, dtype=dtype)
        return Case([f, p, scalar(TAU, device, dtype)], {})

    def gradcheck_case(self):
        return _smooth(super().gradcheck_case())

    def fn(self, f, p, tau, *, backend):
        return proto_assign(f, p, tau, backend=backend)

    def expected_fn(self, f, p, tau):
        return reference.proto_assign(f, p, tau)

    def check(self, got, oracle, same_dtype_ref, **kw):
        super().check(got, oracle, same_dtype_ref, **kw)
        probs = got[0]
        tol = 1e-5 if probs.dtype == torch.float32 else probs.shape[1] * torch.finfo(probs.dtype).eps
        assert_close_verbose(probs.double().sum(1), torch.ones(probs.shape[0], dtype=torch.float64), atol=tol,
                             name="row sums")

    def opcheck_cases(self, device):
        f, p, tau = (a.requires_grad_() for a in self.make_case(self.small_shape, device, torch.float32).args)
        ops = torch.ops.pyprotoclip
        grad_probs = torch.randn(f.shape[0], p.shape[0], device=device)
        return [
            (ops.proto_assign.default, (f, p, tau)),
            (ops._proto_assign_backward.default,
             (grad_probs, f.detach(), p.detach(), tau.detach(), [True, True, True])),
        ]


class TestProtoAssignTopk(OpTester):
    """proto_assign(topk=k): values against the oracle's top-k; indices through the probabilities they point at
    (robust to ties), distinct in each row."""

    output_names = ("values", "indices")
    arg_names = ("features", "prototypes", "temperature")
    shapes = [(1, 1, 8, 1), (7, 123, 64, 5), (257, 507, 96, 17), (40, 10, 8, 10)]
    small_shape = (9, 13, 8, 4)
    differentiable = False
    test_gradcheck = None  # not differentiable
    slack, cuda_slack, cuda_fp32_tol = 1e-3, 2e-3, 2e-5

    def make_case(self, shape, device, dtype):
        b, k, d, topk = shape
        f, p, _ = _problem(b, k, d, "hard", device=device, dtype=dtype)
        return Case([f, p, scalar(TAU, device, dtype)], {"topk": topk})

    def fn(self, f, p, tau, *, backend, topk):
        return proto_assign(f, p, tau, topk=topk, backend=backend)

    def expected_fn(self, f, p, tau, *, topk):
        return reference.proto_assign(f, p, tau).topk(topk, dim=1)

    def check(self, got, oracle, same_dtype_ref, *, case, dtype, backend, device):
        values, indices = got
        want = oracle[0]
        super().check([values], [want], None if same_dtype_ref is None else same_dtype_ref[:1], case=case,
                      dtype=dtype, backend=backend, device=device)
        assert indices.dtype == torch.int64 and indices.shape == want.shape
        f, p, tau = (to64(a) for a in case.args)
        full = reference.proto_assign(f, p, tau)
        assert_close_verbose(full.gather(1, indices), want, atol=1e-6, rtol=1e-5, name="probs at indices")
        assert all(len(set(row.tolist())) == indices.shape[1] for row in indices.cpu())

    def opcheck_cases(self, device):
        f, p, tau = self.make_case(self.small_shape, device, torch.float32).args
        return [(torch.ops.pyprotoclip.proto_assign_topk.default, (f, p, tau, self.small_shape[3]))]


# ---- cases the tester does not cover -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_cross_entropy_matches_reference_multi_block(mode, device):
    skip_unavailable("compiled", device)
    b, k, d = MULTI_BLOCK[device]
    f, p, kw = _problem(b, k, d, mode, device=device)
    got = _loss_and_grads(lambda a, c, t: proto_cross_entropy(a, c, t, backend="compiled", **kw), f, p)
    want = _oracle(f, p, kw)
    for name, x, y in zip(NAMES, got, want):
        assert_close_verbose(x, y, atol=2e-5, rtol=2e-5, name=f"{mode} {name}")


@needs_compiled
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cross_entropy_reductions(mode, reduction):
    f, p, kw = _problem(33, 71, 16, mode)
    weights = torch.rand(33) if reduction == "none" else None
    got = _loss_and_grads(
        lambda a, c, t: proto_cross_entropy(a, c, t, backend="compiled", reduction=reduction, **kw),
        f, p, weights=weights,
    )
    kw64 = {n: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for n, v in kw.items()}
    want = _loss_and_grads(
        lambda a, c, t: proto_cross_entropy(a, c, t, backend="reference", reduction=reduction, **kw64),
        f.double(), p.double(), weights=None if weights is None else weights.double(),
    )
    assert got[0].shape == (() if reduction == "sum" else (33,))
    for name, x, y in zip(NAMES, got, want):
        assert_close_verbose(x, y, atol=2e-5, rtol=2e-5, name=f"{mode} {reduction} {name}")


@needs_compiled
def test_cross_entropy_only_features_grad():
    # ProtoCLIP's prototypes are constants: the kernel skips their GEMM and must still get the rest right
    f, p, kw = _problem(40, 90, 16, "teacher")
    f1 = f.clone().requires_grad_()
    proto_cross_entropy(f1, p, TAU, backend="compiled", **kw).backward()
    f2 = f.double().requires_grad_()
    kw64 = {n: (v.double() if isinstance(v, torch.Tensor) else v) for n, v in kw.items()}
    proto_cross_entropy(f2, p.double(), TAU, backend="reference", **kw64).backward()
    assert_close_verbose(f1.grad, f2.grad, atol=2e-5, name="grad features")


@needs_compiled
def test_cross_entropy_non_contiguous_inputs():
    f, p, kw = _problem(21, 35, 16, "soft")
    f_nc = f.t().contiguous().t()
    p_nc = torch.cat([p, p], dim=1)[:, ::2]
    p_nc.copy_(p)
    target_nc = kw["target"].t().contiguous().t()
    assert not f_nc.is_contiguous() and not p_nc.is_contiguous() and not target_nc.is_contiguous()
    got = proto_cross_entropy(f_nc, p_nc, TAU, target=target_nc, backend="compiled")
    want = proto_cross_entropy(f.double(), p.double(), TAU, target=kw["target"].double(), backend="reference")
    assert_close_verbose(got, want, atol=2e-5, name="loss")


@needs_compiled
@pytest.mark.parametrize("mode", MODES)
def test_loss_op_lse_gradient(mode):
    # the op's lse output is differentiable too: a gradient reaching it must be handled, not dropped
    f, p, kw = _problem(19, 29, 8, mode)
    args = _op_args(kw)
    w1, w2 = torch.rand(19), torch.rand(19)

    def run(fn, a, c, t, extra):
        out = fn(a, c, t, *extra)
        return (out[0] * w1.to(out[0].dtype)).sum() + (out[1] * w2.to(out[1].dtype)).sum()

    got = _loss_and_grads(lambda a, c, t: run(torch.ops.pyprotoclip.proto_softmax_loss, a, c, t, args), f, p)
    args64 = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args]
    want = _loss_and_grads(lambda a, c, t: run(reference.proto_softmax_loss, a, c, t, args64), f.double(), p.double())
    for name, x, y in zip(NAMES, got, want):
        assert_close_verbose(x, y, atol=2e-5, rtol=2e-5, name=f"{mode} {name}")


def test_float64_auto_is_exact():
    f, p, kw = _problem(5, 7, 4, "hard", dtype=torch.float64)
    got = proto_cross_entropy(f, p, TAU, **kw)
    want = reference.proto_softmax_loss(f, p, torch.tensor(TAU, dtype=torch.float64), kw["target"])[0].mean()
    assert_close_verbose(got, want, atol=1e-12, name="loss")


# ---- hand-computed 2x3 examples ---------------------------------------------------------------------
# F = [[1, 0], [0, 1]], P = [[1, 0], [0, 1], [1, 1]], tau = 0.5: logits a = [[2, 0, 2], [0, 2, 2]],
# both rows have lse = log(2 e^2 + 1).

HAND_F = [[1.0, 0.0], [0.0, 1.0]]
HAND_P = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
LSE = math.log(2 * math.e**2 + 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_2x3(backend):
    _skip_unavailable(backend)
    f, p = torch.tensor(HAND_F), torch.tensor(HAND_P)
    # hard targets [1, 2]: -log p = lse - a_it
    hard = proto_cross_entropy(f, p, 0.5, target=torch.tensor([1, 2]), reduction="none", backend=backend)
    assert_close_verbose(hard, torch.tensor([LSE - 0.0, LSE - 2.0]), atol=1e-6, name="hard")
    # soft targets [[.5, .5, 0], [0, 0, 1]]: lse - sum_j q_ij a_ij
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    soft = proto_cross_entropy(f, p, 0.5, target=q, reduction="none", backend=backend)
    assert_close_verbose(soft, torch.tensor([LSE - 1.0, LSE - 2.0]), atol=1e-6, name="soft")
    # teacher T = [[1], [0]], C = [[1], [0], [0]], tau_t = 1: q_0 = [e, 1, 1] / (e + 2), q_1 uniform
    teacher = proto_cross_entropy(
        f, p, 0.5, teacher_features=torch.tensor([[1.0], [0.0]]), teacher_prototypes=torch.tensor([[1.0], [0.0], [0.0]]),
        teacher_temperature=1.0, reduction="none", backend=backend,
    )
    e = math.e
    want = torch.tensor([LSE - (2 * e + 0 + 2) / (e + 2), LSE - 4.0 / 3.0])
    assert_close_verbose(teacher, want, atol=1e-6, name="teacher")
    # assignment probabilities
    probs = proto_assign(f, p, 0.5, backend=backend)
    z = 2 * e**2 + 1
    assert_close_verbose(probs, torch.tensor([[e**2 / z, 1 / z, e**2 / z], [1 / z, e**2 / z, e**2 / z]]), atol=1e-6,
                         name="assign")
    values, indices = proto_assign(f, p, 0.5, topk=1, backend=backend)
    assert_close_verbose(values, torch.tensor([[e**2 / z], [e**2 / z]]), atol=1e-6, name="topk values")
    assert indices[0, 0].item() in (0, 2) and indices[1, 0].item() in (1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_gradients_2x3(backend):
    # hard target [1, 2], mean over 2 rows: dL/da_ij = (p_ij - [j = t_i]) / 2; dL/dF = dL/da P / tau;
    # dL/dtau = -(1/tau) sum_ij dL/da_ij a_ij
    _skip_unavailable(backend)
    f = torch.tensor(HAND_F, requires_grad=True)
    tau = torch.tensor(0.5, requires_grad=True)
    proto_cross_entropy(f, torch.tensor(HAND_P), tau, target=torch.tensor([1, 2]), backend=backend).backward()
    e, z = math.e, 2 * math.e**2 + 1
    p = torch.tensor([[e**2 / z, 1 / z, e**2 / z], [1 / z, e**2 / z, e**2 / z]], dtype=torch.float64)
    g = (p - torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)) / 2
    a = torch.tensor([[2.0, 0.0, 2.0], [0.0, 2.0, 2.0]], dtype=torch.float64)
    assert_close_verbose(f.grad, g @ torch.tensor(HAND_P, dtype=torch.float64) / 0.5, atol=1e-6, name="grad features")
    assert_close_verbose(tau.grad, -(g * a).sum() / 0.5, atol=1e-6, name="grad temperature")


@pytest.mark.parametrize("device", DEVICES)
def test_assign_topk_multi_block(device):
    skip_unavailable("compiled", device)
    b, k, d = MULTI_BLOCK[device]
    f, p, _ = _problem(b, k, d, "hard", device=device)
    values, indices = proto_assign(f, p, TAU, topk=3, backend="compiled")
    full = reference.proto_assign(f.double(), p.double(), torch.tensor(TAU, dtype=torch.float64, device=device))
    want = full.topk(3, dim=1).values
    assert_close_verbose(values, want, atol=1e-6, rtol=1e-5, name="values")
    assert_close_verbose(full.gather(1, indices), want, atol=1e-6, rtol=1e-5, name="probs at indices")


# ---- errors ----------------------------------------------------------------------------------------


def _bad_calls():
    f, p = torch.randn(4, 8), torch.randn(6, 8)
    idx = torch.tensor([0, 1, 2, 5])
    q = torch.full((4, 6), 1 / 6)
    t, c = torch.randn(4, 3), torch.randn(6, 3)
    ce, pa = proto_cross_entropy, proto_assign
    nan_f = f.clone()
    nan_f[1, 2] = float("nan")
    return [
        ("features", lambda: ce(torch.randn(8), p, 0.1, target=idx)),
        ("features", lambda: ce(nan_f, p, 0.1, target=idx)),
        ("features", lambda: pa(torch.randn(4, 8).int(), p, 0.1)),
        ("prototypes", lambda: ce(f, torch.randn(6, 7), 0.1, target=idx)),
        ("prototypes", lambda: ce(f, p.double(), 0.1, target=idx)),
        ("prototypes", lambda: pa(f, torch.full((6, 8), float("inf")), 0.1)),
        ("temperature", lambda: ce(f, p, 0.0, target=idx)),
        ("temperature", lambda: pa(f, p, torch.tensor(-1.0))),
        ("temperature", lambda: pa(f, p, torch.tensor([0.1, 0.2]))),
        ("target", lambda: ce(f, p, 0.1, target=torch.tensor([0, 1, 2, 6]))),
        ("target", lambda: ce(f, p, 0.1, target=torch.tensor([0, -1, 2, 3]))),
        ("target", lambda: ce(f, p, 0.1, target=idx[:3])),
        ("target", lambda: ce(f, p, 0.1, target=idx.int())),
        ("target", lambda: ce(f, p, 0.1, target=torch.full((4, 5), 0.2))),
        ("target", lambda: ce(f, p, 0.1, target=q * 1.1)),
        ("target", lambda: ce(f, p, 0.1, target=torch.tensor([[0.6, 0.6, -0.2, 0.0, 0.0, 0.0]] * 4))),
        ("target", lambda: ce(f, p, 0.1, target=torch.where(q > 0.1, float("nan"), q))),
        ("target", lambda: ce(f, p, 0.1)),
        ("target", lambda: ce(f, p, 0.1, target=idx, teacher_features=t, teacher_prototypes=c, teacher_temperature=1.0)),
        ("teacher_features", lambda: ce(f, p, 0.1, teacher_prototypes=c, teacher_temperature=1.0)),
        ("teacher_features", lambda: ce(f, p, 0.1, teacher_features=t[:3], teacher_prototypes=c, teacher_temperature=1.0)),
        ("teacher_prototypes", lambda: ce(f, p, 0.1, teacher_features=t, teacher_temperature=1.0)),
        ("teacher_prototypes", lambda: ce(f, p, 0.1, teacher_features=t, teacher_prototypes=c[:5], teacher_temperature=1.0)),
        ("teacher_prototypes", lambda: ce(f, p, 0.1, teacher_features=t, teacher_prototypes=torch.randn(6, 4), teacher_temperature=1.0)),
        ("teacher_temperature", lambda: ce(f, p, 0.1, teacher_features=t, teacher_prototypes=c)),
        ("teacher_temperature", lambda: ce(f, p, 0.1, teacher_features=t, teacher_prototypes=c, teacher_temperature=0.0)),
        ("reduction", lambda: ce(f, p, 0.1, target=idx, reduction="avg")),
        ("topk", lambda: pa(f, p, 0.1, topk=0)),
        ("topk", lambda: pa(f, p, 0.1, topk=7)),
        ("topk", lambda: pa(f, p, 0.1, topk=2.0)),
        ("backend", lambda: pa(f, p, 0.1, backend="fast")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_errors_name_the_argument(case):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError, match=name):
        call()


@needs_compiled
def test_direct_op_call_checks_bounds():
    f, p = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="target_index"):
        torch.ops.pyprotoclip.proto_softmax_loss(f, p, torch.tensor(0.1), torch.tensor([0, 1, 2, 6]), None, None, None, None)
    with pytest.raises(RuntimeError, match="target_index"):
        torch.ops.pyprotoclip.proto_softmax_loss(f, p, torch.tensor(0.1), None, None, None, None, None)
    with pytest.raises(RuntimeError, match="k"):
        torch.ops.pyprotoclip.proto_assign_topk(f, p, torch.tensor(0.1), 7)


@needs_compiled
@pytest.mark.parametrize("mode", ["hard", "soft", "teacher"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("frozen_prototypes", [False, True])
def test_eager_cross_entropy_matches_the_registered_op(mode, reduction, frozen_prototypes):
    # Eager calls take one autograd node around the kernels. On CPU its forward pass also computes the rows'
    # own gradients and its backward scales them: the loss keeps its bits, the gradients match the registered
    # op's recomputing backward to fp32 rounding (the weight is applied after the products, not before).
    # reduction="none" with trainable prototypes takes the recomputing backward itself: the same bits.
    f0, p0, kw = _problem(33, 70, 16, mode)
    target = kw.get("target")
    args = (target if mode == "hard" else None, target if mode == "soft" else None, kw.get("teacher_features"),
            kw.get("teacher_prototypes"), torch.tensor(TAU_T) if mode == "teacher" else None)

    def registered(f, p, tau):
        loss = torch.ops.pyprotoclip.proto_softmax_loss(f, p, tau, *args)[0]
        return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()

    results = []
    for fn in (registered, lambda f, p, tau: proto_cross_entropy(f, p, tau, reduction=reduction, backend="compiled", **kw)):
        f, p, tau = f0.clone().requires_grad_(), p0.clone().requires_grad_(not frozen_prototypes), torch.tensor(TAU, requires_grad=True)
        out = fn(f, p, tau)
        (out * torch.linspace(0.1, 1.0, out.numel()).reshape(out.shape)).sum().backward()
        results.append([out.detach(), f.grad, p.grad, tau.grad])
    (out_r, *grads_r), (out_e, *grads_e) = results
    assert torch.equal(out_r, out_e)
    exact = reduction == "none" and not frozen_prototypes
    for a, b in zip(grads_r, grads_e):
        if a is None:
            assert b is None
        elif exact:
            assert torch.equal(a, b)
        else:
            # a few ulp of the largest entry: the products and the row weights are rounded in another order
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))


@needs_compiled
@pytest.mark.parametrize("mode", ["hard", "soft", "teacher"])
def test_cpu_fwd_bwd_takes_two_gemms_with_frozen_prototypes(mode):
    # the logits and dF, nothing recomputed: the forward pass's gradient is what the backward returns
    f, p, kw = _problem(40, 90, 16, mode)
    f.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        proto_cross_entropy(f, p, TAU, backend="compiled", **kw).backward()
    names = [e.name for e in prof.events()]
    student = [n for n in names if n in ("aten::mm", "aten::addmm", "aten::addmm_")]
    teacher = 1 if mode == "teacher" else 0  # the teacher's own logits, no gradient
    assert len(student) == 2 + teacher, names
    assert "pyprotoclip::_proto_softmax_loss_backward" not in names
