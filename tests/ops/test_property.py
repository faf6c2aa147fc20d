"""Property-based tests (hypothesis) of the whole public op API and ``KMeans.fit`` on bad and odd input.

Each example draws one call: shapes (0-sized, 1, odd, K > N), dtypes (fp32, bf16, fp16, fp64, int, bool),
layouts (contiguous, transposed, strided, expanded with a zero stride), NaN/Inf entries, scalars of every
kind (python float/int, 0-d and 1-element tensors, negative, zero, NaN, Inf, bool, a string, an int too
large for a float), and every backend ("auto", "compiled", "reference" and bad names). The generator
records which arguments it made invalid. The property:

* no argument invalid: the call returns the float64 oracle's values (the reference on float64 copies of
  the same rounded inputs) within ``atol = rtol = 1e-4`` (probabilities returned in bf16/fp16: their
  rounding, 2 eps), and for the loss ops and proto_assign the gradients of every floating input too (1e-4;
  gradients in bf16/fp16: 4 eps); k-means assignments by the float64 oracle wherever it is not a near-tie
  (1e-3), ``KMeans.fit`` labels (near-)nearest and its inertia equal to the objective of its labels;
* some argument invalid: the call raises ``ValueError`` (the convention of ``pyprotoclip.ops.checks``)
  whose message starts with the name of one of the invalid arguments;
* never another exception type, a crash or a silent answer to an invalid call.

``derandomize=True``: the same examples on every run (CI is reproducible); the whole file runs in well
under a minute on one CPU thread.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyprotoclip import _library  # noqa: E402
from pyprotoclip.cluster import KMeans  # noqa: E402
from pyprotoclip.ops import (  # noqa: E402
    infonce_loss,
    kmeans_update,
    proto_assign,
    proto_cross_entropy,
    reference,
    similarity_cross_entropy,
)
from tests.ops.test_kmeans import _oracle_check  # noqa: E402
from tests.utils import assert_close_verbose  # noqa: E402

COMPILED = "cpu" in _library.compiled_devices()
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DTYPES = FLOATS + (torch.int64, torch.int32, torch.bool)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
SPECIALS = ("", "nan", "inf", "-inf")
BACKENDS = ("auto", "compiled", "reference")
BAD_BACKENDS = ("fast", "", "Compiled", None, 1)
TOL = 1e-4

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@dataclasses.dataclass
class Arg:
    value: Any
    bad: bool = False


@dataclasses.dataclass
class Call:
    """One drawn call: ``run(backend)`` calls the public function; ``bad`` names the invalid arguments."""

    run: Callable[[], Any]
    bad: set[str]
    check: Callable[[Any], None]  # validates a result when nothing is bad
    describe: str = ""


# ---- drawing arguments ----------------------------------------------------------------------------


def _values(draw, n: int, d: int, *, normalize: bool = True) -> torch.Tensor:
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return F.normalize(x, dim=1) if normalize and d else x


def matrix(draw, name: str, n: int, d: int, *, dtypes=DTYPES, dtype=None, normalize=True, allow_special=True) -> Arg:
    """An (n, d) tensor of a drawn dtype and layout, maybe with a NaN/Inf; bad when it cannot be valid
    (non-floating, empty, non-finite)."""
    clean = draw(st.sampled_from([True, True, True, False]))  # most tensors valid: one fault at a time, mostly
    if dtype is None:
        dtype = draw(st.sampled_from([t for t in dtypes if t in FLOATS] if clean else dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    special = draw(st.sampled_from(SPECIALS)) if allow_special and not clean else ""
    base = _values(draw, n, d, normalize=normalize)
    if layout == "expanded" and n > 0:
        base = base[:1].expand(n, d).clone()  # same values; the zero stride comes after the cast
    if special and n * d > 0:
        i = 0 if layout == "expanded" else draw(st.integers(0, n - 1))  # row 0 is every row when expanded
        j = draw(st.integers(0, d - 1))
        base[i, j] = float(special)
    if dtype in FLOATS:
        t = base.to(dtype)
    elif dtype == torch.bool:
        t = base > 0
    else:
        t = (3 * base).round().to(dtype)
    if layout == "transposed":
        t = t.t().contiguous().t()
    elif layout == "strided":
        t = torch.stack([t, torch.zeros_like(t)], dim=2).reshape(n, 2 * d)[:, ::2] if d else t
    elif layout == "expanded" and n > 0:
        t = t[:1].expand(n, d)
    bad = dtype not in FLOATS or n == 0 or d == 0 or (bool(special) and n * d > 0)
    return Arg(t, bad)


def scalar(draw, *, positive: bool, dtype: torch.dtype = torch.float32) -> Arg:
    """A scale or temperature of any kind; bad when it is not a finite real number (> 0 when positive)."""
    good = 0.5 if positive else draw(st.sampled_from([0.5, 2.0, 10.0]))
    valid = ["float", "int", "0d", "0d64", "0d16", "1d", "1x1", "grad"] + ([] if positive else ["negative", "zero"])
    kind = draw(st.sampled_from(valid * 3 + [
        "negative", "zero", "nan", "inf", "bool", "int tensor", "bool tensor", "2 values", "empty", "string", "none",
        "huge int", "list",
    ]))
    sign_ok = not positive
    table = {
        "float": (good, True),
        "int": (2, True),
        "0d": (torch.tensor(good), True),
        "0d64": (torch.tensor(good, dtype=torch.float64), True),
        "0d16": (torch.tensor(good, dtype=torch.float16), True),
        "1d": (torch.tensor([good]), True),
        "1x1": (torch.tensor([[good]]), True),
        "grad": (torch.tensor(good, requires_grad=True), True),
        "negative": (draw(st.sampled_from([-0.5, torch.tensor(-2.0)])), sign_ok),
        "zero": (draw(st.sampled_from([0.0, 0, torch.tensor(0.0)])), sign_ok),
        "nan": (draw(st.sampled_from([float("nan"), torch.tensor(float("nan"))])), False),
        "inf": (draw(st.sampled_from([float("inf"), -float("inf"), torch.tensor(float("inf"))])), False),
        "bool": (draw(st.sampled_from([True, False])), False),
        "int tensor": (torch.tensor(2), False),
        "bool tensor": (torch.tensor(True), False),
        "2 values": (torch.tensor([good, good]), False),
        "empty": (torch.tensor([]), False),
        "string": ("0.5", False),
        "none": (None, False),
        "huge int": (10**400, False),
        "list": ([good], False),
    }
    value, ok = table[kind]
    return Arg(value, not ok)


def backend(draw) -> Arg:
    name = draw(st.sampled_from(BACKENDS * 3 + BAD_BACKENDS))
    return Arg(name, name not in BACKENDS)


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double()


def _scalar64(v: Any) -> torch.Tensor:
    return torch.tensor(float(v.detach().reshape(()) if isinstance(v, torch.Tensor) else v), dtype=torch.float64)


# ---- running a call -----------------------------------------------------------------------------


def assert_property(call: Call) -> None:
    hypothesis.event("invalid call" if call.bad else "valid call")
    try:
        out = call.run()
    except ValueError as exc:
        msg = str(exc)
        assert call.bad, f"ValueError for a valid call ({call.describe}): {msg}"
        assert any(re.match(rf"{re.escape(name)}\b", msg) for name in call.bad), (
            f"the message names none of the invalid arguments {sorted(call.bad)} ({call.describe}): {msg}"
        )
        return
    except Exception as exc:  # noqa: BLE001 - the property is exactly "nothing but ValueError"
        raise AssertionError(f"{type(exc).__name__} instead of a result or ValueError ({call.describe}): {exc}") from exc
    assert not call.bad, f"no error for invalid {sorted(call.bad)} ({call.describe})"
    call.check(out)


def size(draw, lo: int = 1, hi: int = 6) -> int:
    """A size, 0 now and then (an empty tensor), else lo..hi (1 and odd sizes included)."""
    return draw(st.sampled_from(list(range(lo, hi + 1)) * 2 + [0]))  # valid first: hypothesis starts there


def _bad(**args: Arg) -> set[str]:
    return {name for name, a in args.items() if a.bad}


def _mark_compiled_float64(bad: set[str], be: Arg, *named: tuple[str, Arg]) -> None:
    """backend='compiled' has no float64 kernel: a ValueError naming the float64 argument."""
    if be.value == "compiled":
        for name, a in named:
            if isinstance(a.value, torch.Tensor) and a.value.dtype == torch.float64:
                bad.add(name)
        if not COMPILED:
            bad.add("backend")


def _grad_inputs(*args: Arg) -> list[torch.Tensor]:
    return [a.value for a in args if isinstance(a.value, torch.Tensor) and a.value.is_floating_point()]


def _check_grads(out: torch.Tensor, want: torch.Tensor, got_inputs: list, want_inputs: list, names: list) -> None:
    """Gradients of sum(out) w.r.t. the differentiable inputs against the oracle's (small cases)."""
    pairs = [(g, w, n) for g, w, n in zip(got_inputs, want_inputs, names) if g.requires_grad]
    if not pairs:
        return
    got = torch.autograd.grad(out.sum(), [g for g, _, _ in pairs], allow_unused=True)
    exp = torch.autograd.grad(want.sum(), [w for _, w, _ in pairs], allow_unused=True)
    for (g_in, _, name), g, e in zip(pairs, got, exp):
        e = torch.zeros_like(g_in, dtype=torch.float64) if e is None else e
        g = torch.zeros_like(g_in) if g is None else g
        assert g.shape == g_in.shape, f"grad {name}: shape {tuple(g.shape)} for input {tuple(g_in.shape)}"
        tol = TOL if g_in.dtype in (torch.float32, torch.float64) else 4 * torch.finfo(g_in.dtype).eps
        assert_close_verbose(g, e, atol=tol, rtol=tol, name=f"grad {name}")


