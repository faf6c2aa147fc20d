"""Training flags: one table drives the click options, the ``--config FILE.yaml`` keys and ``params.yaml``.

Names and defaults follow open_clip's ``open_clip_train/params.py`` where the flag exists there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import yaml

from pyprotoclip.losses import get_method, method_names

SCHEDULERS = ("cosine", "const", "const-cooldown")
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str  # the flag without dashes, with dashes between words ("train-data")
    type: Any  # int, float, str, bool (a switch) or a tuple of choices
    default: Any
    help: str
    hidden: bool = False
    aliases: tuple[str, ...] = ()  # other spellings on the command line (and in --config files)

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag("config", str, None, "YAML file whose keys are these flags (dashes or underscores); command-line flags win."),
    # data
    Flag("train-data", str, None, "Training shards: brace-expanded webdataset spec(s) joined by '::'."),
    Flag("val-data", str, None, "Validation shards (val loss, retrieval and, with class names beside them, zero-shot)."),
    Flag("train-num-samples", int, None, "Samples per epoch (default: the sum in sizes.json beside the shards)."),
    Flag("val-num-samples", int, None, "Validation samples (default: sizes.json)."),
    Flag("dataset-resampled", bool, False, "Sample shards with replacement (an 'epoch' is then --train-num-samples)."),
    Flag("workers", int, 4, "Data-loader worker processes per device."),
    Flag("batch-size", int, 64, "Batch size per device (per process)."),
    Flag("max-bad-fraction", float, 0.1, "Stop with an error naming the worst shards when more than this fraction of "
         "the training samples read so far in the epoch is bad (undecodable, no caption, in a damaged shard), once 1000 "
         "were read (or the epoch's, when fewer), or when damaged shards hold more than it (1: never stop)."),
    # optimisation
    Flag("epochs", int, 32, "Number of epochs."),
    Flag("lr", float, None, "Peak learning rate (default 5e-4, as open_clip)."),
    Flag("beta1", float, None, "AdamW beta1 (default 0.9)."),
    Flag("beta2", float, None, "AdamW beta2 (default 0.98 for ViT models, 0.999 otherwise)."),
    Flag("eps", float, None, "AdamW epsilon (default 1e-6 for ViT models, 1e-8 otherwise)."),
    Flag("wd", float, 0.2, "AdamW weight decay; none on gains, biases, norm layers and the logit scales."),
    Flag("warmup", int, 10000, "Linear warm-up steps (optimizer steps)."),
    Flag("lr-scheduler", tuple(SCHEDULERS), "cosine", "LR schedule after warm-up."),
    Flag("epochs-cooldown", int, None, "const-cooldown: cool down over the last N epochs."),
    Flag("lr-cooldown-end", float, 0.0, "const-cooldown: final learning rate."),
    Flag("lr-cooldown-power", float, 1.0, "const-cooldown: power of the polynomial cool-down."),
    Flag("grad-clip-norm", float, None, "Clip the global gradient norm to this value."),
    Flag("max-nonfinite", int, 20, "A step whose loss (or, without the fp16 GradScaler, gradient norm) is NaN/Inf is "
         "skipped: no update, while the step number and LR schedule move on. Stop after this many skipped steps in a "
         "row (0: never stop)."),
    Flag("accum-freq", int, 1, "Micro-batches per optimizer step (open_clip-style feature caching, exact gradient)."),
    Flag("precision", tuple(PRECISIONS), "amp", "Floating point precision (amp on CPU runs fp32)."),
    Flag("grad-checkpointing", bool, False, "Recompute activations in backward to save memory."),
    # model
    Flag("model", str, "RN50", "Architecture: an open_clip name or a tiny built-in (tiny-vit, tiny-rn)."),
    Flag("pretrained", str, None, "Local checkpoint file to start from (loaded with weights_only=True)."),
    Flag("method", method_names(), "clip", "Training objective: " + "; ".join(
        f"{n} ({get_method(n).summary})" for n in method_names()) + "."),
    # CyCLIP (--method cyclip; the cyclic terms also combine with other methods that take them)
    Flag("cylambda1", float, None, "Weight of CyCLIP's in-modal cyclic term, 1/N sum_jk (<I_j,I_k> - <T_j,T_k>)^2 "
         "(default 0.25 with --method cyclip, 0 = off with the other methods that accept it)."),
    Flag("cylambda2", float, None, "Weight of CyCLIP's cross-modal cyclic term, 1/N sum_jk (<I_j,T_k> - <I_k,T_j>)^2 "
         "(default 0.25 with --method cyclip, 0 = off with the other methods that accept it)."),
    Flag("inmodal", bool, False, "CyCLIP: also contrast each image and caption with an augmented view of itself "
         "(AutoAugment; EDA swap/delete/insert without WordNet)."),
    # logging and checkpoints
    Flag("logs", str, "./logs/", "Where to write <logs>/<name>/ (alias --logs-dir: use it under torchrun)."),
    Flag("name", str, None, "Experiment name (default: date, model, lr, batch size, precision)."),
    Flag("report-to", str, "", "Comma-separated loggers: 'tensorboard' (or '' for none)."),
    Flag("log-every-n-steps", int, 100, "Console/tensorboard log interval in optimizer steps (each line ends with "
         "an ETA); when stdout is not a terminal, also a progress line once 30 s passed since the last line."),
    Flag("save-frequency", int, 1, "Save epoch_<N>.pt every N epochs (0: never)."),
    Flag("save-most-recent", bool, False, "Also keep checkpoints/epoch_latest.pt, updated every epoch."),
    Flag("save-every-n-steps", int, 0, "Also update epoch_latest.pt every N optimizer steps (mid-epoch resume)."),
    Flag("resume", str, None, "'latest' (newest checkpoint of --name) or a checkpoint path."),
    Flag("seed", int, 0, "Random seed (model init, data order, augmentation)."),
    Flag("val-frequency", int, 1, "Evaluate on --val-data every N epochs."),
    Flag("zeroshot-frequency", int, 2, "Zero-shot evaluation on --val-data every N epochs (0: never)."),
    Flag("threads", int, None, "torch threads per process (default: torch's choice, all cores). With data workers "
         "on a small machine, threads + workers <= cores avoids oversubscription."),
    Flag("device", ("auto", "cpu", "cuda"), "auto", "auto: cuda:<local rank> when CUDA is available, else CPU."),
    Flag("dist-backend", str, None, "torch.distributed backend (default: nccl on GPU, gloo on CPU)."),
    # ProtoCLIP (--method protoclip): episodes, prototypes, Prototypical Back Translation, external teacher
    Flag("episode-size", int, 0, "ProtoCLIP: samples per episode, drawn uniformly with replacement over the whole "
         "dataset (0: the epoch's sample count, --train-num-samples or sizes.json)."),
    Flag("episode-cache-dir", str, None, "ProtoCLIP with streaming shards (pipe:, URLs): where each process spools "
         "its share of an episode's samples, one episode at a time (default: <logs>/<name>/episode-cache)."),
    Flag("clustering-frequency", int, 1, "ProtoCLIP: an episode (one draw, one clustering) lasts this many epoch(s)."),
    Flag("num-prototypes", int, 20000, "ProtoCLIP: k-means clusters K per modality.", aliases=("k",)),
    Flag("kmeans-max-iter", int, 20, "ProtoCLIP: k-means iterations (exactly this many: no early stop)."),
    Flag("kmeans-nredo", int, 1, "ProtoCLIP: k-means restarts; the lowest objective is kept (the paper's runs: 3)."),
    Flag("PBT", bool, False, "ProtoCLIP: Prototypical Back Translation (prototypes = means of the other modality's "
         "features over each cluster)."),
    Flag("target-temperature", float, 0.01, "ProtoCLIP: temperature of the soft targets softmax(<C_y, C_k>/T) "
         "(the paper's recipe value; <= 0: hard labels, the official code's default)."),
    Flag("w-clip", float, 1.0, "ProtoCLIP: weight of the CLIP loss."),
    Flag("w-proto", float, 1.0, "ProtoCLIP: weight of the prototype loss 1/2 (L_i<-t + L_t<-i) (the paper's value)."),
    Flag("w-proto-external", float, 1.0, "ProtoCLIP: weight of the external-teacher loss 1/2 (L_i<-e + L_t<-e), "
         "with --external-teacher (the paper's value)."),
    Flag("external-teacher", str, None, "ProtoCLIP: 'default' (all-MiniLM-L6-v2, offline), a sentence-transformers "
         "model directory, or a feature file (.pt: {'keys': [...], 'features': (N, D)} by sample key)."),
    Flag("external-teacher-dim", int, 64, "ProtoCLIP: PCA of the teacher's features to this many dimensions "
         "(0: keep them)."),
    Flag("add-projection-head", bool, False, "ProtoCLIP: MLP heads into the prototype space (else prototypes live "
         "in the towers' normalised embedding space)."),
    Flag("projection-dim", int, 128, "ProtoCLIP: output width of the projection heads."),
    Flag("projection-hidden-dim", int, 2048, "ProtoCLIP: hidden width of the projection heads."),
    Flag("projection-n-layers", int, 1, "ProtoCLIP: hidden layers of the heads (0: one Linear)."),
    Flag("infonce-warmup-epoch", int, 0, "ProtoCLIP: the first N epochs train with the CLIP loss only (the paper: 1)."),
    Flag("lit-start-epoch", int, -1, "ProtoCLIP: from epoch L-1 on (L > 0), locked-image tuning: the image "
         "tower's learning rate has annealed to 0 and the loss is CLIP's only (-1: off)."),
    Flag("lr-text", float, -1.0, "ProtoCLIP: peak learning rate of everything but the image tower (-1: --lr)."),
    Flag("text-start-epoch", int, 0, "ProtoCLIP: everything but the image tower has learning rate 0 for the first "
         "N epochs, then its own warm-up."),
    Flag("stop-after-steps", int, None, "Exit after this global step with a checkpoint, as if preempted (testing).", hidden=True),
)
FLAG_BY_KEY = {f.key: f for f in FLAGS}
FLAG_BY_NAME = {name.replace("-", "_"): f for f in FLAGS for name in (f.name, *f.aliases)}


def bad_fraction_limit(fraction: float | None) -> float | None:
    """--max-bad-fraction as the data loader and the bad-data monitor take it: None (never stop) for None or >= 1.

    The one place of the rule; ``train`` and ``ood train`` both use it."""
    return None if fraction is None or fraction >= 1 else float(fraction)


def defaults() -> dict[str, Any]:
    return {f.key: f.default for f in FLAGS}


def read_config_file(path: str) -> dict[str, Any]:
    """Read a ``--config`` YAML file into {key_with_underscores: value}; ValueError on unknown keys."""
    if not os.path.isfile(path):
        raise ValueError(f"config: no such file {path!r}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"config: {path!r} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of flag names to values, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        flag = FLAG_BY_NAME.get(str(name).lstrip("-").replace("-", "_"))
        if flag is None or flag.key == "config":
            raise ValueError(f"config: unknown key {name!r} in {path!r} (keys are the `pyprotoclip train` flags)")
        out[flag.key] = coerce(flag, value)
    return out


def coerce(flag: Flag, value: Any) -> Any:
    """Check and convert a config-file value to the flag's type."""
    if value is None:
        return None
    if isinstance(flag.type, tuple):
        if value not in flag.type:
            raise ValueError(f"{flag.name}: expected one of {', '.join(flag.type)}, got {value!r}")
        return value
    if flag.type is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{flag.name}: expected true/false, got {value!r}")
        return value
    if flag.type is str and isinstance(value, (list, tuple)) and flag.key == "report_to":
        return ",".join(map(str, value))
    try:
        if flag.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return flag.type(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag.name}: expected {flag.type.__name__}, got {value!r}") from None


