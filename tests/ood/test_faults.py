"""`ood train` under faults: a non-finite step is skipped exactly (weights, SGD momentum, BatchNorm statistics
and PALM's prototypes as they were), --max-nonfinite in a row stop the run, and a disk that fills up during
a checkpoint write keeps the previous checkpoint and stops with a one-line error."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from pyprotoclip.ood import train as T
from pyprotoclip.train.faults import TrainingError
from tests.utils import DiskFull


class _NaNFeatures(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, x):
        return self.inner(x) * float("nan")


def _state(r):
    protos = r.loss_fn.prototypes.clone() if r.loss_fn is not None else None
    return copy.deepcopy(r.net.state_dict()), copy.deepcopy(r.optimizer.state_dict()), protos


@pytest.fixture
def poison(monkeypatch):
    """poison(steps): the `ood train` steps numbered in ``steps`` (0-based) see NaN network outputs;
    returns the list of (state before, state after, skipped) of every step."""
    real = T._Run.train_step
    calls = []

    def install(steps):
        def step(self, batch):
            before = _state(self)
            model = self.model
            if len(calls) in steps:
                self.model = _NaNFeatures(model)
            try:
                terms, skipped = real(self, batch)
            finally:
                self.model = model
            calls.append((before, _state(self), skipped))
            return terms, skipped

        monkeypatch.setattr(T._Run, "train_step", step)
        return calls

    return install


def _assert_same(a, b):
    (wa, oa, pa), (wb, ob, pb) = a, b
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]) if isinstance(v, torch.Tensor) else v == ob["state"][i][k]
    assert (pa is None and pb is None) or torch.equal(pa, pb)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["palm", "ce"])
def test_a_non_finite_step_is_skipped_exactly(train_params, poison, loss):
    calls = poison({1})
    s = T.run(train_params(loss=loss, epochs=3))  # one step per epoch
    assert s["step"] == 3 and s["skipped_steps"] == 1
    assert [c[2] for c in calls] == [None, "loss", None]
    _assert_same(calls[1][0], calls[1][1])
    # the test can fail: an applied step changes the weights (and the prototypes)
    (w0, _, p0), (w1, _, p1), _ = calls[2]
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if w0[k].is_floating_point())
    assert loss == "ce" or not torch.equal(p0, p1)
    rows = [r for r in map(json.loads, open(os.path.join(s["run_dir"], "results.jsonl"))) if r["type"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1] and rows[1]["loss"] is None
    assert "step 2: non-finite loss" in open(os.path.join(s["run_dir"], "out.log")).read()


@pytest.mark.slow
def test_max_nonfinite_in_a_row_stop_ood_training(train_params, poison):
    poison(set(range(10)))
    with pytest.raises(TrainingError, match=r"2 steps in a row .*--max-nonfinite 2\)") as info:
        T.run(train_params(epochs=5, max_nonfinite=2))
    assert "\n" not in str(info.value)


def test_max_nonfinite_must_not_be_negative(train_params):
    with pytest.raises(ValueError, match="max-nonfinite"):
        T.run(train_params(max_nonfinite=-1))


@pytest.mark.slow
def test_disk_full_keeps_the_previous_ood_checkpoint(train_params, monkeypatch, tmp_path):
    before = {}
    ckpt_dir = tmp_path / "logs" / "run" / "checkpoints"

    def remember():  # as the first epoch wrote it
        before["latest"] = (ckpt_dir / "epoch_latest.pt").read_bytes()

    DiskFull(after=1, before_failing=remember).install(monkeypatch)
    with pytest.raises(TrainingError) as info:
        T.run(train_params(epochs=3, save_frequency=0, save_most_recent=True))  # epoch_latest.pt after every epoch
    latest = ckpt_dir / "epoch_latest.pt"
    assert os.listdir(ckpt_dir) == ["epoch_latest.pt"]  # no temp file
    assert latest.read_bytes() == before["latest"]  # bitwise as it was
    assert torch.load(latest, weights_only=True)["step"] == 1
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"could not write checkpoint {latest}: No space left on device"), msg
    assert f"the previous checkpoint {latest} (step 1) is intact" in msg


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_saves_a_resumable_checkpoint_and_exits_0(ood_data, tmp_path, sig):
    """As `train`: SIGTERM / SIGUSR1 / a first Ctrl-C finish the step, write epoch_latest.pt and exit 0."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "pyprotoclip", "ood", "train", "--train-data", ood_data["train"], "--backbone", "tiny-rn",
           "--batch-size", "8", "--epochs", "100", "--workers", "0", "--precision", "fp32", "--k", "2",
           "--cache-size", "2", "--log-every-n-steps", "1", "--logs", str(tmp_path), "--name", "run", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, deadline = [], time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if "Train Epoch" in line:
            proc.send_signal(getattr(signal, sig))
            break
        assert time.time() < deadline, "".join(lines[-20:])
    out = "".join(lines) + proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"{sig} received" in out and "--resume latest" in out
    from pyprotoclip.checkpoint import load_checkpoint

    state = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "epoch_latest.pt"))
    assert 1 <= state["step"] < 1200
