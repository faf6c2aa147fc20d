"""`ood train` under two gloo processes (as torchrun runs it): every rank ends with the same weights and
bitwise the same prototypes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, train: str, logs: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from pyprotoclip.ood import train as T

    try:
        # a torchvision backbone at 16x16: no open_clip import in the spawned processes
        out = T.run(dict(train_data=train, backbone="resnet18", image_size=16, batch_size=4, epochs=1, workers=0, precision="fp32",
                         logs=logs, name="ddp", train_num_samples=16, cache_size=2, k=2, device="cpu", warmup_epochs=0,
                         lr=0.1, dist_backend="gloo", save_frequency=0, save_most_recent=False))
        torch.save({"prototypes": out["loss_fn"].prototypes, "state": out["net"].state_dict(), "step": out["step"]},
                   os.path.join(logs, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_end_with_identical_prototypes_and_weights(ood_data, tmp_path):
    mp.spawn(_rank_main, args=(2, _free_port(), ood_data["train"], str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["step"] == r1["step"] == 2  # 16 samples / (4 per rank x 2 ranks)
    assert torch.equal(r0["prototypes"], r1["prototypes"])
    params = [k for k in r0["state"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in params)
    assert (tmp_path / "ddp" / "out.log").exists()
