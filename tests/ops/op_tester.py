"""The tester every op's tests inherit, in the pattern of torchvision's ``RoIOpTester`` (test/test_ops.py).

A subclass says how to build one problem (``make_case``), how to call the op's public function (``fn``)
and how to compute the float64 oracle (``expected_fn``); the tester then runs the same checks on every op,
for backend ("compiled", "reference") x device (cpu, cuda) x dtype (float32, bfloat16, float16) x the
subclass's ``shapes``:

* ``test_values_and_grads``: every output and the gradient of every differentiable input (scalar scale and
  temperature included) against the float64 oracle on the same (rounded) input values. float32: atol 1e-5
  (rtol 1e-5 for large values). bf16/fp16: the compiled op by ``low_precision_error_ok`` (its error may
  exceed the same-dtype reference's by at most ``slack``); the reference computes in fp32, so it may only
  differ by rounding its results to the dtype.
* ``test_gradcheck``: ``torch.autograd.gradcheck`` in float64 on a tiny problem (the compiled op, which has no
  float64 kernel, through a cast of its inputs to float32).
* ``test_opcheck``: ``torch.library.opcheck`` of the op and of its backward op.
* ``test_compile_fullgraph``: ``torch.compile(fullgraph=True)`` of the public function, forward and
  backward, equal to eager, in exactly one graph.
* ``test_autocast``: the op called inside ``torch.autocast`` with its feature inputs produced by a Linear
  under autocast (how a training step calls it), gradients back-propagated outside: values and gradients
  against the oracle, and for the compiled op the very bits it gives outside autocast.
* ``test_cuda_graphs`` (marked cuda): ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) of the compiled
  op over several steps with new inputs each step, equal to eager.

Ops without gradients set ``differentiable = False`` (and ``test_gradcheck = None``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import pytest
import torch

from pyprotoclip import _library
from tests.utils import assert_close_verbose, low_precision_error_ok

BACKENDS = ["compiled", "reference"]
CUDA = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [pytest.param(t, id=str(t).removeprefix("torch.")) for t in (torch.float32, torch.bfloat16, torch.float16)]
# (device, autocast dtype): what a training step uses (--precision amp_bf16 on CPU; amp / amp_bf16 on CUDA)
AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float16, marks=CUDA, id="cuda-float16"),
    pytest.param("cuda", torch.bfloat16, marks=CUDA, id="cuda-bfloat16"),
]
FP32_TOL = 1e-5

# pyprotoclip/ops/reference.py computes its GEMMs with the ambient dtype: under torch.autocast its matmuls
# run in bf16/fp16 (and its results come out in that dtype), unlike the kernels, which keep fp32. Reported;
# the fix belongs in the reference (run it under torch.autocast(device_type, enabled=False)).


def skip_unavailable(backend: str, device: str) -> None:
    if backend == "compiled" and device not in _library.compiled_devices():
        pytest.skip(f"pyprotoclip._C has no {device} kernels in this build")


@dataclasses.dataclass
class Case:
    """One problem: ``args`` are the op's positional tensor inputs (differentiated when the op is), ``kwargs``
    everything else (targets, weights, teacher tensors, top-k, ...), passed as is."""

    args: list[torch.Tensor]
    kwargs: dict[str, Any]


def to64(value: Any) -> Any:
    """Floating tensors (also inside dicts) to float64; anything else unchanged."""
    if isinstance(value, dict):
        return {name: to64(v) for name, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double()
    return value


def scalar(value: float, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A 0-d scale / temperature as a trainer holds it: fp32 (float64 for a float64 problem)."""
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


