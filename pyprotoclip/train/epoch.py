"""``train_one_epoch``: the steps of one epoch, from wherever the run stands, with logging and the
mid-epoch save and stop policies."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch

from pyprotoclip.losses import EpochContext, StepContext
from pyprotoclip.train import policy
from pyprotoclip.progress import ProgressClock, eta_seconds, format_duration
from pyprotoclip.train.params import bad_fraction_limit
from pyprotoclip.train.reporting import Meter, TermMeter, format_terms, log
from pyprotoclip.train.setup import TrainRun
from pyprotoclip.train.state import save
from pyprotoclip.train.step import batch_metadata, train_step

DATA_WARN_FRACTION = 0.5  # warn when more than this share of step time waits for data


class Speed:
    """Step and data-wait times over the whole run, leaving out each epoch's first step (worker start-up);
    ``progress``: the time-based log trigger (used when stdout is not a terminal)."""

    def __init__(self) -> None:
        self.step, self.data = Meter(), Meter()
        self.progress = ProgressClock()


class _EpochLog:
    """The numbers of one epoch between log lines: terms as device tensors, times as floats."""

    def __init__(self, run: TrainRun, epoch: int, first: int, speed: Speed | None = None) -> None:
        self.run, self.epoch, self.first = run, epoch, first
        self.speed = speed
        self.last_t = 0.0
        self.epoch_terms = TermMeter()
        self.window()
        self.bar = None
        if run.is_main and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=run.steps_per_epoch, initial=first, desc=f"epoch {epoch}", dynamic_ncols=True, file=sys.stdout)
            run.console.bar = self.bar

    def window(self) -> None:
        self.batch_t, self.data_t = Meter(), Meter()
        self.startup: tuple[float, float] | None = None

    def add(self, terms: dict[str, Any], t_batch: float, t_data: float, *, startup: bool, skipped: bool = False) -> None:
        """A step's terms and times; ``startup``: the epoch's first step, which also waited for the data
        workers to start: left out of the rates, as in the run's summary (unless it is all there is).
        A ``skipped`` (non-finite) step's terms stay out of the epoch means."""
        if not skipped:
            self.epoch_terms.add(terms)
        self.last = terms
        self.last_t = t_batch
        if startup:
            self.startup = (t_batch, t_data)
        else:
            self.batch_t.update(t_batch)
            self.data_t.update(t_data)
        if self.bar is not None:
            self.bar.update(1)

    def eta(self) -> str:
        """Time left to the run's last step (--stop-after-steps or the last epoch's end) at the mean step time
        so far (each epoch's start-up step left out; the last step's time until one is timed). Training
        steps only: validation and checkpoints add to it."""
        run = self.run
        mean = self.speed.step.avg if self.speed is not None and self.speed.step.count else self.last_t
        stop = run.p.get("stop_after_steps")
        last = min(run.total_steps, stop) if stop is not None else run.total_steps
        return format_duration(eta_seconds(mean, run.step, last))

    def progress(self, local: int) -> None:
        """A progress line without the loss terms (no device read): position, speed and ETA; for the
        time-based trigger when stdout is not a terminal."""
        run, spe, gb = self.run, self.run.steps_per_epoch, self.run.global_batch
        timed = self.speed.step if self.speed is not None else None
        sps = gb * timed.count / max(timed.total, 1e-9) if timed is not None and timed.count else gb / max(self.last_t, 1e-9)
        log.info("Progress: epoch %d [%d/%d (%.0f%%)] step %d/%d | %.1f samples/s | ETA %s", self.epoch, (local + 1) * gb,
                 spe * gb, 100.0 * (local + 1) / spe, run.step, run.total_steps, sps, self.eta())
        if self.speed is not None:
            self.speed.progress.mark()

    def write(self, local: int, lr: float) -> None:
        """The log line and results row of step ``run.step`` (local step ``local`` of the epoch)."""
        run, p = self.run, self.run.p
        last = {k: float(v) for k, v in self.last.items()}
        avg = {**{k: math.nan for k in last}, **self.epoch_terms.means()}  # nan: every step so far was skipped
        skipped = run.nonfinite.total if run.nonfinite is not None else 0
        scales = {"scale" + n[len("logit_scale"):]: float(getattr(run.net, n).detach().exp()) for n in run.method.scales}
        if self.batch_t.count == 0 and self.startup is not None:
            self.batch_t.update(self.startup[0])
            self.data_t.update(self.startup[1])
        sps = run.global_batch * self.batch_t.count / max(self.batch_t.total, 1e-9)
        frac = self.data_t.total / max(self.batch_t.total, 1e-9)
        spe, gb = run.steps_per_epoch, run.global_batch
        log.info(
            "Train Epoch: %d [%d/%d (%.0f%%)] step %d | %.1f samples/s (%.1f/s/device) | data %.1f%% | lr %.3e | %s | %s%s | ETA %s",
            self.epoch, (local + 1) * gb, spe * gb, 100.0 * (local + 1) / spe, run.step, sps, sps / run.world, 100 * frac,
            lr, " | ".join(f"{k} {v:.2f}" for k, v in scales.items()), format_terms(last, avg),
            f" | skipped {skipped} non-finite step(s)" if skipped else "", self.eta(),
        )
        if self.speed is not None:
            self.speed.progress.mark()
        if frac > DATA_WARN_FRACTION and self.batch_t.count > 1:
            log.warning("data loading takes %.0f%% of step time: raise --workers (now %d) or make shards faster to decode",
                        100 * frac, p["workers"])
        row = {"type": "train", "epoch": self.epoch, "step": run.step, "samples": run.step * gb, **_json_numbers(last),
               **_json_numbers({f"{k}_avg": v for k, v in avg.items()}), "lr": lr, **scales, "samples_per_s": sps,
               "samples_per_s_per_device": sps / run.world, "data_fraction": frac, "skipped_steps": skipped}
        run.results.write(row, scalars="train")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
        self.window()

    def close(self, loader: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.run.console.bar = None
        stats = loader.stats() if hasattr(loader, "stats") else None
        if stats and stats.get("bad_total") and "worst_shards" in stats:
            # the per-sample warnings come from loader workers and reach only stderr; this line reaches out.log
            from pyprotoclip.data.pipeline import describe_bad

            log.warning("train-data: epoch %d on this process skipped %s", self.epoch, describe_bad(stats))
        elif stats and stats.get("bad_total"):
            reasons = ", ".join(f"{k} {v}" for k, v in stats["bad"].items() if v)
            log.warning("train-data: epoch %d skipped %d bad sample(s)/shard(s) on this process (%s); see the "
                        "'skipping bad sample' warnings for which", self.epoch, stats["bad_total"], reasons)


def _json_numbers(values: dict[str, float]) -> dict[str, float | None]:
    """NaN/Inf (a skipped step's terms) as null, so that results.jsonl stays strict JSON."""
    return {k: v if math.isfinite(v) else None for k, v in values.items()}


BAD_DATA_CHECK_EVERY = 10  # steps between --max-bad-fraction checks (each is an all-reduce under torchrun)


def _bad_data_monitor(run: TrainRun, loader: Any):
    """A BadDataMonitor for --max-bad-fraction over the loader's counts summed over ranks (the preemption's gloo
    group), or None when the flag is 1 or the loader keeps no such counts."""
    from pyprotoclip.data.pipeline import BAD_CHECK_MIN_SAMPLES, BadDataMonitor

    limit = bad_fraction_limit(run.p.get("max_bad_fraction", 0.1))
    if limit is None or not hasattr(loader, "stats") or "samples_seen" not in loader.stats():
        return None
    from pyprotoclip import distributed as pdist

    group = run.preemption.group if run.preemption is not None else None
    if group is None and pdist.is_distributed():
        return None  # no CPU group to agree over: each rank's data workers still apply the limit
    reduce = lambda xs: pdist.all_reduce_sum(torch.tensor(xs, dtype=torch.int64), group).tolist()  # noqa: E731
    gather = lambda x: pdist.gather_object(x, group)  # noqa: E731
    return BadDataMonitor(limit, min(BAD_CHECK_MIN_SAMPLES, getattr(loader, "num_samples", BAD_CHECK_MIN_SAMPLES)),
                          "train-data", reduce=reduce, gather=gather)


def log_stop(run: TrainRun, preempted: bool) -> None:
    why = f"{run.preemption.signal} received" if preempted else "--stop-after-steps"
    log.info("stopping after step %d (%s): checkpoints/%s is resumable; continue with the same command plus "
             "--resume latest", run.step, why, policy.LATEST)


def _set_lr(run: TrainRun, epoch: int) -> float:
    """Set every parameter group's rate for this step; returns the schedule's (the base) rate."""
    for group in run.optimizer.param_groups:
        group["lr"] = run.method.group_lr(group, run.step, epoch, run.schedule)
    return run.schedule(run.step)


def train_one_epoch(run: TrainRun, epoch: int, speed: Speed) -> bool:
    """Train ``epoch`` from step ``run.step`` on; returns True when the stop policy ended the run inside it."""
    p, accum, spe = run.p, run.p["accum_freq"], run.steps_per_epoch
    first = run.step - epoch * spe
    preprocess, tokenize = run.method.train_transforms(run.preprocess_train, run.tokenizer)
    run.method.before_epoch(EpochContext(
        epoch=epoch, step=run.step, model=run.net, device=run.device, autocast=run.autocast, rank=run.rank,
        world_size=run.world, log=log, write_result=run.results.write, preprocess=preprocess, tokenize=tokenize,
    ))
    loader = run.make_loader(epoch, first * accum)
    monitor = _bad_data_monitor(run, loader)
    run.model.train()
    out = _EpochLog(run, epoch, first, speed)
    it = iter(loader)
    stopped = False
    end = time.time()
    for local in range(first, spe):
        lr = _set_lr(run, epoch)
        try:
            batches = [next(it) for _ in range(accum)]
        except StopIteration:
            raise RuntimeError(
                f"train-data: the loader stopped after {local} of {spe} steps in epoch {epoch}; "
                "the shards hold fewer samples than --train-num-samples / sizes.json says"
            ) from None
        t_data = time.time() - end
        context = StepContext(step=run.step, epoch=epoch, batch=batch_metadata(batches))
        result = train_step(run.model, run.loss_fn, batches, run.optimizer, scaler=run.scaler, autocast=run.autocast,
                            device=run.device, context=context, grad_clip_norm=p["grad_clip_norm"])
        terms = result.terms
        if result.skipped is None:
            run.method.after_optimizer_step(run.net)
        # a skipped step still counts: the data position and the schedule are functions of run.step
        run.step += 1
        if run.nonfinite is not None:
            run.nonfinite.record(result.skipped, run.step, run.net, terms)
        t_batch = time.time() - end
        end = time.time()
        out.add(terms, t_batch, t_data, startup=local == first, skipped=result.skipped is not None)
        if local > first:  # an epoch's first step pays for worker start-up
            speed.step.update(t_batch)
            speed.data.update(t_data)
        last_in_epoch = local + 1 == spe
        if monitor is not None and (run.step % BAD_DATA_CHECK_EVERY == 0 or last_in_epoch):
            monitor.check(loader.stats())  # over every worker of every rank: collective, the same steps everywhere
        if run.step % p["log_every_n_steps"] == 0 or last_in_epoch:
            out.write(local, lr)
        elif out.bar is None and run.is_main and speed.progress.due():  # no terminal: a line every ~30 s
            out.progress(local)
        if last_in_epoch:
            break
        preempted = run.preemption.requested()
        names = policy.checkpoints_after_step(p, run.step, preempted=preempted)
        if names:  # the same on every rank: saving is collective (it gathers each rank's RNG)
            save(run, names, epoch)
        if preempted or policy.stop_reached(p, run.step):
            log_stop(run, preempted)
            stopped = True
            break
    out.close(loader)
    return stopped
