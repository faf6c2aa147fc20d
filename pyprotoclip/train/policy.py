"""When to save and when to stop: the save policy and the stop policy, each in one place.

Checkpoint names: ``epoch_<N>.pt`` after epoch N, and ``epoch_latest.pt`` (overwritten) for resuming.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Mapping

import torch
import torch.distributed as dist

from pyprotoclip.checkpoint import LATEST

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # a scheduler's stop request (SLURM sends SIGUSR1 before a
# time limit) or Ctrl-C; a second Ctrl-C aborts at once without saving

log = logging.getLogger("pyprotoclip.train")


class Preemption:
    """SIGTERM / SIGUSR1 / SIGINT ask the run to stop at the next step boundary with a resumable checkpoint.

    A second SIGINT (Ctrl-C twice) raises KeyboardInterrupt at once: the run aborts without saving more.
    A SIGINT that the process was started ignoring (``nohup``, a background job) stays ignored.
    The handler only records the signal; :meth:`requested` is asked after every step and answers for all
    ranks at once (one all-reduce of a host flag over a gloo group), so every rank stops at the same step.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}
        self._interrupts = 0

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPTION_SIGNALS:
                num = getattr(signal, name, None)
                if num is None or (name == "SIGINT" and signal.getsignal(num) is signal.SIG_IGN):
                    continue
                self._previous[num] = signal.signal(num, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self._interrupts += 1
            if self._interrupts > 1:
                log.warning("interrupted again (SIGINT): aborting now; nothing more was saved")
                raise KeyboardInterrupt
            log.warning("interrupted (SIGINT): saving at the end of this step; press Ctrl-C again to abort "
                        "without saving")
        self.signal = name

    def uninstall(self) -> None:
        for num, handler in self._previous.items():
            signal.signal(num, handler)
        self._previous = {}

    def requested(self) -> bool:
        if self.group is None:
            return self.signal is not None
        flag = torch.tensor([int(self.signal is not None)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if flag.item() and self.signal is None:
            self.signal = "a signal to another process"
        return bool(flag.item())


def stop_reached(p: Mapping[str, Any], step: int) -> bool:
    """--stop-after-steps: the run ends, resumably, once this global step is done."""
    return p["stop_after_steps"] is not None and step >= p["stop_after_steps"]


def checkpoints_after_step(p: Mapping[str, Any], step: int, *, preempted: bool = False) -> list[str]:
    """Checkpoints to write after a step that does not end an epoch."""
    if preempted or stop_reached(p, step) or (p["save_every_n_steps"] and step % p["save_every_n_steps"] == 0):
        return [LATEST]
    return []


def checkpoints_after_epoch(p: Mapping[str, Any], epochs_done: int, step: int, *, preempted: bool = False) -> list[str]:
    """Checkpoints to write when epoch ``epochs_done`` (1-based count) has ended."""
    names = []
    if p["save_frequency"] and (epochs_done % p["save_frequency"] == 0 or epochs_done == p["epochs"]):
        names.append(f"epoch_{epochs_done}.pt")
    stopping = (preempted or stop_reached(p, step)) and epochs_done < p["epochs"]
    if p["save_most_recent"] or p["save_every_n_steps"] or stopping:
        names.append(LATEST)
    return names


def validate_after_epoch(p: Mapping[str, Any], epochs_done: int) -> tuple[bool, bool]:
    """(run validation, include zero-shot) after epoch ``epochs_done``."""
    last = epochs_done == p["epochs"]
    val = bool(p["val_data"]) and bool(p["val_frequency"]) and (epochs_done % p["val_frequency"] == 0 or last)
    zeroshot = bool(p["zeroshot_frequency"]) and (epochs_done % p["zeroshot_frequency"] == 0 or last)
    return val, val and zeroshot
