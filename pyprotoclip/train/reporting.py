"""Where a run's numbers go: the console (above a tqdm bar on a terminal), out.log, results.jsonl and
tensorboard; and meters that add a step's terms as tensors, so logging costs no synchronisation
except on the steps that print."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Mapping

import torch

log = logging.getLogger("pyprotoclip.train")


class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints above an active tqdm bar instead of through it."""

    bar = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        else:
            super().emit(record)


def setup_logging(log_file: str | None, is_main: bool) -> _TqdmHandler:
    """Console (INFO on rank 0, WARNING elsewhere) and, on rank 0, ``log_file``; returns the console handler."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%Y-%m-%d %H:%M:%S")
    console = _TqdmHandler(sys.stdout)
    console.setFormatter(fmt)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    log.addHandler(console)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return console


class Meter:
    """Mean of python numbers (times, data fractions)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, v: float, n: int = 1) -> None:
        self.total += v * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


class TermMeter:
    """Running sums of a step's loss terms, kept as detached tensors on the device; ``means()`` reads them."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, terms: Mapping[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach()
            self.sums[name] = value.clone() if name not in self.sums else self.sums[name] + value
        self.count += 1

    def means(self) -> dict[str, float]:
        return {name: float(total) / max(self.count, 1) for name, total in self.sums.items()}


def format_terms(last: Mapping[str, float], avg: Mapping[str, float]) -> str:
    """'name last (running mean)' for every term; the total "loss" only when there are several terms."""
    names = [n for n in last if n != "loss"]
    if len(names) != 1:
        names.append("loss")
    return " | ".join(f"{n} {last[n]:.4f} ({avg[n]:.4f})" for n in names)


class Results:
    """results.jsonl (one JSON object per line) and tensorboard scalars; writes on rank 0 only."""

    def __init__(self, run_dir: str, is_main: bool, tensorboard: bool) -> None:
        self.path = os.path.join(run_dir, "results.jsonl")
        self.is_main = is_main
        self.tb = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, row: Mapping[str, Any], *, scalars: str | None = None) -> None:
        """Append ``row``; with ``scalars="train"`` its numbers also go to tensorboard under train/<key>."""
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(row)) + "\n")
        if self.tb is not None and scalars:
            for key, value in row.items():
                if isinstance(value, float) and key not in ("epoch", "step", "samples"):
                    self.tb.add_scalar(f"{scalars}/{key}", value, row["step"])

    def size(self) -> int:
        """Bytes of results.jsonl so far (0 before its first row, and on other ranks); checkpoints record it."""
        return os.path.getsize(self.path) if self.is_main and os.path.exists(self.path) else 0

    def rewind(self, size: int, step: int) -> int:
        """Resuming from a checkpoint of ``step`` written when results.jsonl had ``size`` bytes: remove the rows
        written after it, which the resumed run writes again, and a line cut short by a kill. ``eval`` rows
        (``pyprotoclip eval``) and ``val`` rows up to ``step`` stay: they are not written again. Rank 0 only;
        returns how many rows were removed."""
        if not self.is_main or not os.path.exists(self.path) or os.path.getsize(self.path) <= size:
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        if size and data[size - 1 : size] != b"\n":  # never mid-line: from the start of the line it falls in
            size = data.rfind(b"\n", 0, size) + 1
        keep, removed = [data[:size]], 0
        for line in data[size:].splitlines(keepends=True):
            try:
                row = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                row = None
            if isinstance(row, dict) and (row.get("type") == "eval" or (row.get("type") == "val" and row.get("step", step + 1) <= step)):
                keep.append(line)
            else:
                removed += 1
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(b"".join(keep))
        os.replace(tmp, self.path)
        return removed

    def rewind_for_resume(self, state: dict[str, Any] | None, path: str | None, ckpt_dir: str) -> None:
        """On resume from checkpoint ``state`` read from ``path`` (None: ``--resume latest`` found none, so the
        rows of an earlier start go): remove the rows written after it (:meth:`rewind`), but only when the
        checkpoint is one of this run directory's: ``results_bytes`` of another run's checkpoint (``--resume``
        into another ``--name``) measured another file. Rank 0 does the work; every trainer calls this."""
        if state is None:
            removed = self.rewind(0, 0)
            if removed:
                log.info("results.jsonl: removed %d row(s) of an earlier start that left no checkpoint", removed)
            return
        if state.get("results_bytes") is None or path is None:
            return
        if os.path.dirname(os.path.realpath(path)) != os.path.realpath(ckpt_dir):
            log.info("results.jsonl: %s is another run directory's checkpoint; this run's rows are kept and "
                     "continue after them", path)
            return
        removed = self.rewind(int(state["results_bytes"]), int(state["step"]))
        if removed:
            log.info("results.jsonl: removed %d row(s) written after that checkpoint; this run writes them again", removed)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def done_line(step: int, start_step: int, wall: float) -> str:
    """``done: step N (M in this process) in Ts``: the same words for ``train`` and ``ood train``."""
    return f"done: step {step} ({step - start_step} in this process) in {wall:.1f}s"
