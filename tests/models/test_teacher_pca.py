"""The external teacher's PCA: local, and shared across processes that hold different rows."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyprotoclip.models.teacher import pca


def _rows(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(40, 6, generator=g) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]) + rank


def _reference(fit: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    mean = fit.double().mean(0)
    vecs = torch.linalg.eigh(torch.cov((fit.double() - mean).t())).eigenvectors.flip(1)[:, :dim]
    return (x.double() - mean) @ vecs


def _same_up_to_sign(a: torch.Tensor, b: torch.Tensor) -> None:
    signs = torch.sign((a * b).sum(0))
    torch.testing.assert_close(a, b * signs, atol=1e-5, rtol=1e-5)


def test_pca_projects_on_the_top_principal_directions():
    x = _rows(0)
    _same_up_to_sign(pca(x, 3).double(), _reference(x, x, 3))
    assert pca(x, 0) is x and pca(x, 6) is x


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(pca(_rows(rank), 2, shared=True), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shared_pca_projects_every_process_on_rank_0s_basis(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.testing.assert_close(got[0], pca(_rows(0), 2))
    # rank 1 is centred and projected with rank 0's mean and directions, not its own
    mean0 = _rows(0).double().mean(0)
    basis = torch.linalg.lstsq(got[0].double(), _rows(0).double() - mean0).solution  # (2, 6), orthonormal rows
    torch.testing.assert_close(got[1].double(), (_rows(1).double() - mean0) @ basis.t(), atol=1e-4, rtol=1e-4)
    own = pca(_rows(1), 2).double()
    assert not torch.allclose(got[1].double().abs(), own.abs(), atol=1e-2)
