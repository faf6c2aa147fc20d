"""Multi-rank infonce_loss on gloo: after DDP-style averaging, the loss and the gradients of both
feature tensors and of logit_scale equal the single-process loss on the concatenated batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import pyprotoclip
from pyprotoclip.ops import infonce_loss, reference
from tests.utils import assert_close_verbose

BACKENDS = ["compiled", "reference"] if pyprotoclip.build_info()["compiled"] else ["reference"]
PER_RANK = 5  # odd, so that no tile boundary lines up with a rank boundary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(world: int):
    g = torch.Generator().manual_seed(1234)
    image = F.normalize(torch.randn(world * PER_RANK, 24, generator=g, dtype=torch.float64), dim=1).float()
    text = F.normalize(torch.randn(world * PER_RANK, 24, generator=g, dtype=torch.float64), dim=1).float()
    return image, text


def _worker(rank: int, world: int, port: int, backend: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        image, text = _global_batch(world)
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        local_image = image[sl].clone().requires_grad_()
        local_text = text[sl].clone().requires_grad_()
        log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        loss = infonce_loss(local_image, local_text, log_scale.exp(), backend=backend)
        loss.backward()
        # DDP averages parameter gradients; a shared parameter's (logit scale) average is the all-reduce / W
        scale_grad = log_scale.grad.clone()
        dist.all_reduce(scale_grad)
        scale_grad /= world
        torch.save(
            {"loss": loss.detach(), "image_grad": local_image.grad, "text_grad": local_text.grad, "scale_grad": scale_grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_matches_single_process(tmp_path, world, backend):
    mp.spawn(_worker, args=(world, _free_port(), backend, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    image, text = _global_batch(world)
    image64, text64 = image.double().requires_grad_(), text.double().requires_grad_()
    log_scale64 = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    full = reference.infonce_loss(image64, text64, log_scale64.exp())
    full.backward()

    # the global loss is the mean of the rank-local losses (equal local batch sizes)
    mean_loss = torch.stack([r["loss"] for r in results]).double().mean()
    assert_close_verbose(mean_loss, full, atol=1e-5, name="loss")
    # a rank's features receive the sum over ranks of d(L_r)/d(features); DDP then divides by W
    got_image = torch.cat([r["image_grad"] for r in results]) / world
    got_text = torch.cat([r["text_grad"] for r in results]) / world
    assert_close_verbose(got_image, image64.grad, atol=1e-6, name="grad image")
    assert_close_verbose(got_text, text64.grad, atol=1e-6, name="grad text")
    for r in results:
        assert_close_verbose(r["scale_grad"], log_scale64.grad, atol=1e-6, rtol=1e-5, name="grad logit scale")