def _leaf(a: Arg) -> Arg:
    """Make a floating tensor argument differentiable (a view of a leaf keeps its layout)."""
    t = a.value
    if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad:
        t = t.detach().requires_grad_()  # a leaf with the same strides (expanded/strided/transposed views stay so)
    return Arg(t, a.bad)


def _oracle_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(t.requires_grad)


# ---- the ops --------------------------------------------------------------------------------------


def draw_similarity(draw) -> Call:
    n, m, d = size(draw), size(draw), size(draw)
    q = _leaf(matrix(draw, "q", n, d))
    k = _leaf(matrix(draw, "k", m, draw(st.sampled_from([d] * 8 + [d + 1]))))
    if k.value.shape[1] != d:
        k.bad = True  # feature sizes differ
    kind = draw(st.sampled_from(["ok"] * 12 + ["high", "negative", "float", "int32", "short", "2d", "list"]))
    if kind in ("ok", "high", "negative"):
        t = torch.randint(0, max(m, 1), (n,))
        if n and kind == "high":
            t[0] = m
        if n and kind == "negative":
            t[-1] = -1
        targets = Arg(t, bad=(kind != "ok" and n > 0) or (m == 0 and n > 0))
    else:
        targets = Arg({"float": torch.zeros(n), "int32": torch.zeros(n, dtype=torch.int32),
                       "short": torch.zeros(max(n - 1, 0), dtype=torch.int64) if n else torch.zeros(1, dtype=torch.int64),
                       "2d": torch.zeros(n, 1, dtype=torch.int64), "list": [0] * n}[kind], True)
    s, be = scalar(draw, positive=False), backend(draw)
    bad = _bad(q=q, k=k, targets=targets, scale=s, backend=be)
    _mark_compiled_float64(bad, be, ("q", q), ("k", k))

    def run():
        return similarity_cross_entropy(q.value, k.value, targets.value, s.value, backend=be.value)

    def check(out):
        q64, k64 = _oracle_leaf(q.value), _oracle_leaf(k.value)
        s64 = _scalar64(s.value)
        want = reference.similarity_cross_entropy(q64, k64, targets.value, s64)[0]
        assert out.shape == (n,)
        assert_close_verbose(out, want, atol=TOL, rtol=TOL, name="loss")
        if q.value.dtype == torch.float64 or k.value.dtype == torch.float64:
            assert out.dtype == torch.float64, "a float64 problem must be computed (and returned) in float64"
        _check_grads(out, want, [q.value, k.value], [q64, k64], ["q", "k"])

    return Call(run, bad, check, f"similarity q{tuple(q.value.shape)} {q.value.dtype} k {getattr(k.value, 'dtype', None)} "
                f"targets {kind} scale {s.value!r} backend {be.value!r}")


