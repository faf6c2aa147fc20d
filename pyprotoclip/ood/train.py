"""``pyprotoclip ood train``: supervised training for OOD detection with PALM (or cross-entropy, the MSP
baseline) on labelled shards, following the official recipe (jeff024/PALM ``main.py``, ``trainer.py``,
``util/train_utils.py``): two augmented views per image flattened view-major, SGD (momentum 0.9, Nesterov,
weight decay on every parameter), a per-step schedule of 10 warm-up epochs from 0 then cosine to 1e-3 x lr.

The run directory, logs, results.jsonl, atomic checkpoints and ``--resume latest`` work as for
``pyprotoclip train`` (docs/training.md): an interrupted and resumed run ends with the same weights and
prototypes, bit for bit, as an uninterrupted one. Under torchrun each process reads its own shards, the
network is wrapped in DDP and PALM's prototype sums are all-reduced (every rank holds the same prototypes).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from datetime import datetime
from typing import Any

import numpy as np
import torch
import yaml

from pyprotoclip import checkpoint as ckpt
from pyprotoclip import distributed as pdist
from pyprotoclip.losses import PALMLoss
from pyprotoclip.ood.models import AUGMENTATIONS, MultiView, build_model, no_text, resolve_model_cfg, train_transform
from pyprotoclip.ops import skip_value_checks
from pyprotoclip.progress import ProgressClock, eta_seconds, format_duration
from pyprotoclip.train import policy
from pyprotoclip.train.faults import (BufferSnapshot, NonFiniteGuard, TrainingError, checkpoint_write_error,
                                      step_unless_nonfinite)
from pyprotoclip.train.params import bad_fraction_limit
from pyprotoclip.train.reporting import Meter, Results, TermMeter, done_line, format_terms, log, setup_logging

FORMAT = "pyprotoclip-ood-v1"
LOSSES = ("palm", "ce")
PRECISIONS = ("amp", "amp_bf16", "fp32")

# every flag of `ood train` and its default (the official runner.sh recipe where it sets one)
DEFAULTS: dict[str, Any] = {
    "train_data": None, "train_num_samples": None, "dataset_resampled": False, "workers": 2, "shuffle_buffer": 1000,
    "max_bad_fraction": 0.1,
    "num_classes": None,
    "batch_size": 512, "epochs": 500, "lr": 0.5, "wd": 1e-6, "momentum": 0.9, "warmup_epochs": 10,
    "precision": "amp", "backbone": "resnet34", "cifar_stem": None, "image_size": None, "mean": None, "std": None,
    "feat_dim": 128, "head": "mlp", "loss": "palm", "nviews": 2, "augment": "simclr", "crop_scale": 0.2,
    "cache_size": 6, "k": 5, "proto_m": 0.999, "temp": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3,
    "lambda_pcon": 1.0, "proto_temp": 0.5, "detach_proto_update": False, "unlabelled": False,
    "seed": 1, "logs": "./logs", "name": None, "resume": None, "save_frequency": 50, "save_most_recent": True,
    "save_every_n_steps": 0, "stop_after_steps": None, "log_every_n_steps": 50, "device": "auto", "dist_backend": None,
    "max_nonfinite": 20,
}


def defaults() -> dict[str, Any]:
    return dict(DEFAULTS)


def palm_lr(step: int, *, base_lr: float, steps_per_epoch: int, epochs: int, warmup_epochs: int = 10) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under the official schedule.

    The official ``adjust_learning_rate`` runs after each step with that step's index s and sets
    f(s) = base * s / W for s < W (W = warm-up epochs x steps per epoch), else
    base * q + 1e-3 * base * (1 - q) with q = (1 + cos(pi (s - W) / (S - W))) / 2, S = all steps;
    so step t trains at f(t - 1) and the very first step at the optimizer's initial lr, ``base``.
    """
    if step == 0:
        return base_lr
    s = step - 1
    warm = warmup_epochs * steps_per_epoch
    if s < warm:
        return base_lr * s / warm
    span = epochs * steps_per_epoch - warm
    q = 0.5 * (1 + math.cos(math.pi * (s - warm) / span)) if span > 0 else 1.0
    return base_lr * q + 1e-3 * base_lr * (1 - q)


