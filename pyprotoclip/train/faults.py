"""Faults a step or a save can meet, handled the same way by ``pyprotoclip train`` and ``ood train``.

Non-finite steps: after backward, one flag says whether the step's loss (any micro-batch) or, without a
GradScaler, its gradient norm is non-finite; it is agreed over all ranks (one all-reduce) and read back
once (the step's only host read). A flagged step is skipped: no optimizer (or scaler) update, the
model's buffers (BatchNorm running statistics) put back, no method update. :class:`NonFiniteGuard`
counts skipped steps, logs them (rate-limited) and stops the run after ``--max-nonfinite`` in a row.
"""

from __future__ import annotations

import errno
import os
import weakref
from typing import Sequence

import torch
import torch.distributed as dist

from pyprotoclip.train.reporting import log

LOSS, GRADIENTS = "loss", "gradients"
LOG_FIRST = 10  # skipped steps logged one by one, then every LOG_EVERY-th
LOG_EVERY = 100


class TrainingError(RuntimeError):
    """A fault that ends a run; its message is one line, printed without a traceback."""


def nonfinite_flags(loss_sum: torch.Tensor, grad_norm: torch.Tensor | None) -> torch.Tensor:
    """(2,) int32 on the loss's device: [loss non-finite, gradient norm non-finite]; agreed over ranks."""
    bad_loss = ~torch.isfinite(loss_sum.detach().float())
    bad_grad = ~torch.isfinite(grad_norm.detach().float()) if grad_norm is not None else torch.zeros_like(bad_loss)
    flags = torch.stack([bad_loss, bad_grad]).to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank skips the same steps
    return flags


def read_flags(flags: torch.Tensor) -> str | None:
    """The step's one host read: None for a good step, else what was non-finite ("loss" or "gradients")."""
    code = int(flags[0] + 2 * flags[1])
    if code == 0:
        return None
    return LOSS if code & 1 else GRADIENTS


def gradient_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The global 2-norm of ``grads``, accumulated in fp32 (fp16 gradients do not overflow it)."""
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))


def step_unless_nonfinite(loss_sum: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                          scaler: torch.amp.GradScaler | None, buffers: "BufferSnapshot",
                          grad_clip_norm: float | None = None) -> str | None:
    """After backward: take the optimizer step, or skip it when it is non-finite. Returns None (stepped) or
    what was non-finite ("loss" or "gradients"), the same on every rank.

    ``loss_sum``: the sum of the step's micro-batch losses. Without a GradScaler the gradient norm is checked
    too (with clipping it is the norm clipping uses, computed once); with one, only the loss: the scaler's own
    skips of steps with inf gradients (finding its scale) are not faults. A skipped step puts ``buffers`` back
    and clears the gradients; what else the caller changed in the step it restores itself.
    """
    norm = None
    if scaler is None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grad_clip_norm is not None else gradient_norm(grads)
    skipped = read_flags(nonfinite_flags(loss_sum, norm))
    if skipped is not None:
        buffers.restore()
        optimizer.zero_grad(set_to_none=True)
        return skipped
    if scaler is not None:
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), grad_clip_norm, norm)
        optimizer.step()
    return None


class BufferSnapshot:
    """Copies of a model's buffers taken before a step, put back when the step is skipped (a non-finite
    forward must not leave NaN in BatchNorm running statistics). Only modules with running statistics.

    Per step use :meth:`of`: the buffer list and the storage for the copies are made once per model and
    reused (a copy into them per step, no allocation); they are made afresh when a buffer was replaced
    (``model.to(...)``, a reassigned buffer). ``BufferSnapshot(model)`` takes a one-off snapshot.
    """

    _by_model: "weakref.WeakKeyDictionary[torch.nn.Module, BufferSnapshot]" = weakref.WeakKeyDictionary()

    def __init__(self, model: torch.nn.Module) -> None:
        # weak references to the modules: the snapshot kept for a model must not keep the model alive
        self._where = [(weakref.ref(m), name) for m in model.modules() if getattr(m, "track_running_stats", False)
                       for name, b in m._buffers.items() if b is not None]
        self.buffers = [m()._buffers[name] for m, name in self._where]
        self.saved = [torch.empty_like(b) for b in self.buffers]
        self.take()

    @classmethod
    def of(cls, model: torch.nn.Module) -> "BufferSnapshot":
        """The model's buffers as they are now, in storage kept for ``model`` from its previous call."""
        snap = cls._by_model.get(model)
        if snap is None or not snap._current():
            snap = cls._by_model[model] = cls(model)
        else:
            snap.take()
        return snap

    def _current(self) -> bool:
        """Whether every buffer collected is still the one its module holds (none replaced)."""
        for (ref, name), buf in zip(self._where, self.buffers):
            m = ref()
            if m is None or m._buffers.get(name) is not buf:
                return False
        return True

    @torch.no_grad()
    def take(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    @torch.no_grad()
    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.saved)


