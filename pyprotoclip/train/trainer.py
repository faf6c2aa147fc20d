"""The training loop: build the run, resume, then per epoch ``train_one_epoch``, save, evaluate.

``run(params)`` takes the dict of flags (``params.defaults()`` filled in) and trains with the method
``params["method"]`` names; it works single-process and under ``torchrun`` (one process per device,
DDP; gloo on CPU, NCCL on GPU). The parts, where someone who knows open_clip's ``main.py`` +
``train.py`` looks for them: flags ``params.py``, the run's construction ``setup.py``, one step with
exact gradient accumulation ``step.py``, one epoch ``epoch.py``, checkpoints ``state.py``, when to
save and stop ``policy.py``, logs and results ``reporting.py``.
"""

from __future__ import annotations

import time
from typing import Any

from pyprotoclip import distributed as pdist
from pyprotoclip.train import policy
from pyprotoclip.train.epoch import Speed, log_stop, train_one_epoch
from pyprotoclip.train.faults import NonFiniteGuard
from pyprotoclip.train.reporting import done_line, log
from pyprotoclip.train.setup import TrainRun, build_run, wrap_data_parallel
from pyprotoclip.train.state import resume, save


def run(p: dict[str, Any], *, data: Any = None) -> dict[str, Any]:
    """Train with the flags in ``p`` (keys with underscores); returns a summary dict (with the model).

    data: an object with ``build_loader`` and ``read_zeroshot_files`` (default :mod:`pyprotoclip.data`).
    """
    r = build_run(p, data=data)
    r.nonfinite = NonFiniteGuard(r.p["max_nonfinite"], is_main=r.is_main)
    resume(r)
    wrap_data_parallel(r)
    p = r.p
    log.info("training %s (%s) on %d process(es), device %s: %d steps/epoch x %d epochs, global batch %d",
             p["model"], p["method"], r.world, r.device, r.steps_per_epoch, p["epochs"], r.global_batch)
    log.info("model parameters: %.2fM", sum(x.numel() for x in r.net.parameters()) / 1e6)
    speed, t0, start_step = Speed(), time.time(), r.step
    stopped = False
    r.preemption.install()
    try:
        for epoch in range(r.step // r.steps_per_epoch, p["epochs"]):
            stopped = train_one_epoch(r, epoch, speed)
            if stopped:
                break
            preempted = r.preemption.requested()
            save(r, policy.checkpoints_after_epoch(p, epoch + 1, r.step, preempted=preempted), epoch + 1)
            if not preempted:
                evaluate(r, epoch + 1)
            if (preempted or policy.stop_reached(p, r.step)) and epoch + 1 < p["epochs"]:
                log_stop(r, preempted)
                stopped = True
                break
        return _summary(r, speed, time.time() - t0, stopped, start_step)
    finally:
        r.preemption.uninstall()
        r.results.close()


def evaluate(r: TrainRun, epochs_done: int) -> None:
    """Validation after an epoch, on rank 0, through the same metrics function as ``pyprotoclip eval``."""
    run_val, zeroshot = policy.validate_after_epoch(r.p, epochs_done)
    if not run_val:
        return
    if r.is_main:
        from pyprotoclip.data import DataConfig
        from pyprotoclip.eval import evaluate_model

        p = r.p
        cfg = DataConfig(shards=p["val_data"], batch_size=p["batch_size"], workers=p["workers"],
                         num_samples=p["val_num_samples"], seed=p["seed"], drop_last=False, flag="val-data")
        loader = r.data.build_loader(cfg, preprocess=r.preprocess_val, tokenize=r.tokenizer, is_train=False)
        classnames = templates = None
        if zeroshot:
            try:
                classnames, templates = r.data.read_zeroshot_files(p["val_data"])
            except FileNotFoundError as exc:
                log.info("zero-shot skipped: %s", exc)
        metrics, details = evaluate_model(r.net, loader, tokenizer=r.tokenizer, device=r.device, autocast=r.autocast,
                                          classnames=classnames, templates=templates, loss_batch_size=p["batch_size"],
                                          seed=p["seed"])
        metrics.update(r.method.eval_metrics(r.net, details["features"]))
        metrics.update(type="val", epoch=epochs_done, step=r.step)
        r.results.write(metrics, scalars="val")
        log.info("Eval Epoch: %d %s", epochs_done, " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    pdist.barrier()


def _rate(x: float | None, fmt: str = "%.1f") -> str:
    return "n/a" if x is None else fmt % x


def _summary(r: TrainRun, speed: Speed, wall: float, stopped: bool, start_step: int) -> dict[str, Any]:
    timed = speed.step.count > 0  # each epoch's first step (start-up) is left out: no speed when none is left
    sps = r.global_batch * speed.step.count / max(speed.step.total, 1e-9) if timed else None
    summary: dict[str, Any] = {
        "run_dir": r.run_dir, "steps_per_epoch": r.steps_per_epoch, "step": r.step, "steps_this_process": r.step - start_step,
        "interrupted": stopped, "wall_s": wall, "samples_per_s": sps,
        "data_fraction": speed.data.total / max(speed.step.total, 1e-9) if timed else None, "world_size": r.world,
        "skipped_steps": r.nonfinite.total,
    }
    summary["samples_per_s_per_device"] = sps / r.world if timed else None
    if r.is_main:
        frac = summary["data_fraction"]
        log.info("%s, %s samples/s (%s/s/device), data %s of step time", done_line(r.step, start_step, wall),
                 _rate(sps), _rate(summary["samples_per_s_per_device"]),
                 "n/a" if frac is None else f"{100 * frac:.1f}%")
        r.results.write({"type": "summary", **summary})
    summary["model"] = r.net
    return summary