def validate(p: dict[str, Any]) -> None:
    """Cross-flag checks; ValueError naming the flag."""
    unknown = sorted(set(p) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{unknown[0].replace('_', '-')}: not a flag of `ood train`")
    if not p["train_data"]:
        raise ValueError("train-data: expected labelled training shards (brace-expanded spec), got none")
    for key, default in DEFAULTS.items():
        if isinstance(default, float) and isinstance(p[key], float) and not math.isfinite(p[key]):
            raise ValueError(f"{key.replace('_', '-')}: expected a finite number, got {p[key]}")
    positive = ("batch_size", "epochs", "nviews", "cache_size", "feat_dim", "log_every_n_steps")
    for key in positive:
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"{key.replace('_', '-')}: expected an int >= 1, got {p[key]!r}")
    for key in ("k", "warmup_epochs", "workers", "shuffle_buffer", "save_frequency", "save_every_n_steps", "sinkhorn_iterations",
                "max_nonfinite"):
        if not isinstance(p[key], int) or p[key] < 0:
            raise ValueError(f"{key.replace('_', '-')}: expected an int >= 0, got {p[key]!r}")
    if not isinstance(p["max_bad_fraction"], (int, float)) or not 0 <= p["max_bad_fraction"] <= 1:
        raise ValueError(f"max-bad-fraction: expected a fraction in [0, 1] (1: never stop), got {p['max_bad_fraction']!r}")
    if p["loss"] not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {p['loss']!r}")
    if p["augment"] not in AUGMENTATIONS:
        raise ValueError(f"augment: expected one of {AUGMENTATIONS}, got {p['augment']!r}")
    if not 0 < p["crop_scale"] <= 1:
        raise ValueError(f"crop-scale: expected a value in (0, 1], got {p['crop_scale']!r}")
    if p["precision"] not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {p['precision']!r}")
    if not p["lr"] > 0:
        raise ValueError(f"lr: expected a value > 0, got {p['lr']!r}")
    if p["wd"] < 0 or not 0 <= p["momentum"] < 1:
        raise ValueError("wd, momentum: expected wd >= 0 and momentum in [0, 1)")
    if p["num_classes"] is not None and p["num_classes"] < 1:
        raise ValueError(f"num-classes: expected an int >= 1, got {p['num_classes']!r}")
    for key in ("train_num_samples", "image_size", "stop_after_steps"):
        if p[key] is not None and (not isinstance(p[key], int) or p[key] < 1):
            raise ValueError(f"{key.replace('_', '-')}: expected an int >= 1, got {p[key]!r}")
    for key in ("temp", "epsilon", "proto_temp"):
        if not p[key] > 0:
            raise ValueError(f"{key.replace('_', '-')}: expected a value > 0, got {p[key]!r}")
    if not 0 <= p["proto_m"] <= 1:
        raise ValueError(f"proto-m: expected an EMA momentum in [0, 1], got {p['proto_m']!r}")
    if not p["lambda_pcon"] >= 0:
        raise ValueError(f"lambda-pcon: expected a weight >= 0, got {p['lambda_pcon']!r}")
    if not isinstance(p["seed"], int) or not 0 <= p["seed"] < 2**32:
        raise ValueError(f"seed: expected an int in [0, 2**32), got {p['seed']!r}")
    if p["unlabelled"] and p["loss"] != "palm":
        raise ValueError("unlabelled: only with --loss palm (cross-entropy needs labels)")
    for key in ("mean", "std"):
        if p[key] is not None and len(p[key]) != 3:
            raise ValueError(f"{key}: expected three numbers (R G B), got {p[key]!r}")


def _num_classes(p: dict[str, Any], data: Any) -> int:
    if p["num_classes"]:
        return p["num_classes"]
    try:
        classnames, _ = data.read_zeroshot_files(p["train_data"])
    except FileNotFoundError:
        if p["unlabelled"]:
            raise ValueError("num-classes: --unlabelled needs --num-classes (the number of prototype groups)") from None
        raise ValueError("num-classes: not given and no classnames.txt/templates.txt beside the training shards; "
                         "pass --num-classes") from None
    return len(classnames)


def _model_cfg(p: dict[str, Any], num_classes: int) -> dict[str, Any]:
    return resolve_model_cfg(p["backbone"], cifar_stem=p["cifar_stem"], image_size=p["image_size"],
                             mean=tuple(p["mean"]) if p["mean"] else None, std=tuple(p["std"]) if p["std"] else None,
                             feat_dim=p["feat_dim"], head="none" if p["loss"] == "ce" else p["head"],
                             num_classes=num_classes if p["loss"] == "ce" else None)


