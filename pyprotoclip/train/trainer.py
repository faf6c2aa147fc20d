"""The training loop: CLIP with all-gather InfoNCE, exact gradient accumulation, exact resume.

``run(params)`` takes the dict of flags (``params.defaults()`` filled in) and trains; it works
single-process and under ``torchrun`` (one process per device, DDP; gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from datetime import datetime
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from pyprotoclip import distributed as pdist
from pyprotoclip.train import checkpoint as ckpt
from pyprotoclip.train import params as P
from pyprotoclip.train.scheduler import lr_at, set_lr

log = logging.getLogger("pyprotoclip.train")

DATA_WARN_FRACTION = 0.5  # warn when more than this share of step time waits for data
LN_100 = math.log(100.0)


# ---- small helpers --------------------------------------------------------------------------------

class _TqdmHandler(logging.StreamHandler):
    """Console handler that prints above an active tqdm bar instead of through it."""

    bar = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is not None:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
        else:
            super().emit(record)


def _setup_logging(log_file: str | None, is_main: bool) -> _TqdmHandler:
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


def _default_name(p: dict[str, Any]) -> str:
    date = datetime.now().strftime("%Y_%m_%d-%H_%M_%S")
    return f"{date}-model_{p['model']}-lr_{p['lr']}-b_{p['batch_size']}-j_{p['workers']}-p_{p['precision']}"


def _broadcast_object(obj: Any) -> Any:
    if not pdist.is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather_object(obj: Any) -> list[Any]:
    if not pdist.is_distributed():
        return [obj]
    out: list[Any] = [None] * pdist.world_size()
    dist.all_gather_object(out, obj)
    return out


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _autocast_factory(precision: str, device: torch.device) -> tuple[Callable[[], Any], bool]:
    """(context factory, use GradScaler) for a precision name; amp on CPU means fp32."""
    if precision == "amp" and device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), True
    if precision in ("amp_bf16", "amp_bfloat16"):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), False
    return contextlib.nullcontext, False


def _param_groups(model: torch.nn.Module, wd: float) -> list[dict[str, Any]]:
    """open_clip's split: no weight decay on gains, biases, norm layers and the logit scale."""

    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd},
    ]


def _data_module():
    import pyprotoclip.data as data

    return data


def _clip_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    from pyprotoclip.ops import infonce_loss

    return infonce_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float())


class _Meter:
    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def update(self, v: float, n: int = 1) -> None:
        self.total += v * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


# ---- the run ----------------------------------------------------------------------------------------