def params_nonfinite(model: torch.nn.Module) -> bool:
    """Whether any parameter holds NaN/Inf (read once, when a run stops)."""
    return any(not bool(torch.isfinite(p.detach()).all()) for p in model.parameters())


class NonFiniteGuard:
    """Counts skipped (non-finite) steps and ends the run after ``max_in_row`` of them in a row (0: never).

    ``total`` counts every skipped step of the run; ``in_row`` the current streak, from ``first_bad_step``.
    All three are kept in checkpoints (:meth:`state_dict`), so a streak goes on counting after a resume.
    """

    def __init__(self, max_in_row: int, *, flag: str = "--max-nonfinite", is_main: bool = True, total: int = 0) -> None:
        self.max_in_row, self.flag, self.is_main = max_in_row, flag, is_main
        self.total, self.in_row = total, 0
        self.first_bad_step: int | None = None

    def state_dict(self) -> dict[str, int | None]:
        """The checkpoint entries: ``skipped_steps``, ``nonfinite_in_row``, ``nonfinite_first_bad_step``."""
        return {"skipped_steps": self.total, "nonfinite_in_row": self.in_row, "nonfinite_first_bad_step": self.first_bad_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (a checkpoint without the streak entries: no streak)."""
        self.total = int(state.get("skipped_steps", 0))
        self.in_row = int(state.get("nonfinite_in_row") or 0)
        first = state.get("nonfinite_first_bad_step")
        self.first_bad_step = int(first) if first is not None and self.in_row else None

    def record(self, skipped: str | None, step: int, model: torch.nn.Module, terms: dict[str, torch.Tensor]) -> None:
        """After optimizer step number ``step`` (1-based, as the log lines count): ``skipped`` is what
        :func:`read_flags` said. Raises :class:`TrainingError` when the streak reaches the limit."""
        if skipped is None:
            self.in_row, self.first_bad_step = 0, None
            return
        self.total += 1
        self.in_row += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        if self.is_main and (self.total <= LOG_FIRST or self.total % LOG_EVERY == 0):
            what = f"non-finite loss ({float(terms['loss'])})" if skipped == LOSS else "non-finite gradients"
            later = (f"; further skipped steps are logged every {LOG_EVERY}th" if self.total == LOG_FIRST else "")
            log.warning("step %d: %s, step skipped (no update); %d in a row, %d in this run (%s %d)%s", step, what,
                        self.in_row, self.total, self.flag, self.max_in_row, later)
        if self.max_in_row and self.in_row >= self.max_in_row:
            weights = (" and the weights themselves are non-finite" if params_nonfinite(model) else
                       f"; the weights are those after step {self.first_bad_step - 1}")
            raise TrainingError(
                f"training stopped: {self.in_row} steps in a row had a non-finite loss or gradients (steps "
                f"{self.first_bad_step}-{step}, {self.flag} {self.max_in_row}){weights}; lower --lr, set "
                f"--grad-clip-norm or check the data ({self.flag} 0 never stops)"
            )


def checkpoint_write_error(path: str, exc: Exception, ckpt_dir: str) -> str:
    """The one-line message for a checkpoint that could not be written, naming the newest intact one."""
    from pyprotoclip import checkpoint as ckpt

    reason = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).splitlines()[0]
    then = "free space, then" if getattr(exc, "errno", None) == errno.ENOSPC else "once the directory is writable,"
    latest = ckpt.find_latest(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    try:
        step = ckpt.load_checkpoint(latest, mmap=True).get("step") if latest is not None else None
    except (ValueError, OSError):
        latest = step = None
    if latest is not None:
        kept = f"the previous checkpoint {latest} (step {step}) is intact; {then} continue with --resume latest"
    else:
        kept = "no earlier checkpoint exists"
    return f"could not write checkpoint {path}: {reason} ({kept})"
