"""A training run's checkpoint: what is saved (the schema of :mod:`pyprotoclip.checkpoint`) and how
a run continues from it, exactly: model, optimizer, scaler, step, RNG of every rank, method state."""

from __future__ import annotations

import os
from typing import Any

from pyprotoclip import checkpoint as ckpt
from pyprotoclip import distributed as pdist
from pyprotoclip.train.faults import TrainingError, checkpoint_write_error
from pyprotoclip.train.reporting import log
from pyprotoclip.train.setup import TrainRun


def save(run: TrainRun, names: list[str], epochs_done: int) -> None:
    """Write checkpoint ``names`` (in the run's checkpoint dir) on rank 0; every rank must call it
    (each contributes its RNG state).

    A write that fails (disk full, no permission) leaves the previous file of that name as it was (the
    write is atomic) and ends the run on every rank with a :class:`TrainingError` naming the file, why,
    and the newest intact checkpoint."""
    common = ckpt.training_state(run.net, run.optimizer, run.scaler, run.world)
    method_state = run.method.state_dict()
    error = _write(run, names, epochs_done, common, method_state) if run.is_main and names else None
    error = pdist.broadcast_object(error)  # the other ranks stop too, instead of waiting in the next collective
    if error:
        raise TrainingError(error)


def _write(run: TrainRun, names: list[str], epochs_done: int, common: dict[str, Any],
           method_state: dict[str, Any]) -> str | None:
    """Rank 0's part of :func:`save`; returns the error message of a write that failed."""
    state = {
        "format": ckpt.FORMAT, "step": run.step, "epoch": epochs_done, "steps_per_epoch": run.steps_per_epoch,
        "name": run.p["name"], "model": run.p["model"], "model_cfg": run.model_cfg, "method": run.p["method"],
        **common,
        "method_keys": run.method_keys,
        "method_state": method_state,
        "scheduler": {"kind": run.p["lr_scheduler"], "step": run.step, "total_steps": run.total_steps},
        "params": dict(run.p),
        **(run.nonfinite.state_dict() if run.nonfinite is not None else {"skipped_steps": 0}),
        "results_bytes": run.results.size(),  # a resumed run removes the rows written after this checkpoint
    }
    for name in names:
        path = os.path.join(run.ckpt_dir, name)
        try:
            ckpt.save_checkpoint(state, path)
        except Exception as exc:  # noqa: BLE001 - whatever failed, every rank must learn of it
            return checkpoint_write_error(path, exc, run.ckpt_dir)
        log.info("saved %s (%.1f MB)", path, os.path.getsize(path) / 1e6)
    return None


def resume(run: TrainRun) -> None:
    """Continue from ``run.resume_path`` (if any): everything a checkpoint holds, on every rank."""
    path = run.resume_path
    if not path:
        return
    state = ckpt.load_checkpoint(path)
    if state.get("steps_per_epoch") not in (None, run.steps_per_epoch):
        raise ValueError(
            f"resume: {path} was written with {state['steps_per_epoch']} steps per epoch, this run has "
            f"{run.steps_per_epoch}; keep --batch-size, --accum-freq, --train-num-samples and the process count"
        )
    if state.get("method", "clip") != run.p["method"]:
        raise ValueError(f"resume: {path} was trained with --method {state.get('method')}, this run has --method {run.p['method']}")
    run.step = ckpt.restore_training_state(state, run.net, run.optimizer, run.scaler, rank=run.rank, world=run.world)
    run.method.load_state_dict(state.get("method_state") or {})
    if run.nonfinite is not None:
        run.nonfinite.load_state_dict(state)
    log.info("resumed from %s at step %d (epoch %d)", path, run.step, run.step // run.steps_per_epoch)
    run.results.rewind_for_resume(state, path, run.ckpt_dir)