def build_loss(p: dict[str, Any], num_classes: int) -> torch.nn.Module | None:
    if p["loss"] == "ce":
        return None
    return PALMLoss(num_classes, feat_dim=p["feat_dim"], prototypes_per_class=p["cache_size"], topk=p["k"],
                    proto_momentum=p["proto_m"], temperature=p["temp"], epsilon=p["epsilon"],
                    sinkhorn_iterations=p["sinkhorn_iterations"], lambda_pcon=p["lambda_pcon"],
                    proto_temperature=p["proto_temp"], detach_proto_update=p["detach_proto_update"],
                    class_masks=not p["unlabelled"])


class _Run:
    """What one training run holds (the network, its loss, optimizer, data, where it writes)."""

    def __init__(self, p: dict[str, Any], data: Any) -> None:
        self.p, self.data = p, data
        self.rank, local_rank, self.world = pdist.init_from_env(p["dist_backend"])
        self.is_main = self.rank == 0
        if p["device"] == "cuda" or (p["device"] == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ValueError("device: cuda requested but CUDA is not available")
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self._run_dir()
        self.console = setup_logging(os.path.join(self.run_dir, "out.log") if self.is_main else None, self.is_main)
        if self.is_main:
            ckpt.remove_stale_temp_files(self.ckpt_dir, log)
            with open(os.path.join(self.run_dir, "params.yaml"), "w") as f:
                yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()}, f, sort_keys=True)
        self.num_classes = _num_classes(p, data)
        self.model_cfg = _model_cfg(p, self.num_classes)
        # the same init on every rank (model and prototypes), then distinct streams per rank
        torch.manual_seed(p["seed"])
        random.seed(p["seed"])
        np.random.seed(p["seed"])
        self.net = build_model(self.model_cfg).to(self.device)
        self.loss_fn = build_loss(p, self.num_classes)
        if self.loss_fn is not None:
            self.loss_fn.to(self.device)
        torch.manual_seed(p["seed"] + self.rank)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=p["lr"], momentum=p["momentum"], nesterov=True,
                                         weight_decay=p["wd"])
        cuda = self.device.type == "cuda"
        if p["precision"] == "amp" and cuda:
            self.autocast = lambda: torch.autocast("cuda", dtype=torch.float16)
            self.scaler = torch.amp.GradScaler("cuda")
        elif p["precision"] == "amp_bf16":
            self.autocast = lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
            self.scaler = None
        else:
            import contextlib

            self.autocast, self.scaler = contextlib.nullcontext, None
        cfg = self.model_cfg
        self.preprocess = MultiView(train_transform(cfg["image_size"], cfg["mean"], cfg["std"], augment=p["augment"],
                                                    crop_scale=p["crop_scale"]), p["nviews"])
        self.results = Results(self.run_dir, self.is_main, False)
        self.step = 0
        self.nonfinite = NonFiniteGuard(p["max_nonfinite"], is_main=self.is_main)
        self.first_loader = None
        self.first_loader = self.make_loader(0)
        self.steps_per_epoch = self.first_loader.num_batches
        self.model: torch.nn.Module = self.net

    def _run_dir(self) -> None:
        p = self.p
        if not p["name"]:
            if p["resume"] == "latest":
                raise ValueError("name: --resume latest needs the --name of the run to continue")
            date = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
            p["name"] = pdist.broadcast_object(f"{date}-ood-{p['loss']}-{p['backbone']}-lr_{p['lr']}-b_{p['batch_size']}")
        self.run_dir = os.path.join(p["logs"], p["name"])
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.resume_path = ckpt.choose_resume(p["resume"], self.ckpt_dir, self.is_main)
        if self.is_main:
            if os.path.exists(os.path.join(self.run_dir, "out.log")) and not p["resume"]:
                raise ValueError(f"name: the run directory {self.run_dir!r} already exists; pass --resume latest or a new --name")
            os.makedirs(self.ckpt_dir, exist_ok=True)
        pdist.barrier()

    def make_loader(self, epoch: int, start_batch: int = 0):
        if epoch == 0 and start_batch == 0 and self.first_loader is not None:
            loader, self.first_loader = self.first_loader, None
            return loader
        p = self.p
        cfg = self.data.DataConfig(shards=p["train_data"], batch_size=p["batch_size"], workers=p["workers"],
                                   num_samples=p["train_num_samples"], resampled=p["dataset_resampled"], seed=p["seed"],
                                   shuffle_buffer=p["shuffle_buffer"], drop_last=True, flag="train-data",
                                   max_bad_fraction=bad_fraction_limit(p["max_bad_fraction"]))
        return self.data.build_loader(cfg, preprocess=self.preprocess, tokenize=no_text, is_train=True, epoch=epoch,
                                      rank=self.rank, world_size=self.world, start_batch=start_batch)

    def lr(self, step: int) -> float:
        p = self.p
        return palm_lr(step, base_lr=p["lr"], steps_per_epoch=self.steps_per_epoch, epochs=p["epochs"],
                       warmup_epochs=p["warmup_epochs"])

    # ---- checkpoints ------------------------------------------------------------------------------------

    def save(self, names: list[str], epochs_done: int) -> None:
        """Write checkpoints ``names`` on rank 0 (every rank calls it); a failed write (disk full) leaves the
        previous file as it was and stops every rank with a :class:`TrainingError` naming the file."""
        common = ckpt.training_state(self.net, self.optimizer, self.scaler, self.world)
        error = self._write(names, epochs_done, common) if self.is_main and names else None
        error = pdist.broadcast_object(error)
        if error:
            raise TrainingError(error)

    def _write(self, names: list[str], epochs_done: int, common: dict[str, Any]) -> str | None:
        p = self.p
        state = {
            "format": FORMAT, "step": self.step, "epoch": epochs_done, "steps_per_epoch": self.steps_per_epoch,
            "name": p["name"], "model": p["backbone"], "model_cfg": self.model_cfg, "method": p["loss"],
            "num_classes": self.num_classes, **common, "method_keys": [],
            "method_state": self.loss_fn.state_dict() if self.loss_fn is not None else {},
            "scheduler": {"kind": "palm-warmup-cosine", "step": self.step, "warmup_epochs": p["warmup_epochs"]},
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()},
            **self.nonfinite.state_dict(),
            "results_bytes": self.results.size(),  # a resumed run removes the rows written after this checkpoint
        }
        for name in names:
            path = os.path.join(self.ckpt_dir, name)
            try:
                ckpt.save_checkpoint(state, path)
            except Exception as exc:  # noqa: BLE001 - whatever failed, every rank must learn of it
                return checkpoint_write_error(path, exc, self.ckpt_dir)
        return None

    def resume(self) -> None:
        path = self.resume_path
        if not path:
            if self.p["resume"] == "latest":
                log.info("--resume latest: no checkpoint in %s, starting from scratch", self.ckpt_dir)
                self.results.rewind_for_resume(None, None, self.ckpt_dir)  # an earlier start's rows go
            return
        state = ckpt.load_checkpoint(path)
        if state.get("format") != FORMAT:
            raise ValueError(f"resume: {path} is not an `ood train` checkpoint (format {state.get('format')!r})")
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise ValueError(f"resume: {path} was written with {state.get('steps_per_epoch')} steps per epoch, this run has "
                             f"{self.steps_per_epoch}; keep --batch-size, --train-num-samples and the process count")
        if state.get("method") != self.p["loss"]:
            raise ValueError(f"resume: {path} was trained with --loss {state.get('method')}, this run has --loss {self.p['loss']}")
        self.step = ckpt.restore_training_state(state, self.net, self.optimizer, self.scaler, rank=self.rank, world=self.world)
        if self.loss_fn is not None:
            self.loss_fn.load_state_dict(state["method_state"])
        self.nonfinite.load_state_dict(state)
        log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.step // self.steps_per_epoch)
        self.results.rewind_for_resume(state, path, self.ckpt_dir)

    # ---- one step ---------------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str | None]:
        """One SGD step; returns (loss terms, None) or, for a step skipped as non-finite (a NaN/Inf loss, or
        without a GradScaler gradient norm), (terms, "loss" | "gradients"): then the weights, the SGD
        momentum, the BatchNorm statistics and PALM's prototypes are as they were before it."""
        labels = batch["label"]  # on the CPU: checking it costs no device synchronisation
        if not self.p["unlabelled"] and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            lo, hi = int(labels.min()), int(labels.max())
            raise ValueError(f"train-data: class labels must lie in [0, {self.num_classes}) (--num-classes / classnames.txt), "
                             f"got [{lo}, {hi}]; -1 means a sample without a .cls entry")
        images = batch["image"]
        if images.dim() != 5:
            raise ValueError(f"train-data: expected (B, nviews, 3, H, W) images, got shape {tuple(images.shape)}")
        b, v = images.shape[:2]
        x = images.transpose(0, 1).reshape(v * b, *images.shape[2:]).to(self.device, non_blocking=True)  # view-major
        y = labels.repeat(v).to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        buffers = BufferSnapshot.of(self.net)
        prototypes = self.loss_fn.prototypes if self.loss_fn is not None else None  # the loss replaces, never edits, it
        with skip_value_checks():
            with self.autocast():
                if self.loss_fn is None:
                    logits = self.model(x)
                    ce = torch.nn.functional.cross_entropy(logits.float(), y)
                    terms = {"ce": ce, "loss": ce}
                else:
                    feats = self.model(x)
            if self.loss_fn is not None:
                terms = self.loss_fn(feats, None if self.p["unlabelled"] else y)
            loss = terms["loss"]
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        terms = {k: t.detach() for k, t in terms.items()}
        skipped = step_unless_nonfinite(terms["loss"], self.net, self.optimizer, scaler=self.scaler, buffers=buffers)
        if skipped is not None and prototypes is not None:
            self.loss_fn.prototypes = prototypes
        return terms, skipped


