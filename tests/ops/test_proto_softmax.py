"""proto_assign and proto_cross_entropy: kernels vs the float64 reference (loss and every gradient) in the
hard / soft / teacher target modes, hand-computed 2x3 values, low precision, opcheck, gradcheck,
torch.compile and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import pyprotoclip
from pyprotoclip.ops import reference
from pyprotoclip.ops import proto_assign, proto_cross_entropy
from tests.utils import assert_close_verbose, low_precision_error_ok

COMPILED = pyprotoclip.build_info()["compiled"]
needs_compiled = pytest.mark.skipif(not COMPILED, reason="pyprotoclip._C is not built")
BACKENDS = ["compiled", "reference"]
MODES = ["hard", "soft", "teacher"]
# (B, K, d): one row, K = 1, sizes that divide nothing, K < B, and K large enough that B spans several
# row blocks of the kernels (block_rows(136, 65536) = 128; 64 with the teacher's second buffer).
SHAPES = [(1, 1, 8), (1, 17, 4), (7, 123, 64), (257, 507, 96), (300, 40, 33)]
MULTI_BLOCK = (136, 65536, 4)
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


# ---- proto_cross_entropy vs the float64 reference ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,k,d", SHAPES)
def test_cross_entropy_matches_reference_fp32(backend, mode, b, k, d):
    _skip_unavailable(backend)
    f, p, kw = _problem(b, k, d, mode)
    got = _loss_and_grads(lambda a, c, t: proto_cross_entropy(a, c, t, backend=backend, **kw), f, p)
    want = _oracle(f, p, kw)
    for name, x, y in zip(NAMES, got, want):
        assert_close_verbose(x, y, atol=2e-5, rtol=2e-5, name=f"{mode} {name}")


@needs_compiled
@pytest.mark.parametrize("mode", MODES)
def test_cross_entropy_matches_reference_multi_block(mode):
    b, k, d = MULTI_BLOCK
    f, p, kw = _problem(b, k, d, mode)
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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_cross_entropy_low_precision_error_no_worse_than_reference(dtype, mode):
    f, p, kw = _problem(67, 301, 64, mode, dtype=dtype)
    kern = _loss_and_grads(lambda a, c, t: proto_cross_entropy(a, c, t, backend="compiled", **kw), f, p)
    ref = _loss_and_grads(lambda a, c, t: proto_cross_entropy(a, c, t, backend="reference", **kw), f, p)
    oracle = _oracle(f, p, kw)
    assert kern[1].dtype == dtype and kern[2].dtype == dtype
    for name, x, r, o in zip(NAMES, kern, ref, oracle):
        low_precision_error_ok(x, r, o, slack=1e-3, name=f"{mode} {dtype} {name}")


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


# ---- proto_assign ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,k,d", SHAPES)
def test_assign_matches_reference_with_grads(backend, b, k, d):
    _skip_unavailable(backend)
    f, p, _ = _problem(b, k, d, "hard")
    w = torch.randn(b, k)
    got = _loss_and_grads(lambda a, c, t: proto_assign(a, c, t, backend=backend), f, p, weights=w)
    want = _loss_and_grads(lambda a, c, t: reference.proto_assign(a, c, t), f.double(), p.double(), weights=w.double())
    for name, x, y in zip(["probs"] + NAMES[1:], got, want):
        assert_close_verbose(x, y, atol=2e-5, rtol=2e-5, name=name)
    assert_close_verbose(got[0].sum(1), torch.ones(b), atol=1e-5, name="row sums")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,k,d,topk", [(1, 1, 8, 1), (7, 123, 64, 5), (257, 507, 96, 17), (40, 10, 8, 10)])
def test_assign_topk_matches_reference(backend, b, k, d, topk):
    _skip_unavailable(backend)
    f, p, _ = _problem(b, k, d, "hard")
    values, indices = proto_assign(f, p, TAU, topk=topk, backend=backend)
    full = reference.proto_assign(f.double(), p.double(), torch.tensor(TAU, dtype=torch.float64))
    want_values = full.topk(topk, dim=1).values
    assert values.shape == (b, topk) and indices.shape == (b, topk) and indices.dtype == torch.int64
    assert_close_verbose(values, want_values, atol=1e-6, rtol=1e-5, name="values")
    # indices are checked through the probabilities they point at (robust to ties)
    assert_close_verbose(full.gather(1, indices), want_values, atol=1e-6, rtol=1e-5, name="probs at indices")
    assert all(len(set(row.tolist())) == topk for row in indices)


@needs_compiled
def test_assign_topk_multi_block():
    b, k, d = MULTI_BLOCK
    f, p, _ = _problem(b, k, d, "hard")
    values, indices = proto_assign(f, p, TAU, topk=3, backend="compiled")
    full = reference.proto_assign(f.double(), p.double(), torch.tensor(TAU, dtype=torch.float64))
    want = full.topk(3, dim=1).values
    assert_close_verbose(values, want, atol=1e-6, rtol=1e-5, name="values")
    assert_close_verbose(full.gather(1, indices), want, atol=1e-6, rtol=1e-5, name="probs at indices")


@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_assign_low_precision(dtype):
    f, p, _ = _problem(67, 301, 64, "hard", dtype=dtype)
    w = torch.randn(67, 301)
    kern = _loss_and_grads(lambda a, c, t: proto_assign(a, c, t, backend="compiled"), f, p, weights=w.to(dtype))
    ref = _loss_and_grads(lambda a, c, t: proto_assign(a, c, t, backend="reference"), f, p, weights=w.to(dtype))
    oracle = _loss_and_grads(lambda a, c, t: reference.proto_assign(a, c, t), f.double(), p.double(), weights=w.double())
    assert kern[0].dtype == dtype
    for name, x, r, o in zip(["probs"] + NAMES[1:], kern, ref, oracle):
        low_precision_error_ok(x, r, o, slack=1e-3, name=f"{dtype} {name}")
    values, _ = proto_assign(f, p, TAU, topk=4, backend="compiled")
    low_precision_error_ok(values, proto_assign(f, p, TAU, topk=4, backend="reference")[0],
                           oracle[0].topk(4, dim=1).values, slack=1e-3, name="topk values")


# ---- gradcheck, opcheck, torch.compile ----------------------------------------------------------------


def _op_args(kw):
    """target_index, target_probs, teacher_features, teacher_prototypes, teacher_temperature for the op."""
    target = kw.get("target")
    index = target if target is not None and target.dtype == torch.int64 else None
    probs = target if target is not None and target.is_floating_point() else None
    tt = kw.get("teacher_temperature")
    return [index, probs, kw.get("teacher_features"), kw.get("teacher_prototypes"),
            None if tt is None else torch.tensor(float(tt))]


@needs_compiled
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_compiled(mode):
    # finite differences of the compiled fp32 forward against the compiled backward
    f, p, kw = _problem(3, 5, 4, mode, dtype=torch.float64)
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    fn = lambda a, c, t: proto_cross_entropy(a, c, t, backend="compiled", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f.requires_grad_(), p.requires_grad_(), tau), eps=1e-2, atol=5e-3, rtol=1e-2)
    fa = lambda a, c, t: proto_assign(a, c, t, backend="compiled")  # noqa: E731
    assert torch.autograd.gradcheck(fa, (f, p, tau), eps=1e-2, atol=5e-3, rtol=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradcheck_float64(mode):
    f, p, kw = _problem(3, 5, 4, mode, dtype=torch.float64)
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    fn = lambda a, c, t: proto_cross_entropy(a, c, t, backend="reference", **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f.requires_grad_(), p.requires_grad_(), tau))


@needs_compiled
@pytest.mark.parametrize("mode", MODES)
def test_opcheck_loss_ops(mode):
    ops = torch.ops.pyprotoclip
    f, p, kw = _problem(9, 13, 8, mode)
    args = _op_args(kw)
    tau = torch.tensor(TAU)
    torch.library.opcheck(ops.proto_softmax_loss.default, (f.requires_grad_(), p.requires_grad_(), tau, *args))
    loss, lse, tlse = ops.proto_softmax_loss(f.detach(), p.detach(), tau, *args)
    for grad_lse in (None, torch.rand(9)):
        torch.library.opcheck(
            ops._proto_softmax_loss_backward.default,
            (torch.rand(9), grad_lse, f.detach(), p.detach(), tau, *args, lse, tlse, [True, True, True]),
        )


@needs_compiled
def test_opcheck_assign_ops():
    ops = torch.ops.pyprotoclip
    f, p, _ = _problem(9, 13, 8, "hard")
    tau = torch.tensor(TAU)
    torch.library.opcheck(ops.proto_assign.default, (f.requires_grad_(), p.requires_grad_(), tau.requires_grad_()))
    torch.library.opcheck(ops.proto_assign_topk.default, (f.detach(), p.detach(), tau.detach(), 4))
    torch.library.opcheck(
        ops._proto_assign_backward.default,
        (torch.randn(9, 13), f.detach(), p.detach(), tau.detach(), [True, True, True]),
    )


@needs_compiled
def test_torch_compile_fullgraph():
    f, p, kw = _problem(16, 24, 8, "teacher")

    def step(a, c, log_tau, index):
        tau = log_tau.exp()
        loss = proto_cross_entropy(a, c, tau, backend="compiled", **kw)
        loss = loss + proto_cross_entropy(a, c, tau, target=index, backend="compiled")
        probs = proto_assign(a, c, tau, backend="compiled")
        values, _ = proto_assign(a, c, tau, topk=3, backend="compiled")
        return loss + probs.square().mean() + values.sum()

    index = torch.randint(0, 24, (16,))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(lambda a, c, t: compiled(a, c, t, index), f, p, math.log(TAU))
    want = _loss_and_grads(lambda a, c, t: step(a, c, t, index), f, p, math.log(TAU))
    for name, x, y in zip(NAMES, got, want):
        assert_close_verbose(x, y, atol=1e-6, rtol=1e-6, name=name)


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


# ---- CUDA -------------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_compiled
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("b,k,d", SHAPES + [MULTI_BLOCK])
def test_cuda_matches_reference(mode, b, k, d):
    f, p, kw = _problem(b, k, d, mode, device="cuda")
    got = _loss_and_grads(lambda a, c, t: proto_cross_entropy(a, c, t, backend="compiled", **kw), f, p)
    want = _oracle(f, p, kw)
    for name, x, y in zip(NAMES, got, want):
        assert_close_verbose(x, y, atol=2e-5, rtol=2e-5, name=f"cuda {mode} {name}")
    w = torch.randn(b, k, device="cuda")
    got = _loss_and_grads(lambda a, c, t: proto_assign(a, c, t, backend="compiled"), f, p, weights=w)
    want = _loss_and_grads(lambda a, c, t: reference.proto_assign(a, c, t), f.double(), p.double(), weights=w.double())
    for name, x, y in zip(["probs"] + NAMES[1:], got, want):
        assert_close_verbose(x, y, atol=2e-5, rtol=2e-5, name=f"cuda assign {name}")
    topk = min(k, 5)
    values, indices = proto_assign(f, p, TAU, topk=topk, backend="compiled")
    assert_close_verbose(values, want[0].topk(topk, dim=1).values, atol=1e-6, rtol=1e-5, name="cuda topk")
    assert_close_verbose(want[0].gather(1, indices), want[0].topk(topk, dim=1).values, atol=1e-6, rtol=1e-5,
                         name="cuda topk indices")


@pytest.mark.cuda
@needs_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_low_precision(dtype, mode):
    f, p, kw = _problem(67, 3001, 64, mode, device="cuda", dtype=dtype)
    kern = _loss_and_grads(lambda a, c, t: proto_cross_entropy(a, c, t, backend="compiled", **kw), f, p)
    ref = _loss_and_grads(lambda a, c, t: proto_cross_entropy(a, c, t, backend="reference", **kw), f, p)
    oracle = _oracle(f, p, kw)
    for name, x, r, o in zip(NAMES, kern, ref, oracle):
        low_precision_error_ok(x, r, o, slack=2e-3, name=f"cuda {mode} {dtype} {name}")


@pytest.mark.cuda
@needs_compiled
def test_cuda_opcheck():
    ops = torch.ops.pyprotoclip
    for mode in MODES:
        f, p, kw = _problem(9, 13, 8, mode, device="cuda")
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _op_args(kw)]
        tau = torch.tensor(TAU, device="cuda")
        torch.library.opcheck(ops.proto_softmax_loss.default, (f.requires_grad_(), p.requires_grad_(), tau, *args))
    torch.library.opcheck(ops.proto_assign.default, (f, p, tau.requires_grad_()))
    torch.library.opcheck(ops.proto_assign_topk.default, (f.detach(), p.detach(), tau.detach(), 4))
