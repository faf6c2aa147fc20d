"""Building a run: its directory, device, model (with the method's additions), optimizer, scaler and
data. :func:`build_run` returns a :class:`TrainRun` that the loop, saving and evaluation share."""

from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from datetime import datetime
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from pyprotoclip import checkpoint as ckpt
from pyprotoclip import distributed as pdist
from pyprotoclip.losses import LoaderRequest, Method, get_method
from pyprotoclip.train import params as P
from pyprotoclip.train.policy import Preemption
from pyprotoclip.train.reporting import Results, log, setup_logging
from pyprotoclip.train.scheduler import lr_at
from pyprotoclip.train.step import autocast_factory


@dataclasses.dataclass
class TrainRun:
    """Everything a training run holds. ``model`` is what the step calls (DDP-wrapped under torchrun),
    ``net`` the bare model (its state dict, its scales). ``step`` counts optimizer steps done."""

    p: dict[str, Any]
    rank: int
    world: int
    device: torch.device
    run_dir: str
    ckpt_dir: str
    resume_path: str | None
    console: Any
    method: Method
    net: torch.nn.Module
    model: torch.nn.Module
    model_cfg: dict[str, Any]
    method_keys: list[str]  # state-dict keys the method added to the architecture
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], Any]
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    data: Any
    steps_per_epoch: int
    results: Results
    preemption: Any = None  # policy.Preemption: SIGTERM/SIGUSR1 stop the run at a step boundary
    nonfinite: Any = None  # faults.NonFiniteGuard: counts skipped non-finite steps, stops at --max-nonfinite
    first_loader: Any = None
    step: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.p["epochs"]

    @property
    def global_batch(self) -> int:
        return self.p["batch_size"] * self.p["accum_freq"] * self.world

    def schedule(self, step: int, *, base_lr: float | None = None, start_step: int = 0, total_steps: int | None = None) -> float:
        """The learning rate at optimizer ``step``: warm-up then --lr-scheduler from ``start_step`` to
        ``total_steps`` (default: the whole run), peaking at ``base_lr`` (default --lr); 0 before the start."""
        p = self.p
        if step < start_step:
            return 0.0
        total = self.total_steps if total_steps is None else total_steps
        return lr_at(
            step - start_step, base_lr=p["lr"] if base_lr is None else base_lr, warmup=p["warmup"],
            total_steps=total - start_step, kind=p["lr_scheduler"],
            cooldown_steps=(p["epochs_cooldown"] or 0) * self.steps_per_epoch, cooldown_end_lr=p["lr_cooldown_end"],
            cooldown_power=p["lr_cooldown_power"],
        )

    def make_loader(self, epoch: int, start_batch: int = 0):
        """The training loader of ``epoch`` for this rank, from micro-batch ``start_batch`` on (the method's,
        or the shards streamed)."""
        if epoch == 0 and start_batch == 0 and self.first_loader is not None:
            loader, self.first_loader = self.first_loader, None
            return loader
        preprocess, tokenize = self.method.train_transforms(self.preprocess_train, self.tokenizer)

        def stream():
            from pyprotoclip.data import DataConfig

            p = self.p
            cfg = DataConfig(
                shards=p["train_data"], batch_size=p["batch_size"], workers=p["workers"],
                num_samples=p["train_num_samples"], resampled=p["dataset_resampled"], seed=p["seed"], drop_last=True,
                max_bad_fraction=P.bad_fraction_limit(p.get("max_bad_fraction", 0.1)), flag="train-data",
            )
            return self.data.build_loader(
                cfg, preprocess=preprocess, tokenize=tokenize, is_train=True, epoch=epoch, rank=self.rank,
                world_size=self.world, start_batch=start_batch,
            )

        return self.method.train_loader(LoaderRequest(
            epoch=epoch, start_batch=start_batch, rank=self.rank, world_size=self.world, preprocess=preprocess,
            tokenize=tokenize, default=stream,
        ))


def _default_name(p: dict[str, Any]) -> str:
    date = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    return f"{date}-model_{p['model']}-lr_{p['lr']}-b_{p['batch_size']}-j_{p['workers']}-p_{p['precision']}"


