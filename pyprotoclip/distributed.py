"""Process-group helpers and an all-gather whose backward sends every rank its gradients.

All functions take ``group=None`` for the default group and work single-process (no
``torch.distributed`` initialised), where they are identities.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def _reduce_scatter_sum(full: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum over ranks of ``full`` (W*B, ...), returning this rank's (B, ...) slice."""
    w, r = world_size(group), rank(group)
    chunk = full.shape[0] // w
    if dist.get_backend(group) == dist.Backend.NCCL:
        out = full.new_empty((chunk, *full.shape[1:]))
        dist.reduce_scatter_tensor(out, full.contiguous(), group=group)
        return out
    # gloo has no reduce-scatter: an all-reduce then a slice gives the same numbers.
    summed = full.contiguous().clone()
    dist.all_reduce(summed, group=group)
    return summed[r * chunk : (r + 1) * chunk]


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        w = world_size(group)
        out = tensor.new_empty((w * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Rank r's rows were used by every rank's loss: its gradient is the sum of all ranks'
        # gradients for its slice. DDP then averages parameter gradients over ranks.
        return _reduce_scatter_sum(grad, ctx.group), None


def all_gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from all ranks in rank order into (W*B, ...), differentiably.

    Every rank must pass the same shape. Single-process: returns ``tensor`` unchanged.
    """
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_gather_no_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from all ranks into (W*B, ...), without gradients."""
    if not is_distributed(group):
        return tensor
    out = tensor.new_empty((world_size(group) * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor.contiguous(), group=group)
    return out


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = tensor.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every rank's loss reads the same sum, so rank r's contribution receives the sum over ranks
        # of their incoming gradients. When each rank computes the same global loss from the sum,
        # that is W times its gradient, and DDP's average over W ranks then leaves exactly the
        # single-process gradient.
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_sum_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (a new tensor), differentiable: the backward all-reduces
    (sums) the incoming gradient, so each rank's input gets the gradient of every rank's use of the
    sum. Single-process: returns ``tensor`` unchanged."""
    if not is_distributed(group):
        return tensor
    return _AllReduceSumWithGrad.apply(tensor, group)


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place sum over ranks (a no-op single-process); returns ``tensor``."""
    if is_distributed(group):
        dist.all_reduce(tensor, group=group)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place broadcast from ``src`` (a no-op single-process); returns ``tensor``."""
    if is_distributed(group):
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; small objects only). Identity single-process."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; small objects only)."""
    if not is_distributed(group):
        return [obj]
    out: list[Any] = [None] * world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def init_from_env(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise the default process group when launched by torchrun; returns (rank, local_rank, world).

    Uses NCCL when CUDA is available, gloo otherwise, unless ``backend`` is given.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        store = _restart_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), local_rank, dist.get_world_size()


def _restart_store() -> dist.Store | None:
    """torchrun's store seen under a prefix of its restart count, when the workers share the agent's store.

    torchrun keeps one store server across ``--max-restarts`` restarts and hands the restarted workers the
    same address; without a prefix of their own they read the keys the killed workers wrote (gloo's peer
    addresses, barrier counters) and hang or fail to connect. None when there is nothing to separate.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                         is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"pyprotoclip/attempt_{attempt}", base)
