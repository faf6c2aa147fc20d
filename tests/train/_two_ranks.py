"""Two forked gloo ranks on fake_data (test_nonfinite.py, test_faults.py) where only rank 1 meets a fault at its
second step: mode "nonfinite", its loss is NaN (its gradients stay finite); mode "sigterm", it receives
SIGTERM; mode "enospc": rank 0's first checkpoint write fails with ENOSPC. Every rank saves its weights, its step and its skipped-step count."""

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import fake_data  # noqa: E402


def main(rank: int, port: int, out: str, logs: str, mode: str = "nonfinite") -> None:
    """One rank: the environment torchrun would set, then a short run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pyprotoclip.train import epoch as epoch_mod
    from pyprotoclip.train import params as P
    from pyprotoclip.train import trainer

    real_step, calls = epoch_mod.train_step, []

    def step(model, loss_fn, batches, optimizer, **kw):
        calls.append(1)
        if rank == 1 and len(calls) == 2 and mode == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif rank == 1 and len(calls) == 2 and mode == "nonfinite":
            inner = loss_fn

            def nan_loss(outputs, *, step_context):
                terms = dict(inner(outputs, step_context=step_context))
                terms["loss"] = terms["loss"] + float("nan")  # the same gradient, a NaN value
                return terms

            loss_fn = nan_loss
        return real_step(model, loss_fn, batches, optimizer, **kw)

    epoch_mod.train_step = step
    if mode == "enospc" and rank == 0:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        from pyprotoclip import checkpoint
        from tests.utils import DiskFull

        checkpoint.open = DiskFull(after=0).open  # rank 0's checkpoint writes find the disk full
    p = P.defaults()
    p.update(train_data="fake", model="tiny-vit", batch_size=8, epochs=1, workers=0, warmup=1, logs=logs, name="ddp",
             precision="fp32", log_every_n_steps=1, train_num_samples=64 if mode == "sigterm" else 32, lr=1e-3,
             device="cpu", save_every_n_steps=1 if mode == "enospc" else 0)
    from pyprotoclip.train.faults import TrainingError

    try:
        summary = trainer.run(p, data=fake_data.module)
    except TrainingError as exc:
        torch.save({"error": str(exc)}, f"{out}.{rank}")
        torch.distributed.destroy_process_group()
        return
    torch.save({"skipped": summary["skipped_steps"], "step": summary["step"], "interrupted": summary["interrupted"],
                "weights": {k: v.clone() for k, v in summary["model"].state_dict().items()}}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def run_two_forked_ranks(tmp_path, mode: str) -> list[dict]:
    """:func:`main` on 2 forked gloo ranks (no torch import to wait for); what each rank saved."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "w.pt")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=main, args=(rank, port, out, str(tmp_path / "logs"), mode)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    codes = [proc.exitcode for proc in procs]
    for proc in procs:  # a rank left waiting in a collective must not outlive the test
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert codes == [0, 0], codes
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]
