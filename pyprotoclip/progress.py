"""Progress lines for long work when no terminal shows a tqdm bar: a time-based trigger and the ETA text,
shared by training and feature extraction."""

from __future__ import annotations

import time
from typing import Callable


PROGRESS_EVERY_S = 30.0  # without a terminal: a progress line at least this often


def _now() -> float:
    return time.monotonic()


class ProgressClock:
    """The time-based log trigger: when stdout is not a terminal (no tqdm bar), a progress line is due once
    ``every_s`` seconds passed since the last line of any kind. ``clock``: seconds (tests pass a fake one)."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] | None = None) -> None:
        self.every_s = every_s
        self.clock = clock or (lambda: _now())
        self.last = self.clock()

    def due(self) -> bool:
        return self.every_s > 0 and self.clock() - self.last >= self.every_s

    def mark(self) -> None:
        """A line was just written."""
        self.last = self.clock()


def eta_seconds(mean_step_s: float, step: int, last_step: int) -> float:
    """Seconds until ``last_step``: the mean step time so far times the steps left (training steps only)."""
    return max(last_step - step, 0) * mean_step_s


def format_duration(seconds: float) -> str:
    """'1h02m', '12m05s', '42s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