def draw_infonce(draw) -> Call:
    n, d = size(draw), size(draw)
    image = _leaf(matrix(draw, "image_features", n, d))
    n2, d2 = draw(st.sampled_from([(n, d)] * 8 + [(n + 1, d), (n, d + 1)]))
    text = _leaf(matrix(draw, "text_features", n2, d2))
    if (n2, d2) != (n, d):
        text.bad = True
    s, be = scalar(draw, positive=False), backend(draw)
    bad = _bad(image_features=image, text_features=text, logit_scale=s, backend=be)
    _mark_compiled_float64(bad, be, ("image_features", image), ("text_features", text))

    def run():
        return infonce_loss(image.value, text.value, s.value, backend=be.value)

    def check(out):
        i64, t64 = _oracle_leaf(image.value), _oracle_leaf(text.value)
        want = reference.infonce_loss(i64, t64, _scalar64(s.value))
        assert out.shape == ()
        assert_close_verbose(out, want, atol=TOL, rtol=TOL, name="loss")
        _check_grads(out, want, [image.value, text.value], [i64, t64], ["image_features", "text_features"])

    return Call(run, bad, check, f"infonce {tuple(image.value.shape)} {image.value.dtype} / {text.value.dtype} "
                f"{tuple(text.value.shape)} scale {s.value!r} backend {be.value!r}")