class _LogitsModel(torch.nn.Module):
    """Cross-entropy training calls the network's classifier through DDP's forward."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.logits(x)


def run(p: dict[str, Any], *, data: Any = None) -> dict[str, Any]:
    """Train with the flags in ``p`` (keys with underscores, :data:`DEFAULTS` filled in); returns a summary
    dict with the trained network (``net``) and the loss module (``loss_fn``, holding the prototypes).

    data: an object with ``DataConfig``, ``build_loader`` and ``read_zeroshot_files`` (default :mod:`pyprotoclip.data`).
    """
    p = {**DEFAULTS, **p}
    validate(p)
    if data is None:
        import pyprotoclip.data as data
    r = _Run(p, data)
    r.resume()
    inner: torch.nn.Module = r.net if p["loss"] == "palm" else _LogitsModel(r.net)
    r.model = inner
    if pdist.is_distributed():
        r.model = torch.nn.parallel.DistributedDataParallel(
            inner, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    spe = r.steps_per_epoch
    log.info("ood training (%s, %s, %d classes) on %d process(es), device %s: %d steps/epoch x %d epochs, global batch %d",
             p["loss"], p["backbone"], r.num_classes, r.world, r.device, spe, p["epochs"], p["batch_size"] * r.world)
    log.info("model parameters: %.2fM", sum(x.numel() for x in r.net.parameters()) / 1e6)
    step_t, t0, stopped, start_step = Meter(), time.time(), False, r.step
    # SIGTERM / SIGUSR1 / a first Ctrl-C: stop at the next step boundary, resumably, as `train` does
    r.preemption = policy.Preemption(torch.distributed.new_group(backend="gloo") if pdist.is_distributed() else None)
    r.preemption.install()
    try:
        for epoch in range(r.step // spe, p["epochs"]):
            stopped = _train_epoch(r, epoch, step_t)
            if stopped:
                break
            preempted = r.preemption.requested()
            r.save(policy.checkpoints_after_epoch(p, epoch + 1, r.step, preempted=preempted), epoch + 1)
            if (preempted or policy.stop_reached(p, r.step)) and epoch + 1 < p["epochs"]:
                _log_stop(r, preempted)
                stopped = True
                break
        wall = time.time() - t0
        # each epoch's first step (start-up) is left out of the speed: unknown (None) when no step is left
        sps = p["batch_size"] * r.world * step_t.count / max(step_t.total, 1e-9) if step_t.count else None
        summary = {"run_dir": r.run_dir, "step": r.step, "steps_this_process": r.step - start_step,
                   "steps_per_epoch": spe, "interrupted": stopped, "wall_s": wall, "samples_per_s": sps,
                   "skipped_steps": r.nonfinite.total}
        if r.is_main:
            log.info("%s, %s samples/s", done_line(r.step, start_step, wall), "n/a" if sps is None else f"{sps:.1f}")
            r.results.write({"type": "summary", **summary})
        summary.update(net=r.net, loss_fn=r.loss_fn)
        return summary
    finally:
        r.preemption.uninstall()
        r.results.close()


def _log_stop(r: _Run, preempted: bool) -> None:
    why = f"{r.preemption.signal} received" if preempted else "--stop-after-steps"
    log.info("stopping after step %d (%s): checkpoints/%s is resumable; continue with the same command plus "
             "--resume latest", r.step, why, policy.LATEST)


def _train_epoch(r: _Run, epoch: int, step_t: Meter) -> bool:
    p, spe = r.p, r.steps_per_epoch
    first = r.step - epoch * spe
    loader = r.make_loader(epoch, first)
    r.model.train()
    it = iter(loader)
    terms_epoch, window = TermMeter(), Meter()
    bar, clock = None, ProgressClock()
    stop = p["stop_after_steps"]
    last_step = min(p["epochs"] * spe, stop) if stop else p["epochs"] * spe
    if r.is_main and sys.stdout.isatty():
        from tqdm import tqdm

        bar = tqdm(total=spe, initial=first, desc=f"epoch {epoch}", dynamic_ncols=True, file=sys.stdout)
        r.console.bar = bar
    end = time.time()
    try:
        for local in range(first, spe):
            lr = r.lr(r.step)
            for group in r.optimizer.param_groups:
                group["lr"] = lr
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"train-data: the loader stopped after {local} of {spe} steps in epoch {epoch}") from None
            terms, skipped = r.train_step(batch)
            r.step += 1  # a skipped step counts too: the data position and the schedule follow r.step
            r.nonfinite.record(skipped, r.step, r.net, terms)
            dt = time.time() - end
            end = time.time()
            if skipped is None:
                terms_epoch.add(terms)
            window.update(dt)
            if local > first:
                step_t.update(dt)
            if bar is not None:
                bar.update(1)
            last_in_epoch = local + 1 == spe
            if r.step % p["log_every_n_steps"] == 0 or last_in_epoch:
                last = {k: float(v) for k, v in terms.items()}
                avg = {**{k: math.nan for k in last}, **terms_epoch.means()}  # nan: every step so far was skipped
                gb = p["batch_size"] * r.world
                sps = gb * window.count / max(window.total, 1e-9)
                n_skipped = r.nonfinite.total
                log.info("Train Epoch: %d [%d/%d (%.0f%%)] step %d | %.1f samples/s | lr %.3e | %s%s", epoch, (local + 1) * gb,
                         spe * gb, 100.0 * (local + 1) / spe, r.step, sps, lr, format_terms(last, avg),
                         f" | skipped {n_skipped} non-finite step(s)" if n_skipped else "")
                finite = {k: v if math.isfinite(v) else None for k, v in
                          {**last, **{f"{k}_avg": v for k, v in avg.items()}}.items()}  # strict JSON: NaN as null
                r.results.write({"type": "train", "epoch": epoch, "step": r.step, "samples": r.step * gb, **finite,
                                 "lr": lr, "samples_per_s": sps, "skipped_steps": n_skipped}, scalars="train")
                window = Meter()
                clock.mark()
            elif bar is None and r.is_main and clock.due():  # no terminal: a line every ~30 s, reading no tensor
                eta = format_duration(eta_seconds(step_t.avg, r.step, last_step)) if step_t.count else "?"
                gb = p["batch_size"] * r.world
                log.info("Progress: epoch %d [%d/%d (%.0f%%)] step %d/%d | %.1f samples/s | ETA %s", epoch, (local + 1) * gb,
                         spe * gb, 100.0 * (local + 1) / spe, r.step, last_step, gb * window.count / max(window.total, 1e-9), eta)
                clock.mark()
            if last_in_epoch:
                break
            preempted = r.preemption.requested()  # the same answer on every rank (one gloo all-reduce)
            names = policy.checkpoints_after_step(p, r.step, preempted=preempted)
            if names:
                r.save(names, epoch)
            if preempted or policy.stop_reached(p, r.step):
                _log_stop(r, preempted)
                return True
        return False
    finally:
        if bar is not None:
            bar.close()
            r.console.bar = None
