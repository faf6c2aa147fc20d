"""The method interface: what a training objective (CLIP, CyCLIP, ProtoCLIP) gives the trainer.

A method is a :class:`Method` subclass found by name in the registry (``--method NAME``). It builds
what it adds to the model, its loss module, and hooks the trainer calls at fixed points; each hook's
default is what plain CLIP needs, so a method overrides only what it changes.

A loss module is an ``nn.Module`` called as ``loss_fn(outputs, *, step_context)``: ``outputs`` is the
model's output dict (``image_features`` (N, d), ``text_features`` (N, d), ``logit_scale`` 0-d, and
whatever the method's model adds); it returns a dict of named 0-d terms plus ``"loss"``, the total
that is back-propagated. The trainer logs every term by name and knows none of them.

Output convention (what makes gradient accumulation exact for every method): a tensor output with a
leading batch dimension is per-sample; a 0-d tensor (a scale, a temperature) is global.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.distributed as dist

LN_100 = math.log(100.0)


@dataclasses.dataclass
class StepContext:
    """What a loss may know about the step besides the model outputs.

    step: the optimizer step being taken (0-based). epoch: the current epoch. batch: per-sample
    metadata of the step's samples in the order of the output rows ("label" (N,) int64, "key" list
    of str, and whatever the loader adds); with --accum-freq > 1 the micro-batches' metadata are
    concatenated like their outputs. group: the process group of the data-parallel ranks.
    """

    step: int
    epoch: int
    batch: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    group: dist.ProcessGroup | None = None


@dataclasses.dataclass
class EpochContext:
    """What the before-epoch hook may use: the model, where it runs, and how to read data.

    write_result(row) appends a row to the run's results.jsonl (rank 0 writes; every rank may call it).
    preprocess, tokenize: the training loader's transforms (after ``Method.train_transforms``).
    """

    epoch: int
    step: int
    model: torch.nn.Module
    device: torch.device
    autocast: Callable[[], Any]
    rank: int
    world_size: int
    log: logging.Logger
    write_result: Callable[[Mapping[str, Any]], None]
    preprocess: Callable
    tokenize: Callable
    group: dist.ProcessGroup | None = None


@dataclasses.dataclass
class LoaderRequest:
    """What the trainer asks of ``Method.train_loader``: the training loader of ``epoch`` for one rank,
    from micro-batch ``start_batch`` on. ``default()`` builds the trainer's own (the shards streamed)."""

    epoch: int
    start_batch: int
    rank: int
    world_size: int
    preprocess: Callable
    tokenize: Callable
    default: Callable[[], Any]


class Method:
    """A training objective and its hooks; the defaults are plain CLIP's.

    Construct with the training flags (a dict keyed by flag name with underscores).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # learnable log-scales of the model: clamped to [0, ln 100] after every optimizer step and logged
    scales: ClassVar[tuple[str, ...]] = ("logit_scale",)

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Cross-flag checks of this method's flags: ValueError naming the flag."""

    def build_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model to train: ``model`` (an open_clip model) with whatever the method adds."""
        return model

    def build_loss(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_transforms(self, preprocess: Callable, tokenize: Callable) -> tuple[Callable, Callable]:
        """The training loader's (image preprocess, tokenizer): PIL image -> tensor, list of B captions
        -> tensor with B rows. A method that needs more per sample (augmented views) wraps them; the
        loader stacks whatever they return along a new leading batch dimension."""
        return preprocess, tokenize

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (each with a "name"): open_clip's split, no weight decay on
        gains, biases, norm layers and the logit scales."""

        def exclude(n: str, p: torch.nn.Parameter) -> bool:
            return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [
            {"name": "no_decay", "params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"name": "decay", "params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
        ]

    def train_loader(self, request: LoaderRequest) -> Any:
        """The loader of one training epoch (it must give ``num_batches`` micro-batches per rank)."""
        return request.default()

    def group_lr(self, group: Mapping[str, Any], step: int, epoch: int, schedule: Callable[..., float]) -> float:
        """The learning rate of one parameter group at optimizer step ``step``.

        ``schedule(step, *, base_lr=None, start_step=0, total_steps=None)`` is the run's schedule (warm-up,
        then --lr-scheduler), optionally with another peak rate, started later or ending sooner.
        """
        return schedule(step)

    def before_epoch(self, ctx: EpochContext) -> None:
        """Called on every rank before an epoch's first step (also when resuming inside it)."""

    @torch.no_grad()
    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        """Clamp every learnable log-scale to [0, ln 100], as CLIP does."""
        for name in self.scales:
            getattr(model, name).clamp_(0, LN_100)

    def state_dict(self) -> dict[str, Any]:
        """Method state saved in the checkpoint (tensors and primitives only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""

    def eval_metrics(self, model: torch.nn.Module, features: Mapping[str, Any]) -> dict[str, float]:
        """Extra validation metrics from the extracted validation features."""
        return {}
