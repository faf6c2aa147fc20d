"""Run in two forked processes by test_nonfinite.py: 2 gloo ranks on fake_data where only rank 1's loss is NaN
at the second step (its gradients stay finite); every rank saves its weights and skipped-step count."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import fake_data  # noqa: E402


def main(rank: int, port: int, out: str, logs: str) -> None:
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
        if rank == 1 and len(calls) == 2:
            inner = loss_fn

            def nan_loss(outputs, *, step_context):
                terms = dict(inner(outputs, step_context=step_context))
                terms["loss"] = terms["loss"] + float("nan")  # the same gradient, a NaN value
                return terms

            loss_fn = nan_loss
        return real_step(model, loss_fn, batches, optimizer, **kw)

    epoch_mod.train_step = step
    p = P.defaults()
    p.update(train_data="fake", model="tiny-vit", batch_size=8, epochs=1, workers=0, warmup=1, logs=logs, name="ddp",
             precision="fp32", log_every_n_steps=1, train_num_samples=32, lr=1e-3, device="cpu")
    summary = trainer.run(p, data=fake_data.module)
    torch.save({"skipped": summary["skipped_steps"],
                "weights": {k: v.clone() for k, v in summary["model"].state_dict().items()}}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()