def validate(p: dict[str, Any]) -> None:
    """Cross-flag checks with messages that name the flag."""
    for flag in FLAGS:
        if flag.type is float and p.get(flag.key) is not None and not math.isfinite(p[flag.key]):
            raise ValueError(f"{flag.name}: expected a finite number, got {p[flag.key]}")
    if not p["train_data"]:
        raise ValueError("train-data: required (brace-expanded shard spec, e.g. data/train/{00000..00009}.tar)")
    if p["threads"] is not None and p["threads"] < 1:
        raise ValueError(f"threads: expected a positive integer, got {p['threads']!r}")
    for key in ("batch_size", "epochs", "accum_freq", "log_every_n_steps"):
        if p[key] is None or p[key] < 1:
            raise ValueError(f"{FLAG_BY_KEY[key].name}: expected a positive integer, got {p[key]!r}")
    for key in ("workers", "warmup", "save_frequency", "save_every_n_steps", "val_frequency", "zeroshot_frequency",
                "max_nonfinite"):
        if p[key] is None or p[key] < 0:
            raise ValueError(f"{FLAG_BY_KEY[key].name}: expected an integer >= 0, got {p[key]!r}")
    for key in ("train_num_samples", "val_num_samples", "epochs_cooldown", "stop_after_steps"):
        if p[key] is not None and p[key] < 1:
            raise ValueError(f"{FLAG_BY_KEY[key].name}: expected a positive integer, got {p[key]!r}")
    if not 0 <= p["seed"] < 2**32:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {p['seed']!r}")
    if p["lr"] is not None and p["lr"] < 0:
        raise ValueError(f"lr: expected >= 0, got {p['lr']}")
    for key in ("beta1", "beta2"):
        if p[key] is not None and not 0 <= p[key] < 1:
            raise ValueError(f"{key}: expected a value in [0, 1), got {p[key]}")
    for key in ("eps", "wd", "lr_cooldown_end"):
        if p[key] is not None and not p[key] >= 0:
            raise ValueError(f"{FLAG_BY_KEY[key].name}: expected >= 0, got {p[key]}")
    if not p["lr_cooldown_power"] > 0:
        raise ValueError(f"lr-cooldown-power: expected > 0, got {p['lr_cooldown_power']}")
    if p["max_bad_fraction"] is None or not 0 <= p["max_bad_fraction"] <= 1:
        raise ValueError(f"max-bad-fraction: expected a fraction in [0, 1] (1: never stop), got {p['max_bad_fraction']!r}")
    if p["grad_clip_norm"] is not None and p["grad_clip_norm"] <= 0:
        raise ValueError(f"grad-clip-norm: expected > 0, got {p['grad_clip_norm']}")
    if p["lr_scheduler"] == "const-cooldown" and not p["epochs_cooldown"]:
        raise ValueError("epochs-cooldown: required with --lr-scheduler const-cooldown")
    bad = [r for r in report_to(p) if r not in ("tensorboard",)]
    if bad:
        raise ValueError(f"report-to: supported loggers are 'tensorboard', got {', '.join(bad)}")
    if p["pretrained"] and not os.path.isfile(p["pretrained"]):
        raise ValueError(f"pretrained: no such file {p['pretrained']!r} (downloads are not supported: give a local file)")
    get_method(p["method"]).check_params(p)


def report_to(p: dict[str, Any]) -> list[str]:
    return [r.strip() for r in (p.get("report_to") or "").split(",") if r.strip()]


def fill_model_defaults(p: dict[str, Any]) -> None:
    """open_clip's per-architecture optimiser defaults (CLIP paper values)."""
    vit = "vit" in p["model"].lower()
    if p["lr"] is None:
        p["lr"] = 5.0e-4
    if p["beta1"] is None:
        p["beta1"] = 0.9
    if p["beta2"] is None:
        p["beta2"] = 0.98 if vit else 0.999
    if p["eps"] is None:
        p["eps"] = 1.0e-6 if vit else 1.0e-8


def dump_params(p: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump({FLAG_BY_KEY[k].name if k in FLAG_BY_KEY else k: v for k, v in p.items()}, f, sort_keys=False)
