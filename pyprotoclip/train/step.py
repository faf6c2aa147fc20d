"""One optimizer step: forward, the method's loss, backward, optimizer update; exact gradient accumulation.

With ``accum`` micro-batches, every micro-batch's outputs are first computed without grad; then each
micro-batch is recomputed with grad and the loss runs on the whole step's outputs (the cached ones
and the live ones concatenated in order), as open_clip's ``accum_features`` does, but for the whole
output dict. Per-sample outputs (a leading batch dimension) are concatenated, so each sample's
gradient reaches the model once; global outputs (0-d: logit scales, temperatures) keep their graph
in the last micro-batch only, so every learnable scale gets the one-big-batch gradient once too.

A step whose loss (any micro-batch) or, without a GradScaler, gradient norm is non-finite is skipped
exactly: no optimizer or scaler update, the BatchNorm running statistics put back
(:mod:`pyprotoclip.train.faults`). Deciding that is the step's one host read; nothing else is read back.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch

from pyprotoclip.losses import StepContext
from pyprotoclip.ops import skip_value_checks
from pyprotoclip.train.faults import BufferSnapshot, step_unless_nonfinite


def autocast_factory(precision: str, device: torch.device) -> tuple[Callable[[], Any], bool]:
    """(autocast context factory, use a GradScaler) for a --precision name; amp on CPU is fp32."""
    if precision == "amp" and device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), True
    if precision in ("amp_bf16", "amp_bfloat16"):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), False
    return contextlib.nullcontext, False


def merge_outputs(cached: Sequence[Mapping[str, Any]], live: Mapping[str, Any], j: int, *, last: bool) -> dict[str, Any]:
    """The step's outputs with micro-batch ``j`` live: per-sample tensors concatenated in micro-batch
    order, 0-d tensors from ``live`` (detached unless ``last``), anything else from ``live``."""
    out: dict[str, Any] = {}
    for key, value in live.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            parts = [c[key] for c in cached[:j]] + [value] + [c[key] for c in cached[j + 1 :]]
            out[key] = torch.cat(parts)
        elif isinstance(value, torch.Tensor):
            out[key] = value if last else value.detach()
        else:
            out[key] = value
    return out


def batch_metadata(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-sample metadata of the step's micro-batches (everything but image and text), concatenated."""
    meta: dict[str, Any] = {}
    for key in batches[0]:
        if key in ("image", "text"):
            continue
        values = [b[key] for b in batches]
        meta[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else [v for part in values for v in part]
    return meta


@dataclasses.dataclass
class StepResult:
    """A step's loss terms (detached, on the device) and, for a skipped step, what was non-finite."""

    terms: dict[str, torch.Tensor]
    skipped: str | None = None  # None: the update was applied; "loss" or "gradients": skipped


def train_step(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    batches: Sequence[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None,
    autocast: Callable[[], Any],
    device: torch.device,
    context: StepContext,
    grad_clip_norm: float | None,
) -> StepResult:
    """One optimizer step over ``len(batches)`` micro-batches, skipped when it is non-finite (module doc).

    ``model`` may be DDP-wrapped (gradients are synchronised on the last micro-batch only). With a
    GradScaler only a non-finite loss skips the step here: the scaler's own skips of steps with inf
    gradients (finding its scale) stay its business and are not faults.
    """
    accum = len(batches)
    optimizer.zero_grad(set_to_none=True)
    images = [b["image"].to(device, non_blocking=True) for b in batches]
    texts = [b["text"].to(device, non_blocking=True) for b in batches]
    buffers = BufferSnapshot.of(model)
    losses: list[torch.Tensor] = []  # every micro-batch's loss: their sum is finite iff each one is

    def backward(loss: torch.Tensor) -> None:
        losses.append(loss.detach())
        (scaler.scale(loss) if scaler is not None else loss).backward()

    with skip_value_checks():  # the ops' inputs come from the model; the loss is checked below
        if accum == 1:
            with autocast():
                outputs = model(images[0], texts[0])
            terms = loss_fn(outputs, step_context=context)
            backward(terms["loss"])
        else:
            with torch.no_grad():
                cached = []
                for img, txt in zip(images, texts):
                    with autocast():
                        cached.append(model(img, txt))
            for j in range(accum):
                last = j == accum - 1
                sync = contextlib.nullcontext() if (last or not hasattr(model, "no_sync")) else model.no_sync()
                with sync:
                    with autocast():
                        live = model(images[j], texts[j])
                    terms = loss_fn(merge_outputs(cached, live, j, last=last), step_context=context)
                    backward(terms["loss"])
    terms = {name: value.detach() for name, value in terms.items()}
    loss_sum = losses[0] if accum == 1 else torch.stack(losses).sum()
    skipped = step_unless_nonfinite(loss_sum, model, optimizer, scaler=scaler, buffers=buffers,
                                    grad_clip_norm=grad_clip_norm)
    if skipped is not None:
        return StepResult(terms, skipped)
    return StepResult(terms)
