"""Learning-rate schedules as pure functions of the optimizer step (so resuming needs only the step)."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    base_lr: float,
    warmup: int,
    total_steps: int,
    kind: str = "cosine",
    cooldown_steps: int = 0,
    cooldown_end_lr: float = 0.0,
    cooldown_power: float = 1.0,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based), as open_clip's schedulers compute it.

    Warm-up: ``base_lr * (step + 1) / warmup`` for ``step < warmup``. Then ``cosine`` decays to 0 at
    ``total_steps``; ``const`` stays at ``base_lr``; ``const-cooldown`` stays constant until the last
    ``cooldown_steps`` and then decays polynomially to ``cooldown_end_lr``.
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if kind == "const":
        return base_lr
    if kind == "cosine":
        e = step - warmup
        es = total_steps - warmup
        if es <= 0:
            return base_lr
        return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base_lr
    if kind == "const-cooldown":
        start = total_steps - cooldown_steps
        if step < start:
            return base_lr
        e = step - start
        es = max(total_steps - start, 1)
        decay = (1 - min(e, es) / es) ** cooldown_power
        return decay * (base_lr - cooldown_end_lr) + cooldown_end_lr
    raise ValueError(f"lr-scheduler: expected cosine, const or const-cooldown, got {kind!r}")


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
