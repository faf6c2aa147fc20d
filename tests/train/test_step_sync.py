"""A training step reads one flag back from the device (is the step finite?: it decides whether the update
is applied, as a GradScaler reads its inf flag) and nothing else except on the steps that log; the ops
get the features in the dtype the towers produced."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that copy a tensor's value to the host: .item(), float(t), bool(t), int(t), torch.equal
READS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}


def _in_torch_optim() -> bool:
    # torch's optimizers keep their step counts as host tensors (capturable=False) on every device and
    # read them each step: that costs no device synchronisation, so it is not counted
    return any("torch/optim/" in frame.filename for frame in traceback.extract_stack())


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values while ``counting`` is on; records the dtypes of pyprotoclip ops' inputs."""

    def __init__(self):
        super().__init__()
        self.counting = True
        self.reads: list[str] = []
        self.op_dtypes: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if self.counting and name.split("::")[-1] in READS and not _in_torch_optim():
            self.reads.append(name)
        if name.startswith("pyprotoclip::"):
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 2}
            self.op_dtypes.setdefault(name, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def watched_epoch(monkeypatch):
    """Runs of the trainer where every epoch's host reads are counted, except inside the log-line writer."""
    from pyprotoclip.train import epoch as epoch_mod

    mode = HostReads()
    write, train_one_epoch = epoch_mod._EpochLog.write, epoch_mod.train_one_epoch

    def quiet_write(self, *a, **k):
        mode.counting = False
        try:
            return write(self, *a, **k)
        finally:
            mode.counting = True

    def watched(*a, **k):
        with mode:
            return train_one_epoch(*a, **k)

    monkeypatch.setattr(epoch_mod._EpochLog, "write", quiet_write)
    monkeypatch.setattr("pyprotoclip.train.trainer.train_one_epoch", watched)
    return mode


@pytest.mark.parametrize("accum", [1, 2])
def test_training_steps_read_one_flag_back_from_the_device(fake_train, watched_epoch, accum):
    s = fake_train(epochs=2, accum_freq=accum, batch_size=8 // accum, log_every_n_steps=1000)
    assert s["step"] == 4
    # the budget: one read per optimizer step (not per micro-batch), the non-finite check that decides
    # whether the update is applied (pyprotoclip.train.faults.read_flags); anything more is a regression
    assert watched_epoch.reads == ["aten::_local_scalar_dense"] * 4, f"host reads during training steps: {watched_epoch.reads}"


def test_the_counter_sees_a_host_read(fake_train, watched_epoch, monkeypatch):
    # the test above can fail: a step that prints its loss is caught
    from pyprotoclip.train import step as step_mod

    train_step = step_mod.train_step

    def chatty(*a, **k):
        result = train_step(*a, **k)
        float(result.terms["loss"])
        return result

    monkeypatch.setattr("pyprotoclip.train.epoch.train_step", chatty)
    s = fake_train(log_every_n_steps=1000)
    assert len(watched_epoch.reads) == 2 * s["step"], watched_epoch.reads  # the flag and the print, each step


def test_amp_bf16_hands_the_ops_bf16_features(fake_train, watched_epoch):
    fake_train(precision="amp_bf16")
    dtypes = watched_epoch.op_dtypes["pyprotoclip::symmetric_similarity_cross_entropy"]
    assert dtypes == {torch.bfloat16}, dtypes


@pytest.mark.cuda
def test_cuda_training_steps_do_not_synchronise(fake_train, monkeypatch):
    from pyprotoclip.train import epoch as epoch_mod

    write = epoch_mod._EpochLog.write

    def quiet_write(self, *a, **k):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return write(self, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    step = epoch_mod.train_step

    def strict_step(*a, **k):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    from pyprotoclip.train import faults

    read_flags, flag_reads = faults.read_flags, []

    def allowed_read(*a, **k):  # the step's one synchronisation: the non-finite flag (counted)
        flag_reads.append(1)
        torch.cuda.set_sync_debug_mode("default")
        try:
            return read_flags(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(epoch_mod._EpochLog, "write", quiet_write)
    monkeypatch.setattr(epoch_mod, "train_step", strict_step)
    monkeypatch.setattr(faults, "read_flags", allowed_read)
    s = fake_train(device="cuda", precision="amp_bf16", log_every_n_steps=1000)
    assert s["step"] == 2 and len(flag_reads) == 2