class OpTester:
    """Base class of every op's tests (not collected itself: the name does not start with ``Test``)."""

    #: names of fn's outputs and positional args, for messages
    output_names: Sequence[str] = ("out",)
    arg_names: Sequence[str] = ()
    #: the shapes test_values_and_grads runs (whatever make_case takes); small problems for the other tests
    shapes: Sequence[Any] = ()
    small_shape: Any = None
    gradcheck_shape: Any = None
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16)
    differentiable = True
    #: low-precision slack of low_precision_error_ok per output / gradient name, the default, and the default on
    #: CUDA (None: the same), where bf16/fp16 GEMMs run on tensor cores with their operands in that dtype
    slacks: dict[str, float] = {}
    slack = 2e-3
    cuda_slack: float | None = None
    #: float32 rtol per output / gradient name where 1e-5 is below what fp32 sums of n*m terms resolve, and the
    #: float32 tolerance on CUDA (fast exp, other summation orders)
    fp32_rtols: dict[str, float] = {}
    cuda_fp32_tol = FP32_TOL
    #: False when the CUDA kernels accumulate with atomics (run-to-run differences in the last bits)
    deterministic_on_cuda = True

    # ---- what a subclass provides ------------------------------------------------------------------------

    def make_case(self, shape: Any, device: str, dtype: torch.dtype) -> Case:
        """Inputs of ``shape`` on ``device``: features in ``dtype``, built in float64 first and then cast, with
        hard cases (confident rows, duplicates) where they matter."""
        raise NotImplementedError

    def fn(self, *args: torch.Tensor, backend: str, **kwargs: Any) -> Any:
        """The op's public function."""
        raise NotImplementedError

    def expected_fn(self, *args: torch.Tensor, **kwargs: Any) -> Any:
        """The float64 oracle: the reference formula on float64 inputs."""
        raise NotImplementedError

    def opcheck_cases(self, device: str) -> list[tuple[torch._ops.OpOverload, tuple]]:
        """(op overload, args) pairs for torch.library.opcheck: the forward op(s) and their backward ops."""
        raise NotImplementedError

    def gradcheck_case(self) -> Case:
        """The float64 problem test_gradcheck differentiates numerically (small: each input element costs two
        calls; smooth enough for the kernels' wide finite-difference step)."""
        return self.make_case(self.gradcheck_shape, "cpu", torch.float64)

    def check(self, got: list, oracle: list, same_dtype_ref: list | None, *, case: Case, dtype: torch.dtype,
              backend: str, device: str) -> None:
        """Compares ``run`` results (outputs, then gradients) with the oracle's. Override for ops whose
        outputs need their own rule (arg-min ties, top-k indices)."""
        names = self.result_names()
        if same_dtype_ref is not None:
            for name, g, r in zip(names, got, same_dtype_ref):
                assert g.dtype == r.dtype and g.shape == r.shape, (
                    f"{name}: {g.dtype} {tuple(g.shape)} vs the reference's {r.dtype} {tuple(r.shape)}"
                )
        cuda = device == "cuda"
        tol = self.cuda_fp32_tol if cuda else FP32_TOL
        slack = self.cuda_slack if cuda and self.cuda_slack is not None else self.slack
        for name, g, o, r in zip(names, got, oracle, same_dtype_ref or [None] * len(got)):
            rtol = max(tol, self.fp32_rtols.get(name, tol))
            if dtype in (torch.float32, torch.float64):
                assert_close_verbose(g, o, atol=tol, rtol=rtol, name=name)
            elif backend == "compiled":
                low_precision_error_ok(g, r, o, slack=self.slacks.get(name, slack), name=f"{dtype} {name}")
            else:  # the reference computes in fp32: only its results are rounded to the dtype
                eps = torch.finfo(g.dtype).eps if g.is_floating_point() else 0.0
                assert_close_verbose(g, o, atol=tol, rtol=max(rtol, eps), name=f"{dtype} {name}")

    # ---- helpers -----------------------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "shape" in metafunc.fixturenames:
            metafunc.parametrize("shape", self.shapes, ids=[str(s) for s in self.shapes])

    def result_names(self) -> list[str]:
        grads = [f"grad {name}" for name in self.arg_names] if self.differentiable else []
        return list(self.output_names) + grads

    @staticmethod
    def _outputs(out: Any) -> list[torch.Tensor]:
        return list(out) if isinstance(out, (tuple, list)) else [out]

    @staticmethod
    def weights(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The fixed random weights w of the scalar sum_o sum(o * w_o) whose gradients are compared (a
        non-uniform grad_output), in each output's dtype: every backend and the oracle see the same values."""
        g = torch.Generator().manual_seed(1234)
        return [torch.rand(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]

    def backward(self, out: Any, inputs: Sequence[torch.Tensor], like: Sequence[torch.Tensor] | None = None):
        """(outputs, gradients of sum_o sum(o * w_o) w.r.t. inputs), detached and cloned (CUDA graphs overwrite
        their outputs on the next replay). The weights are those of ``like``'s outputs (default: out's)."""
        outputs = self._outputs(out)
        if not self.differentiable:
            return [o.detach().clone() for o in outputs], []
        weights = self.weights(outputs if like is None else like)
        total = sum((o * w.to(o.dtype)).sum() for o, w in zip(outputs, weights))
        grads = torch.autograd.grad(total, list(inputs))
        return [o.detach().clone() for o in outputs], [g.detach().clone() for g in grads]

    def run(self, case: Case, backend: str, *, fn: Callable | None = None) -> list[torch.Tensor]:
        """Outputs, then the gradient of each arg, for ``fn`` (default: the public function) on fresh leaves."""
        leaves = [a.detach().clone().requires_grad_(self.differentiable) for a in case.args]
        call = fn if fn is not None else (lambda args, kwargs: self.fn(*args, backend=backend, **kwargs))
        outputs, grads = self.backward(call(leaves, case.kwargs), leaves)
        return outputs + grads

    def run_oracle(self, case: Case, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``run`` of the float64 oracle, with the weights of the run whose outputs are ``like`` (bf16 outputs
        get bf16-rounded weights, which the oracle then takes exactly)."""
        leaves = [to64(a).requires_grad_(self.differentiable) for a in case.args]
        outputs, grads = self.backward(self.expected_fn(*leaves, **to64(case.kwargs)), leaves, like)
        return outputs + grads

    def compare_with_oracle(self, case: Case, got: list, backend: str, dtype: torch.dtype, device: str) -> None:
        oracle = self.run_oracle(case, got[: len(self.output_names)])
        ref = self.run(case, "reference") if backend == "compiled" else None
        self.check(got, oracle, ref, case=case, dtype=dtype, backend=backend, device=device)

    # ---- the tests ---------------------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_values_and_grads(self, backend, device, dtype, shape):
        if dtype not in self.dtypes:
            pytest.skip(f"{dtype} is not supported by this op")
        skip_unavailable(backend, device)
        case = self.make_case(shape, device, dtype)
        got = self.run(case, backend)
        self.compare_with_oracle(case, got, backend, dtype, device)

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_gradcheck(self, backend):
        skip_unavailable(backend, "cpu")
        case = self.gradcheck_case()
        leaves = [a.detach().clone().requires_grad_() for a in case.args]

        def fn(*args):
            if backend == "compiled":  # no float64 kernel (a ValueError): differentiate through a cast to fp32
                args = tuple(a.float() for a in args)
            return self.fn(*args, backend=backend, **case.kwargs)

        # the kernels compute in fp32: finite differences need a wide step
        tol = {"eps": 1e-2, "atol": 5e-3, "rtol": 1e-2} if backend == "compiled" else {}
        assert torch.autograd.gradcheck(fn, leaves, **tol)

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(self, device):
        skip_unavailable("compiled", device)
        cases = self.opcheck_cases(device)
        assert cases
        for op, args in cases:
            torch.library.opcheck(op, args)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_compile_fullgraph(self, backend, device):
        skip_unavailable(backend, device)
        from torch._dynamo.testing import CompileCounterWithBackend

        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")

        @torch.compile(fullgraph=True, backend=counter)
        def compiled(args, kwargs):
            return self.fn(*args, backend=backend, **kwargs)

        case = self.make_case(self.small_shape, device, torch.float32)
        got = self.run(case, backend, fn=compiled)
        want = self.run(case, backend)
        assert counter.frame_count == 1, f"expected one graph, dynamo made {counter.frame_count}"
        for name, g, w in zip(self.result_names(), got, want):
            assert_close_verbose(g, w, atol=1e-6, rtol=1e-6, name=f"compiled {name}")

    @pytest.mark.parametrize("device,dtype", AUTOCAST)
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_autocast(self, backend, device, dtype):
        skip_unavailable(backend, device)
        case = self.make_case(self.small_shape, device, torch.float32)
        # Every (n, d) input comes out of a Linear under autocast, as features from a model do. The Linear is
        # the identity, so its output holds the case's values rounded to the autocast dtype.
        layers = []
        for a in case.args:
            layer = None
            if a.dim() == 2:
                layer = torch.nn.Linear(a.shape[1], a.shape[1], bias=False, device=device)
                with torch.no_grad():
                    layer.weight.copy_(torch.eye(a.shape[1]))
            layers.append(layer)
        leaves = [a.detach().clone().requires_grad_(self.differentiable) for a in case.args]
        with torch.autocast(device, dtype=dtype), torch.set_grad_enabled(self.differentiable):
            inputs = [layer(x) if layer is not None else x for layer, x in zip(layers, leaves)]
            out = self.fn(*inputs, backend=backend, **case.kwargs)
        for layer, x in zip(layers, inputs):
            assert layer is None or x.dtype == dtype
        # backward outside autocast, as a training step does; also to the Linear weights (fp32 parameters)
        weights = [layer.weight for layer in layers if layer is not None] if self.differentiable else []
        outputs, grads = self.backward(out, list(inputs) + weights)
        for w, g in zip(weights, grads[len(inputs) :]):
            assert g.dtype == w.dtype and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0), "model gradient"
        got = outputs + grads[: len(inputs)]

        # the same values as plain tensors of the autocast dtype, outside autocast
        plain = Case([x.detach() for x in inputs], case.kwargs)
        self.compare_with_oracle(plain, got, backend, dtype, device)
        # and autocast changes nothing: the op computes as it does outside autocast
        for name, g, w in zip(self.result_names(), got, self.run(plain, backend)):
            if device == "cuda" and not self.deterministic_on_cuda and g.is_floating_point():
                assert_close_verbose(g, w, atol=FP32_TOL, rtol=FP32_TOL, name=f"{name} (outside autocast)")
            else:
                assert torch.equal(g, w), f"{name}: differs under autocast from the same call outside it"

    @CUDA
    def test_cuda_graphs(self):
        """torch.compile(mode="reduce-overhead") replays the whole step as a CUDA graph: kernels must run on
        the current stream and never synchronise. New inputs each step; results equal eager every time. Only
        the compiled backend: the reference is plain PyTorch, and inductor compiling it costs GPU-machine time."""
        backend = "compiled"
        skip_unavailable(backend, "cuda")
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()

        @torch.compile(mode="reduce-overhead")
        def compiled(args, kwargs):
            return self.fn(*args, backend=backend, **kwargs)

        for step in range(4):  # warm-up, record, then replays
            case = self.make_case(self.small_shape, "cuda", torch.float32)
            got = self.run(case, backend, fn=compiled)
            want = self.run(case, backend)
            for name, g, w in zip(self.result_names(), got, want):
                assert_close_verbose(g, w, atol=FP32_TOL, rtol=FP32_TOL, name=f"step {step} {name}")
        recorded = counters["inductor"]["cudagraph_recorded_non_static_inputs"]
        skipped = counters["inductor"]["cudagraph_skips"]
        assert recorded > 0 and not skipped, f"no CUDA graph replayed: {dict(counters['inductor'])}"