def _select_device(p: dict[str, Any], local_rank: int) -> torch.device:
    if p["device"] == "cuda" or (p["device"] == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but CUDA is not available")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _prepare_run_dir(p: dict[str, Any], is_main: bool) -> tuple[str, str, str | None]:
    """(run_dir, checkpoint dir, checkpoint to resume from). A run directory that holds a run is only
    reused with --resume."""
    if not p["name"]:
        if p["resume"] == "latest":
            raise ValueError("name: --resume latest needs the --name of the run to continue")
        p["name"] = pdist.broadcast_object(_default_name(p))
    run_dir = os.path.join(p["logs"], p["name"])
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    resume_path = ckpt.choose_resume(p["resume"], ckpt_dir, is_main)
    if is_main:
        if os.path.exists(os.path.join(run_dir, "out.log")) and not p["resume"]:
            if _holds_a_run(run_dir):
                raise ValueError(f"name: the run directory {run_dir!r} already holds a run; pass --resume latest or a new --name")
            for stale in ("out.log", "results.jsonl", "params.yaml"):  # a start that failed before its first step
                if os.path.exists(os.path.join(run_dir, stale)):
                    os.remove(os.path.join(run_dir, stale))
        try:
            os.makedirs(ckpt_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=ckpt_dir):
                pass
        except OSError as exc:
            raise ValueError(f"logs: cannot write the run directory {run_dir!r} ({exc.strerror or exc})") from None
    pdist.barrier()
    return run_dir, ckpt_dir, resume_path


def _holds_a_run(run_dir: str) -> bool:
    """A checkpoint or a completed training step: the directory is not a failed start's leftovers."""
    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpts) and any(f.endswith(".pt") for f in os.listdir(ckpts)):
        return True
    results = os.path.join(run_dir, "results.jsonl")
    return os.path.isfile(results) and '"type": "train"' in open(results).read()


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _adamw(param_groups: list[dict[str, Any]], p: dict[str, Any], device: torch.device) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it applies (floating parameters on CPU or CUDA): the update of
    torch's default AdamW (what open_clip steps) to rounding, in one pass over all parameters (tiny-rn on one
    CPU thread: 19 ms a step instead of 146 ms). Loading a checkpoint keeps this optimizer's implementation:
    a state saved by another one (an older run, open_clip) would otherwise switch it back."""
    params = [q for group in param_groups for q in group["params"]]
    fused = device.type in ("cpu", "cuda") and all(q.is_floating_point() and q.device.type == device.type for q in params)
    optimizer = torch.optim.AdamW(param_groups, lr=p["lr"], betas=(p["beta1"], p["beta2"]), eps=p["eps"],
                                  fused=fused or None)

    def keep_implementation(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        if len(state_dict["param_groups"]) != len(opt.param_groups):
            return None  # torch refuses it with its own error
        groups = [{**saved, "fused": live["fused"], "foreach": live["foreach"]}
                  for saved, live in zip(state_dict["param_groups"], opt.param_groups)]
        return {**state_dict, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(keep_implementation)
    return optimizer


def build_run(p: dict[str, Any], *, data: Any = None) -> TrainRun:
    """Validate the flags, then build the run directory, device, model, optimizer, scaler and data.

    data: where batches come from, an object with ``build_loader`` and ``read_zeroshot_files`` as
    :mod:`pyprotoclip.data` has them (the default; tests pass an in-memory stand-in).
    """
    p = dict(p)
    P.validate(p)
    P.fill_model_defaults(p)
    method = get_method(p["method"])(p)

    rank, local_rank, world = pdist.init_from_env(p["dist_backend"])
    device = _select_device(p, local_rank)
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    if data is None:
        import pyprotoclip.data as data

    run_dir, ckpt_dir, resume_path = _prepare_run_dir(p, rank == 0)
    console = setup_logging(os.path.join(run_dir, "out.log") if rank == 0 else None, rank == 0)
    if rank == 0:
        ckpt.remove_stale_temp_files(ckpt_dir, log)
    if p["resume"] == "latest" and resume_path is None:
        log.info("--resume latest: no checkpoint in %s, starting from scratch", ckpt_dir)
    if p["precision"] == "amp" and device.type == "cpu":
        log.info("--precision amp on CPU trains in fp32 (use amp_bf16 for bfloat16 autocast)")
    if rank == 0:
        P.dump_params(p, os.path.join(run_dir, "params.yaml"))
    _warn_oversubscription(p, device)

    from pyprotoclip.models import create_model, get_model_config

    random.seed(p["seed"])
    np.random.seed(p["seed"])
    base, preprocess_train, preprocess_val, tokenizer = create_model(
        p["model"], pretrained=p["pretrained"], precision=p["precision"], device=device,
        grad_checkpointing=p["grad_checkpointing"], seed=p["seed"],
    )
    base_keys = set(base.state_dict())
    net = method.build_model(base)
    _seed_everything(p["seed"] + rank)  # distinct streams per rank for anything random in the step
    optimizer = _adamw(method.param_groups(net, p["wd"]), p, device)
    autocast, use_scaler = autocast_factory(p["precision"], device)

    run = TrainRun(
        p=p, rank=rank, world=world, device=device, run_dir=run_dir, ckpt_dir=ckpt_dir, resume_path=resume_path,
        console=console, method=method, net=net, model=net, model_cfg=get_model_config(p["model"]),
        method_keys=sorted(set(net.state_dict()) - base_keys),
        loss_fn=method.build_loss(), optimizer=optimizer, scaler=torch.amp.GradScaler("cuda") if use_scaler else None,
        autocast=autocast, preprocess_train=preprocess_train, preprocess_val=preprocess_val, tokenizer=tokenizer,
        data=data, steps_per_epoch=0,
        results=Results(run_dir, rank == 0, "tensorboard" in P.report_to(p)),
        preemption=Preemption(dist.new_group(backend="gloo") if pdist.is_distributed() else None),
    )
    if p["resume"] == "latest" and resume_path is None:  # an earlier start that left no checkpoint: its rows go
        run.results.rewind_for_resume(None, None, ckpt_dir)
    run.first_loader = run.make_loader(0)
    run.steps_per_epoch = run.first_loader.num_batches // p["accum_freq"]
    if run.steps_per_epoch < 1:
        raise ValueError(
            f"train-data: an epoch has {run.first_loader.num_batches} batches per process, fewer than --accum-freq "
            f"{p['accum_freq']}; use more samples or a smaller --batch-size"
        )
    samples = getattr(run.first_loader, "data_samples", None)
    if samples and p["batch_size"] * run.world > samples:
        log.warning("a batch of %d (--batch-size %d x %d process(es)) is larger than the %d samples of an epoch: batches "
                    "repeat samples, and a repeated image-caption pair is a false negative of the contrastive loss; pass a "
                    "smaller --batch-size", p["batch_size"] * run.world, p["batch_size"], run.world, samples)
    if p["warmup"] > run.total_steps:  # scheduler.lr_at: step s (0-based) runs at --lr * (s + 1) / --warmup
        log.warning("--warmup %d is longer than the whole run (%d optimizer steps): the learning rate never "
                    "reaches --lr %g; pass a smaller --warmup", p["warmup"], run.total_steps, p["lr"])
    return run


def _warn_oversubscription(p: dict[str, Any], device: torch.device) -> None:
    """On CPU, torch threads of every local process plus their data workers should not exceed the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    busy = local * (torch.get_num_threads() * (device.type == "cpu") + p["workers"])
    if busy > cores:
        log.warning("%d process(es) x (%d torch threads + %d data workers) on %d cores: oversubscribed, which can "
                    "slow training several-fold; pass --threads %d (or fewer --workers)", local,
                    torch.get_num_threads() * (device.type == "cpu"), p["workers"], cores,
                    max(1, cores // local - p["workers"]))


def wrap_data_parallel(run: TrainRun) -> None:
    """Under torchrun, the step calls the model through DDP (gradients averaged over ranks)."""
    if pdist.is_distributed():
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.net, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