def run(p: dict[str, Any], *, build_loader: Callable | None = None) -> dict[str, Any]:
    """Train with the flags in ``p`` (keys with underscores); returns a summary dict.

    ``build_loader`` defaults to ``pyprotoclip.data.build_loader`` (tests pass a fake).
    """
    p = dict(p)
    P.validate(p)
    P.fill_model_defaults(p)

    rank, local_rank, world = pdist.init_from_env(p["dist_backend"])
    is_main = rank == 0
    if p["device"] == "cuda" or (p["device"] == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but CUDA is not available")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    data = _data_module()
    build_loader = build_loader or data.build_loader

    # run directory
    if not p["name"]:
        if p["resume"] == "latest":
            raise ValueError("name: --resume latest needs the --name of the run to continue")
        p["name"] = _broadcast_object(_default_name(p))
    run_dir = os.path.join(p["logs"], p["name"])
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    resume_path = None
    if p["resume"] == "latest":
        resume_path = ckpt.find_latest(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    elif p["resume"]:
        if not os.path.isfile(p["resume"]):
            raise ValueError(f"resume: no such checkpoint {p['resume']!r} (or use --resume latest)")
        resume_path = p["resume"]
    if is_main:
        if os.path.exists(os.path.join(run_dir, "out.log")) and not p["resume"]:
            raise ValueError(f"name: the run directory {run_dir!r} already exists; pass --resume latest or a new --name")
        os.makedirs(ckpt_dir, exist_ok=True)
    if pdist.is_distributed():
        dist.barrier()
    console = _setup_logging(os.path.join(run_dir, "out.log") if is_main else None, is_main)
    if p["resume"] == "latest" and resume_path is None:
        log.info("--resume latest: no checkpoint in %s, starting from scratch", ckpt_dir)
    if p["precision"] == "amp" and device.type == "cpu":
        log.info("--precision amp on CPU trains in fp32 (use amp_bf16 for bfloat16 autocast)")
    if is_main:
        P.dump_params(p, os.path.join(run_dir, "params.yaml"))

    # model, optimizer
    from pyprotoclip.models import create_model, get_model_config

    random.seed(p["seed"])
    np.random.seed(p["seed"])
    model, preprocess_train, preprocess_val, tokenizer = create_model(
        p["model"], pretrained=p["pretrained"], precision=p["precision"], device=device,
        grad_checkpointing=p["grad_checkpointing"], seed=p["seed"],
    )
    model_cfg = get_model_config(p["model"])
    # distinct streams per rank for anything random in the step (dropout, ...)
    torch.manual_seed(p["seed"] + rank)
    random.seed(p["seed"] + rank)
    np.random.seed(p["seed"] + rank)

    optimizer = torch.optim.AdamW(
        _param_groups(model, p["wd"]), lr=p["lr"], betas=(p["beta1"], p["beta2"]), eps=p["eps"]
    )
    autocast, use_scaler = _autocast_factory(p["precision"], device)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def make_train_loader(epoch: int, start_batch: int = 0):
        cfg = data.DataConfig(
            shards=p["train_data"], batch_size=p["batch_size"], workers=p["workers"],
            num_samples=p["train_num_samples"], resampled=p["dataset_resampled"], seed=p["seed"], drop_last=True,
        )
        return build_loader(
            cfg, preprocess=preprocess_train, tokenize=tokenizer, is_train=True, epoch=epoch, rank=rank,
            world_size=world, start_batch=start_batch,
        )

    first_loader = make_train_loader(0)
    steps_per_epoch = first_loader.num_batches // p["accum_freq"]
    if steps_per_epoch < 1:
        raise ValueError(
            f"train-data: an epoch has {first_loader.num_batches} batches per process, fewer than --accum-freq "
            f"{p['accum_freq']}; use more samples or a smaller --batch-size"
        )
    total_steps = steps_per_epoch * p["epochs"]
    cooldown_steps = (p["epochs_cooldown"] or 0) * steps_per_epoch

    step = 0
    if resume_path:
        state = ckpt.load_checkpoint(resume_path)
        if state.get("steps_per_epoch") not in (None, steps_per_epoch):
            raise ValueError(
                f"resume: {resume_path} was written with {state['steps_per_epoch']} steps per epoch, this run has "
                f"{steps_per_epoch}; keep --batch-size, --accum-freq, --train-num-samples and the process count"
            )
        _unwrap(model).load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        rngs = state.get("rng") or []
        if len(rngs) == world:
            ckpt.set_rng_state(rngs[rank])
        else:
            log.warning("resume: checkpoint has RNG states for %d processes, this run has %d; not restoring RNG", len(rngs), world)
        log.info("resumed from %s at step %d (epoch %d)", resume_path, step, step // steps_per_epoch)

    if pdist.is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    tb = None
    if is_main and "tensorboard" in P._report_to(p):
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    results_path = os.path.join(run_dir, "results.jsonl")

    def write_result(row: dict[str, Any]) -> None:
        if is_main:
            with open(results_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save(path_names: list[str], epoch_done: int) -> None:
        rng = _gather_object(ckpt.get_rng_state())
        if not is_main or not path_names:
            return
        obj = {
            "format": ckpt.FORMAT, "step": step, "epoch": epoch_done, "steps_per_epoch": steps_per_epoch,
            "name": p["name"], "model": p["model"], "model_cfg": model_cfg, "method": p["method"],
            "state_dict": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": {"kind": p["lr_scheduler"], "step": step, "total_steps": total_steps},
            "rng": rng, "world_size": world, "params": {k: v for k, v in p.items()},
        }
        for name in path_names:
            ckpt.save_checkpoint(obj, os.path.join(ckpt_dir, name))

    log.info(
        "training %s (%s) on %d process(es), device %s: %d steps/epoch x %d epochs, global batch %d",
        p["model"], p["method"], world, device, steps_per_epoch, p["epochs"], p["batch_size"] * p["accum_freq"] * world,
    )
    n_params = sum(x.numel() for x in _unwrap(model).parameters())
    log.info("model parameters: %.2fM", n_params / 1e6)

    accum = p["accum_freq"]
    global_batch = p["batch_size"] * accum * world
    summary: dict[str, Any] = {"run_dir": run_dir, "steps_per_epoch": steps_per_epoch}
    start_epoch = step // steps_per_epoch
    interrupted = False
    use_bar = is_main and sys.stdout.isatty()
    t_run = time.time()
    rate_meter = _Meter()
    data_meter = _Meter()

    for epoch in range(start_epoch, p["epochs"]):
        first = step - epoch * steps_per_epoch
        loader = first_loader if (epoch == 0 and first == 0) else make_train_loader(epoch, first * accum)
        first_loader = None
        model.train()
        it = iter(loader)
        bar = None
        if use_bar:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch}", dynamic_ncols=True, file=sys.stdout)
            console.bar = bar
        loss_m, batch_t, data_t = _Meter(), _Meter(), _Meter()
        end = time.time()
        for local in range(first, steps_per_epoch):
            lr = lr_at(
                step, base_lr=p["lr"], warmup=p["warmup"], total_steps=total_steps, kind=p["lr_scheduler"],
                cooldown_steps=cooldown_steps, cooldown_end_lr=p["lr_cooldown_end"], cooldown_power=p["lr_cooldown_power"],
            )
            set_lr(optimizer, lr)
            try:
                batches = [next(it) for _ in range(accum)]
            except StopIteration:
                raise RuntimeError(
                    f"train-data: the loader stopped after {local} of {steps_per_epoch} steps in epoch {epoch}; "
                    "the shards hold fewer samples than --train-num-samples / sizes.json says"
                ) from None
            t_data = time.time() - end

            loss = _train_step(model, batches, optimizer, scaler, autocast, device, accum, p["grad_clip_norm"])
            step += 1
            t_batch = time.time() - end
            end = time.time()
            loss_m.update(loss, 1)
            batch_t.update(t_batch)
            data_t.update(t_data)
            if local > first:  # an epoch's first step pays for worker start-up
                rate_meter.update(t_batch)
                data_meter.update(t_data)
            scale = float(_unwrap(model).logit_scale.detach().exp())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", scale=f"{scale:.1f}")

            last_in_epoch = local + 1 == steps_per_epoch
            if step % p["log_every_n_steps"] == 0 or last_in_epoch:
                sps = global_batch * batch_t.count / max(batch_t.total, 1e-9)
                frac = data_t.total / max(batch_t.total, 1e-9)
                seen = (local + 1) * global_batch
                log.info(
                    "Train Epoch: %d [%d/%d (%.0f%%)] step %d | %.1f samples/s (%.1f/s/device) | data %.1f%% | "
                    "lr %.3e | scale %.2f | contrastive_loss %.4f (%.4f)",
                    epoch, seen, steps_per_epoch * global_batch, 100.0 * (local + 1) / steps_per_epoch, step, sps,
                    sps / world, 100 * frac, lr, scale, loss, loss_m.avg,
                )
                if frac > DATA_WARN_FRACTION and batch_t.count > 1:
                    log.warning(
                        "data loading takes %.0f%% of step time: raise --workers (now %d) or make shards faster to decode",
                        100 * frac, p["workers"],
                    )
                row = {"type": "train", "epoch": epoch, "step": step, "samples": step * global_batch,
                       "contrastive_loss": loss, "contrastive_loss_avg": loss_m.avg, "lr": lr, "scale": scale,
                       "samples_per_s": sps, "samples_per_s_per_device": sps / world, "data_fraction": frac}
                write_result(row)
                if tb is not None:
                    for k in ("contrastive_loss", "lr", "scale", "samples_per_s", "data_fraction"):
                        tb.add_scalar(f"train/{k}", row[k], step)
                batch_t, data_t = _Meter(), _Meter()
            if p["save_every_n_steps"] and step % p["save_every_n_steps"] == 0 and not last_in_epoch:
                save([ckpt.LATEST], epoch)
            if p["stop_after_steps"] is not None and step >= p["stop_after_steps"] and not last_in_epoch:
                save([ckpt.LATEST], epoch)
                log.info("stopping after step %d as asked (--stop-after-steps); resume with --resume latest", step)
                interrupted = True
                break
        if bar is not None:
            bar.close()
            console.bar = None
        stats = loader.stats() if hasattr(loader, "stats") else None
        if stats and stats.get("bad_total"):
            # the per-sample warnings come from loader workers and reach only stderr; this line reaches out.log
            reasons = ", ".join(f"{k} {v}" for k, v in stats["bad"].items() if v)
            log.warning("train-data: epoch %d skipped %d bad sample(s)/shard(s) on this process (%s); see the "
                        "'skipping bad sample' warnings for which", epoch, stats["bad_total"], reasons)
        del it, loader
        if interrupted:
            break

        done = epoch + 1
        names = []
        if p["save_frequency"] and (done % p["save_frequency"] == 0 or done == p["epochs"]):
            names.append(f"epoch_{done}.pt")
        stop_now = p["stop_after_steps"] is not None and step >= p["stop_after_steps"] and done < p["epochs"]
        if p["save_most_recent"] or p["save_every_n_steps"] or stop_now:
            names.append(ckpt.LATEST)
        save(names, done)
        if p["val_data"] and p["val_frequency"] and (done % p["val_frequency"] == 0 or done == p["epochs"]):
            zeroshot = bool(p["zeroshot_frequency"]) and (done % p["zeroshot_frequency"] == 0 or done == p["epochs"])
            if is_main:
                metrics = _evaluate(model, p, preprocess_val, tokenizer, device, autocast, build_loader, zeroshot)
                metrics.update(type="val", epoch=done, step=step)
                write_result(metrics)
                log.info("Eval Epoch: %d %s", done, " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
                if tb is not None:
                    for k, v in metrics.items():
                        if isinstance(v, float):
                            tb.add_scalar(f"val/{k}", v, step)
            if pdist.is_distributed():
                dist.barrier()
        if stop_now:
            log.info("stopping after step %d as asked (--stop-after-steps); resume with --resume latest", step)
            interrupted = True
            break

    wall = time.time() - t_run
    summary.update(
        step=step, interrupted=interrupted, wall_s=wall,
        samples_per_s=global_batch * rate_meter.count / max(rate_meter.total, 1e-9),
        data_fraction=data_meter.total / max(rate_meter.total, 1e-9),
        world_size=world,
    )
    summary["samples_per_s_per_device"] = summary["samples_per_s"] / world
    if is_main:
        log.info(
            "done: %d steps in %.1fs, %.1f samples/s (%.1f/s/device), data %.1f%% of step time",
            step, wall, summary["samples_per_s"], summary["samples_per_s_per_device"], 100 * summary["data_fraction"],
        )
        write_result({"type": "summary", **summary})
    if tb is not None:
        tb.close()
    summary["model"] = _unwrap(model)
    return summary


def _train_step(model, batches, optimizer, scaler, autocast, device, accum: int, grad_clip_norm: float | None) -> float:
    """One optimizer step over ``accum`` micro-batches; returns the loss of the whole step.

    With accum > 1 the features of every micro-batch are first computed without grad; then each
    micro-batch is recomputed with grad and the loss over all cached + live features is
    back-propagated (open_clip's scheme). Feature gradients then sum to the full-batch gradient,
    but the logit scale enters every one of the ``accum`` losses, so its gradient is divided by
    ``accum`` afterwards to equal the full-batch gradient.
    """
    net = _unwrap(model)
    optimizer.zero_grad(set_to_none=True)
    images = [b["image"].to(device, non_blocking=True) for b in batches]
    texts = [b["text"].to(device, non_blocking=True) for b in batches]

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    if accum == 1:
        with autocast():
            out = model(images[0], texts[0])
        loss = _clip_loss(out)
        backward(loss)
    else:
        with torch.no_grad():
            cached = []
            for img, txt in zip(images, texts):
                with autocast():
                    o = model(img, txt)
                cached.append((o["image_features"], o["text_features"]))
        for j in range(accum):
            sync = contextlib.nullcontext() if (j == accum - 1 or not hasattr(model, "no_sync")) else model.no_sync()
            with sync:
                with autocast():
                    out = model(images[j], texts[j])
                img_all = torch.cat([c[0] for c in cached[:j]] + [out["image_features"]] + [c[0] for c in cached[j + 1 :]])
                txt_all = torch.cat([c[1] for c in cached[:j]] + [out["text_features"]] + [c[1] for c in cached[j + 1 :]])
                loss = _clip_loss({"image_features": img_all, "text_features": txt_all, "logit_scale": out["logit_scale"]})
                backward(loss)
        if net.logit_scale.grad is not None:
            net.logit_scale.grad.div_(accum)
    if scaler is not None:
        if grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        if grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip_norm)
        optimizer.step()
    with torch.no_grad():
        net.logit_scale.clamp_(0, LN_100)
    return float(loss.detach())


def _evaluate(model, p, preprocess_val, tokenizer, device, autocast, build_loader, zeroshot: bool) -> dict[str, Any]:
    """Validation metrics on --val-data (rank 0 only): loss, retrieval and, when asked, zero-shot."""
    from pyprotoclip.eval.features import extract_features
    from pyprotoclip.eval.retrieval import retrieval_recall
    from pyprotoclip.eval.zeroshot import build_classifier, zeroshot_classify

    data = _data_module()
    cfg = data.DataConfig(
        shards=p["val_data"], batch_size=p["batch_size"], workers=p["workers"], num_samples=p["val_num_samples"],
        seed=p["seed"], drop_last=False,
    )
    loader = build_loader(cfg, preprocess=preprocess_val, tokenize=tokenizer, is_train=False)
    net = _unwrap(model)
    feats = extract_features(net, loader, device=device, autocast=autocast)
    img = torch.nn.functional.normalize(feats["image_features"], dim=-1)
    txt = torch.nn.functional.normalize(feats["text_features"], dim=-1)
    scale = net.logit_scale.exp().detach().float().cpu()
    from pyprotoclip.ops import infonce_loss

    losses = [
        float(infonce_loss(img[i : i + p["batch_size"]], txt[i : i + p["batch_size"]], scale)) * len(img[i : i + p["batch_size"]])
        for i in range(0, len(img), p["batch_size"])
    ]
    metrics: dict[str, Any] = {"val_loss": sum(losses) / len(img), "num_samples": int(len(img))}
    metrics.update(retrieval_recall(img, txt))
    if zeroshot and bool((feats["labels"] >= 0).any()):
        try:
            classnames, templates = data.read_zeroshot_files(p["val_data"])
        except FileNotFoundError as exc:
            log.info("zero-shot skipped: %s", exc)
        else:
            with torch.no_grad(), autocast():
                w = build_classifier(lambda t: net.encode_text(t), tokenizer, classnames, templates, device=device)
            zs = zeroshot_classify(feats["image_features"].to(w.device), feats["labels"].to(w.device), w)
            metrics.update(zeroshot_top1=zs["top1"], zeroshot_top5=zs["top5"])
    return metrics
