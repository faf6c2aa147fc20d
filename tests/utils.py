"""Shared test helpers."""

from __future__ import annotations

import os

import torch


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = "") -> None:
    """allclose that, on failure, says how many elements differ and shows the worst few."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bool(bad.any()):
        flat = diff.flatten()
        worst = flat.topk(min(5, flat.numel())).indices
        rows = [
            f"  at {tuple(int(i) for i in torch.unravel_index(j, actual.shape))}: got {actual.flatten()[j]:.8g}, "
            f"expected {expected.flatten()[j]:.8g} (|diff| {flat[j]:.3g})"
            for j in worst
        ]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ beyond atol={atol} rtol={rtol}\n" + "\n".join(rows)
        )


def low_precision_error_ok(kernel: torch.Tensor, same_dtype_reference: torch.Tensor, oracle64: torch.Tensor, *, slack: float, name: str = "") -> None:
    """The ml-cross-entropy rule for bf16/fp16: the kernel's error against the float64 oracle may not
    exceed the same-dtype reference's error by more than ``slack``."""
    k_err = (kernel.detach().double().cpu() - oracle64.detach().double().cpu()).abs().max().item()
    r_err = (same_dtype_reference.detach().double().cpu() - oracle64.detach().double().cpu()).abs().max().item()
    assert k_err <= r_err + slack, f"{name}: kernel error {k_err:.3g} > reference error {r_err:.3g} + {slack}"


class DiskFull:
    """Make checkpoint writes fail as a full disk does: after ``after`` whole checkpoint files, the file's
    ``write()`` raises ENOSPC once ``limit`` bytes are written (torch's writer then raises its own
    RuntimeError with the OSError behind it, as on a real full disk). ``install(monkeypatch)`` patches
    the ``open`` that :func:`pyprotoclip.checkpoint.save_checkpoint` uses; ``opened`` counts the files."""

    def __init__(self, after: int, limit: int = 1000, before_failing=None) -> None:
        self.after, self.limit, self.before_failing, self.opened = after, limit, before_failing, 0

    def open(self, path, mode="r", *args, **kwargs):
        import builtins
        import errno
        import io

        if "w" not in mode or "b" not in mode:
            return builtins.open(path, mode, *args, **kwargs)
        self.opened += 1
        if self.opened <= self.after:
            return builtins.open(path, mode, *args, **kwargs)
        if self.before_failing is not None:
            self.before_failing()
        limit = self.limit

        class _Full(io.FileIO):
            written = 0

            def write(self, b):
                if self.written + len(b) > limit:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.written += len(b)
                return super().write(b)

        return _Full(path, "wb")

    def install(self, monkeypatch) -> "DiskFull":
        from pyprotoclip import checkpoint

        monkeypatch.setattr(checkpoint, "open", self.open, raising=False)
        return self
