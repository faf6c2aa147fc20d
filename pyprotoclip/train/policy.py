"""When to save and when to stop: the save policy and the stop policy, each in one place.

Checkpoint names: ``epoch_<N>.pt`` after epoch N, and ``epoch_latest.pt`` (overwritten) for resuming.
"""

from __future__ import annotations

from typing import Any, Mapping

from pyprotoclip.checkpoint import LATEST


def stop_reached(p: Mapping[str, Any], step: int) -> bool:
    """--stop-after-steps: the run ends, resumably, once this global step is done."""
    return p["stop_after_steps"] is not None and step >= p["stop_after_steps"]


def checkpoints_after_step(p: Mapping[str, Any], step: int) -> list[str]:
    """Checkpoints to write after a step that does not end an epoch."""
    if stop_reached(p, step) or (p["save_every_n_steps"] and step % p["save_every_n_steps"] == 0):
        return [LATEST]
    return []


def checkpoints_after_epoch(p: Mapping[str, Any], epochs_done: int, step: int) -> list[str]:
    """Checkpoints to write when epoch ``epochs_done`` (1-based count) has ended."""
    names = []
    if p["save_frequency"] and (epochs_done % p["save_frequency"] == 0 or epochs_done == p["epochs"]):
        names.append(f"epoch_{epochs_done}.pt")
    stopping = stop_reached(p, step) and epochs_done < p["epochs"]
    if p["save_most_recent"] or p["save_every_n_steps"] or stopping:
        names.append(LATEST)
    return names


def validate_after_epoch(p: Mapping[str, Any], epochs_done: int) -> tuple[bool, bool]:
    """(run validation, include zero-shot) after epoch ``epochs_done``."""
    last = epochs_done == p["epochs"]
    val = bool(p["val_data"]) and bool(p["val_frequency"]) and (epochs_done % p["val_frequency"] == 0 or last)
    zeroshot = bool(p["zeroshot_frequency"]) and (epochs_done % p["zeroshot_frequency"] == 0 or last)
    return val, val and zeroshot