def _proto_pair(draw):
    n, kk, d = size(draw), size(draw, 1, 7), size(draw)
    f = _leaf(matrix(draw, "features", n, d))
    same = draw(st.sampled_from([True] * 6 + [False]))
    p_dtype = f.value.dtype if same else None
    p = _leaf(matrix(draw, "prototypes", kk, draw(st.sampled_from([d] * 8 + [d + 1])), dtype=p_dtype))
    if p.value.dtype != f.value.dtype or p.value.shape[1] != d:
        p.bad = True
    return n, kk, f, p


def draw_proto_assign(draw) -> Call:
    n, kk, f, p = _proto_pair(draw)
    tau, be = scalar(draw, positive=True), backend(draw)
    topk_kind = draw(st.sampled_from([None] * 6 + [1, 1, "K", "K", 0, "K+1", 2.0, True, "2"]))
    topk = {"K": kk, "K+1": kk + 1}.get(topk_kind, topk_kind) if isinstance(topk_kind, str) and topk_kind.startswith("K") else topk_kind
    topk_arg = Arg(topk, topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= kk))
    bad = _bad(features=f, prototypes=p, temperature=tau, backend=be, topk=topk_arg)
    _mark_compiled_float64(bad, be, ("features", f))

    def run():
        return proto_assign(f.value, p.value, tau.value, topk=topk_arg.value, backend=be.value)

    def check(out):
        f64, p64 = _oracle_leaf(f.value), _oracle_leaf(p.value)
        want = reference.proto_assign(f64, p64, _scalar64(tau.value))
        dt = f.value.dtype
        tol = TOL if dt in (torch.float32, torch.float64) else 2 * torch.finfo(dt).eps
        if topk is None:
            assert out.dtype == dt and out.shape == (n, kk)
            assert_close_verbose(out, want, atol=tol, rtol=tol, name="probs")
            _check_grads(out * torch.arange(1.0, kk + 1), want * torch.arange(1.0, kk + 1, dtype=torch.float64),
                         [f.value, p.value], [f64, p64], ["features", "prototypes"])
        else:
            values, indices = out
            assert values.shape == indices.shape == (n, topk) and indices.dtype == torch.int64
            assert_close_verbose(values, want.topk(topk, dim=1).values, atol=tol, rtol=tol, name="top-k values")
            assert_close_verbose(want.gather(1, indices), want.topk(topk, dim=1).values, atol=2 * tol, rtol=tol,
                                 name="probabilities at the top-k indices")

    return Call(run, bad, check, f"proto_assign f{tuple(f.value.shape)} {f.value.dtype} p {getattr(p.value, 'dtype', None)}"
                f"{tuple(p.value.shape)} tau {tau.value!r} topk {topk!r} backend {be.value!r}")


