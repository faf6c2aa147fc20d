"""Argument validation shared by the public op functions and the drivers built on them (k-means, losses).

Every failure is a ``ValueError`` that names the argument and says what was expected. Shape, dtype and
device checks read metadata only. Value checks (finiteness, ranges, a scalar's sign) read data, which on
a GPU is a device-to-host synchronisation; they are skipped while ``torch.compile`` traces (they would
break the graph), inside :func:`skip_value_checks` (a training step, whose inputs come from the model,
checks its loss instead) and when ``PYPROTOCLIP_SKIP_CHECKS=1``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_state = threading.local()


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    """Within this block (this thread), op calls skip the checks that read tensor values.

    For hot loops that validated their data once (k-means iterations) or whose inputs come from a
    model (training steps): no device-to-host synchronisation per call. Metadata checks still run.
    """
    before = getattr(_state, "skip", False)
    _state.skip = True
    try:
        yield
    finally:
        _state.skip = before


def value_checks_enabled() -> bool:
    if torch.compiler.is_compiling():  # first: torch.compile folds it, and never traces the rest
        return False
    return not (getattr(_state, "skip", False) or os.environ.get("PYPROTOCLIP_SKIP_CHECKS") == "1")


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def float_matrix(name: str, value: object, *, allow_empty: bool = False) -> torch.Tensor:
    """A 2-D floating tensor (n, d) with n >= 1 and d >= 1."""
    t = tensor(name, value)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (n, d), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype float32, bfloat16, float16 or float64, got {t.dtype}")
    if not allow_empty and (t.shape[0] == 0 or t.shape[1] == 0):
        raise ValueError(f"{name}: expected a non-empty (n, d) tensor, got shape {tuple(t.shape)}")
    return t


def same_device(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (as {first_name}), got {t.device}")


def same_dtype(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.dtype != first.dtype:
            raise ValueError(f"{name}: expected dtype {first.dtype} (as {first_name}), got {t.dtype}")


def same_width(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.shape[-1] != first.shape[-1]:
            raise ValueError(
                f"{name}: expected feature size {first.shape[-1]} to match {first_name} "
                f"{tuple(first.shape)}, got {tuple(t.shape)}"
            )


def weights_vector(name: str, value: object, n: int, like: torch.Tensor) -> torch.Tensor:
    """Optional per-row weights: a (n,) floating tensor on ``like``'s device, finite and non-negative."""
    w = tensor(name, value)
    if w.dim() != 1 or w.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) to match the rows, got {tuple(w.shape)}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype, got {w.dtype}")
    if w.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {w.device}")
    finite(name, w)
    if value_checks_enabled() and bool((w < 0).any()):
        raise ValueError(f"{name}: expected non-negative values, got min {float(w.min())}")
    return w


def finite(name: str, t: torch.Tensor) -> None:
    finite_all([(name, t)])


def _extremes(ts: Sequence[torch.Tensor]) -> list[float]:
    # min and max of each tensor, read back in one transfer: a tensor is finite iff both are (min/max
    # propagate NaN). One reduction over each tensor and no (n, d) temporaries, unlike isfinite(t).all()
    # (abs, two compares and an and over the whole tensor). Tensors of one dtype are stacked together
    # (no conversion, so a finite float64 never reads as inf); mixed dtypes go one tensor at a time.
    with torch.no_grad():  # no autograd graph for the check
        if all(t.dtype == ts[0].dtype for t in ts):
            return torch.stack([m for t in ts for m in torch.aminmax(t)]).tolist()
        return [v for t in ts for v in torch.stack(torch.aminmax(t)).tolist()]


def finite_all(named: Sequence[tuple[str, torch.Tensor]]) -> None:
    """``finite(name, t)`` for each pair in order (the first non-finite one raises), with a single
    device-to-host read for all of them."""
    if not value_checks_enabled():
        return
    named = [(name, t) for name, t in named if t.numel()]
    if not named:
        return
    values = _extremes([t for _, t in named])
    for i, (name, t) in enumerate(named):
        lo, hi = values[2 * i], values[2 * i + 1]
        if not (-_INF < lo <= hi < _INF):  # False for NaN too
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{name}: expected finite values, found {bad} NaN/Inf entries")


_INF = float("inf")


def scalar(
    name: str, value: object, device: torch.device, *, positive: bool = False, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """A python number or 0-d/1-element floating tensor, returned as a 0-d tensor on ``device``.

    ``dtype`` is the dtype a python number becomes (default: torch's default dtype, float32); a
    tensor keeps its own dtype.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: expected a scalar (0-d tensor or float), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point scalar, got dtype {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name}: expected device {device}, got {value.device}")
        t = value if value.dim() == 0 else value.reshape(())
        if t.device != device:
            t = t.to(device)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            raise ValueError(f"{name}: expected a finite value, got an int of {value.bit_length()} bits") from None
        t = torch.tensor(number, dtype=dtype, device=device)
    else:
        raise ValueError(f"{name}: expected a float or a 0-d tensor, got {type(value).__name__}")
    if value_checks_enabled():
        v = float(t.detach())
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{name}: expected a finite value, got {v}")
        if positive and v <= 0:
            raise ValueError(f"{name}: expected a value > 0, got {v}")
    return t