def draw_proto_cross_entropy(draw) -> Call:
    n, kk, f, p = _proto_pair(draw)
    tau, be = scalar(draw, positive=True), backend(draw)
    mode = draw(st.sampled_from(["hard", "soft", "teacher"] * 3 + ["none", "both", "bad hard", "bad soft", "bad teacher"]))
    kw: dict[str, Any] = {}
    bad: set[str] = set()
    kmax = max(kk, 1)
    if mode in ("hard", "bad hard", "both"):
        t = torch.randint(0, kmax, (n,))
        how = draw(st.sampled_from(["high", "negative", "int32", "short"])) if mode == "bad hard" else ""
        if how == "high" and n:
            t[0] = kk
        elif how == "negative" and n:
            t[0] = -1
        elif how == "int32":
            t = t.int()
        elif how == "short":
            t = t[:-1] if n else torch.zeros(1, dtype=torch.int64)
        kw["target"] = t
        if how or (kk == 0 and n > 0):
            bad.add("target")
    if mode in ("soft", "bad soft"):
        q = torch.softmax(3 * torch.randn(n, kk, dtype=torch.float64), dim=1) if kk else torch.zeros(n, 0)
        q = q.to(draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])))
        how = draw(st.sampled_from(["nan", "negative", "counts", "shape"])) if mode == "bad soft" else ""
        if how == "nan" and n * kk:
            q[0, 0] = float("nan")
        elif how == "negative" and n * kk:
            q[0, 0] = -0.5
        elif how == "counts" and n * kk:
            q = q * 3
        elif how == "shape":
            q = torch.full((n, kk + 1), 1.0 / (kk + 1))
        kw["target"] = q
        if (how and (n * kk or how == "shape")) or (kk == 0 and n > 0):
            bad.add("target")
    if mode in ("teacher", "bad teacher", "both"):
        dt = draw(st.integers(1, 5))
        tdt = draw(st.sampled_from([torch.float32, torch.float64]))
        tf = matrix(draw, "teacher_features", n, dt, dtype=tdt)
        tc = matrix(draw, "teacher_prototypes", kk, dt, dtype=tdt)
        tt = scalar(draw, positive=True)
        how = draw(st.sampled_from(["no features", "no prototypes", "no temperature", "rows"])) if mode == "bad teacher" else ""
        if how == "rows":
            tc = Arg(torch.randn(kk + 1, dt, dtype=tdt), True)
        kw.update(teacher_features=tf.value, teacher_prototypes=tc.value, teacher_temperature=tt.value)
        bad |= _bad(teacher_features=tf, teacher_prototypes=tc, teacher_temperature=tt)
        if how.startswith("no "):
            name = "teacher_" + how[3:]
            kw.pop(name)
            bad.add(name)
        if mode == "both":
            bad.add("target")
    if mode == "none":
        bad.add("target")
    reduction = Arg(draw(st.sampled_from(["mean", "sum", "none"] * 3 + ["avg", None])))
    reduction.bad = reduction.value not in ("mean", "sum", "none")
    bad |= _bad(features=f, prototypes=p, temperature=tau, backend=be, reduction=reduction)
    _mark_compiled_float64(bad, be, ("features", f))

    def run():
        return proto_cross_entropy(f.value, p.value, tau.value, reduction=reduction.value, backend=be.value, **kw)

    def check(out):
        f64, p64 = _oracle_leaf(f.value), _oracle_leaf(p.value)
        kw64 = {name: (v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                for name, v in kw.items()}
        if "teacher_temperature" in kw64:
            kw64["teacher_temperature"] = _scalar64(kw64["teacher_temperature"])
        if "target" in kw64:
            idx = kw64["target"] if kw64["target"].dtype == torch.int64 else None
            probs = None if idx is not None else kw64["target"]
            args = (idx, probs, None, None, None)
        else:
            args = (None, None, kw64["teacher_features"], kw64["teacher_prototypes"], kw64["teacher_temperature"])
        loss = reference.proto_softmax_loss(f64, p64, _scalar64(tau.value), *args)[0]
        want = {"mean": loss.mean(), "sum": loss.sum(), "none": loss}[reduction.value]
        assert out.shape == want.shape
        assert out.dtype == (torch.float64 if f.value.dtype == torch.float64 else torch.float32), out.dtype
        assert_close_verbose(out, want, atol=TOL, rtol=TOL, name="loss")
        _check_grads(out, want, [f.value, p.value], [f64, p64], ["features", "prototypes"])

    return Call(run, bad, check, f"proto_cross_entropy f{tuple(f.value.shape)} {f.value.dtype} p "
                f"{getattr(p.value, 'dtype', None)} mode {mode} tau {tau.value!r} reduction {reduction.value!r} "
                f"backend {be.value!r}")


def draw_kmeans_update(draw) -> Call:
    n, kk, d = size(draw, 1, 7), size(draw, 1, 9), size(draw, 1, 5)  # k > n often
    x = matrix(draw, "x", n, d, normalize=False)
    c = matrix(draw, "centroids", kk, draw(st.sampled_from([d] * 8 + [d + 1])), normalize=False)
    if c.value.shape[1] != d:
        c.bad = True
    metric = Arg(draw(st.sampled_from(["l2", "cosine"] * 4 + ["dot", None])))
    metric.bad = metric.value not in ("l2", "cosine")
    wkind = draw(st.sampled_from([None, "ok", "zeros", "float64"] * 3 + ["negative", "nan", "int", "short", "2d"]))
    wvals = {
        None: None, "ok": torch.rand(n) + 0.1, "zeros": torch.zeros(n), "negative": -torch.ones(n),
        "nan": torch.full((n,), float("nan")), "int": torch.ones(n, dtype=torch.int64),
        "short": torch.ones(n + 1), "2d": torch.ones(n, 1), "float64": torch.rand(n, dtype=torch.float64),
    }
    weights = Arg(wvals[wkind], wkind in ("int", "short", "2d") or (wkind in ("negative", "nan") and n > 0))
    be = backend(draw)
    bad = _bad(x=x, centroids=c, metric=metric, weights=weights, backend=be)
    if not x.bad and not c.bad and kk == 0:
        bad.add("centroids")
    _mark_compiled_float64(bad, be, ("x", x))

    def run():
        return kmeans_update(x.value, c.value, metric=metric.value, weights=weights.value, backend=be.value)

    def check(out):
        # near-ties may go either way (fp32 vs float64): the oracle decides the clear ones
        _oracle_check(x.value.float(), c.value.float(), weights.value, metric.value, out, margin=1e-3, score_atol=1e-3)

    return Call(run, bad, check, f"kmeans_update x{tuple(x.value.shape)} {x.value.dtype} c{tuple(c.value.shape)} "
                f"{c.value.dtype} metric {metric.value!r} weights {wkind} backend {be.value!r}")


def draw_kmeans_fit(draw) -> Call:
    n, d = draw(st.sampled_from(list(range(3, 13)) * 2 + [1, 0])), size(draw, 1, 4)
    x = matrix(draw, "x", n, d, dtypes=FLOATS + (torch.int64,), normalize=False)
    kk = draw(st.sampled_from([1, 2, 3] * 4 + [13, 0, -1, True, 2.5, "2"]))
    n_clusters = Arg(kk, isinstance(kk, bool) or not isinstance(kk, int) or kk < 1)

    def pick(valid: list, invalid: list) -> Arg:
        value, bad = draw(st.sampled_from([(v, False) for v in valid] * (3 * len(invalid)) + [(v, True) for v in invalid]))
        return Arg(value, bad)

    params: dict[str, Arg] = {
        "n_iter": pick([0, 1, 3], [-1, True, 1.5]),
        "metric": pick(["l2", "cosine"], ["dot"]),
        "n_redo": pick([1, 2], [0, False]),
        "seed": pick([0, 7], ["x", 1.5, None]),
        "max_points_per_centroid": pick([256, 1], [0]),
        "tol": pick([1e-4, None, 0], [-1.0, float("nan"), True, "0"]),
        "backend": pick(["auto", "compiled", "reference"], ["fast", None]),
    }
    init_kind = draw(st.sampled_from(["k-means++", "random", "tensor"] * 4 + ["nan tensor", "wrong rows", "int tensor", "bogus"]))
    good_k = kk if isinstance(kk, int) and not isinstance(kk, bool) and kk >= 1 else 1
    init_value = {
        "k-means++": "k-means++", "random": "random", "tensor": torch.randn(good_k, max(d, 1)),
        "nan tensor": torch.full((good_k, max(d, 1)), float("nan")), "wrong rows": torch.randn(good_k + 1, max(d, 1)),
        "int tensor": torch.ones(good_k, max(d, 1), dtype=torch.int64), "bogus": "kmeans",
    }[init_kind]
    params["init"] = Arg(init_value, init_kind in ("nan tensor", "wrong rows", "int tensor", "bogus")
                         or (init_kind == "tensor" and d == 0 and not x.bad))
    wkind = draw(st.sampled_from([None, "ok"] * 3 + ["negative", "zeros"]))
    weights = Arg({None: None, "ok": torch.rand(n) + 0.1, "negative": -torch.ones(n), "zeros": torch.zeros(n)}[wkind],
                  (wkind == "negative" and n > 0) or (wkind == "zeros" and n > 0))
    bad = _bad(n_clusters=n_clusters, x=x, weights=weights, **params)
    if not x.bad and not n_clusters.bad and n < kk:
        bad.add("x")  # fewer points than clusters
    if params["backend"].value == "compiled":
        _mark_compiled_float64(bad, params["backend"], ("x", x))

    def run():
        km = KMeans(n_clusters.value, **{name: a.value for name, a in params.items()})
        return km.fit(x.value, weights.value)

    def check(km):
        xf = x.value.double()
        metric = params["metric"].value
        c = km.centroids_.double()
        assert km.centroids_.shape == (kk, d) and km.labels_.shape == (n,) and km.labels_.dtype == torch.int64
        assert bool(((km.labels_ >= 0) & (km.labels_ < kk)).all())
        if metric == "cosine":
            xf, c = F.normalize(xf, dim=1, eps=1e-12), F.normalize(c, dim=1, eps=1e-12)
        table = torch.cdist(xf, c).square()
        chosen = table.gather(1, km.labels_.view(-1, 1)).squeeze(1)
        assert bool((chosen - table.min(1).values <= 1e-3).all()), "a label is not the (near-)nearest centroid"
        w = torch.ones(n, dtype=torch.float64) if weights.value is None else weights.value.double()
        assert km.inertia_ == pytest.approx(float((chosen * w).sum()), rel=1e-3, abs=1e-3)

    return Call(run, bad, check, f"KMeans({kk!r}, {({k: a.value for k, a in params.items() if k != 'init'})}, "
                f"init {init_kind}).fit(x{tuple(x.value.shape)} {x.value.dtype}, weights {wkind})")


# ---- the tests ------------------------------------------------------------------------------------


@SETTINGS
@given(st.data())
def test_similarity_cross_entropy(data):
    assert_property(draw_similarity(data.draw))


@SETTINGS
@given(st.data())
def test_infonce_loss(data):
    assert_property(draw_infonce(data.draw))


@SETTINGS
@given(st.data())
def test_proto_assign(data):
    assert_property(draw_proto_assign(data.draw))


@settings(SETTINGS, max_examples=200)
@given(st.data())
def test_proto_cross_entropy(data):
    assert_property(draw_proto_cross_entropy(data.draw))


@SETTINGS
@given(st.data())
def test_kmeans_update(data):
    assert_property(draw_kmeans_update(data.draw))


@settings(SETTINGS, max_examples=80)
@given(st.data())
def test_kmeans_fit(data):
    assert_property(draw_kmeans_fit(data.draw))


# ---- float64: exact with "auto"/"reference", a ValueError with "compiled" ---------------------------


def _float64_calls():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    f, p, q, k = r(5, 4), r(3, 4), r(5, 4), r(6, 4)
    s64 = torch.tensor(2.0, dtype=torch.float64)
    return {
        "similarity_cross_entropy": (
            "q", lambda b: similarity_cross_entropy(q, k, torch.arange(5), s64, backend=b),
            lambda: reference.similarity_cross_entropy(q, k, torch.arange(5), s64)[0]),
        "similarity_cross_entropy (k float64)": (
            "k", lambda b: similarity_cross_entropy(q.float(), k, torch.arange(5), 2.0, backend=b),
            lambda: reference.similarity_cross_entropy(q.float().double(), k, torch.arange(5), s64)[0]),
        "infonce_loss": (
            "image_features", lambda b: infonce_loss(q, k[:5], s64, backend=b), lambda: reference.infonce_loss(q, k[:5], s64)),
        "proto_assign": ("features", lambda b: proto_assign(f, p, 0.1, backend=b),
                         lambda: reference.proto_assign(f, p, torch.tensor(0.1, dtype=torch.float64))),
        "proto_assign topk": ("features", lambda b: proto_assign(f, p, 0.1, topk=2, backend=b)[0],
                              lambda: reference.proto_assign_topk(f, p, torch.tensor(0.1, dtype=torch.float64), 2)[0]),
        "proto_cross_entropy": (
            "features", lambda b: proto_cross_entropy(f, p, 0.1, target=torch.tensor([0, 1, 2, 0, 1]), backend=b),
            lambda: reference.proto_softmax_loss(f, p, torch.tensor(0.1, dtype=torch.float64),
                                                 torch.tensor([0, 1, 2, 0, 1]))[0].mean()),
        "kmeans_update": ("x", lambda b: kmeans_update(q, k[:3], backend=b)[1],
                          lambda: reference.kmeans_update(q, k[:3], None, "l2")[1].float()),  # float32 outputs, float64 accumulation
    }


@pytest.mark.parametrize("op", list(_float64_calls()))
def test_float64_compiled_raises_naming_the_argument(op):
    name, call, _ = _float64_calls()[op]
    with pytest.raises(ValueError, match=rf"^{name}: backend='compiled' has no float64 kernel.*torch\.float64.*"
                                         r"backend='reference' or 'auto'"):
        call("compiled")


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("op", list(_float64_calls()))
def test_float64_auto_and_reference_are_exact(op, backend, monkeypatch):
    monkeypatch.setenv("PYPROTOCLIP_BACKEND", "compiled")  # auto still gives float64 to the reference
    _, call, want = _float64_calls()[op]
    got = call(backend)
    assert got.dtype == want().dtype, f"{op}: {got.dtype}"
    assert torch.equal(got, want()), f"{op}: not the float64 reference's bits"
