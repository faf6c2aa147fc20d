"""Faults a long run meets: preemption signals, a failed start, an unwritable directory, files that are not
checkpoints, a crafted pickle."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pyprotoclip.data import write_synthetic_dataset

    out = tmp_path_factory.mktemp("fault-data")
    return write_synthetic_dataset(str(out), 64, num_val=0, num_ood=0, samples_per_shard=64, progress=False, processes=1)


def _sigint_default() -> None:
    """In the child before exec: SIGINT as in a terminal, whatever launched the tests (a background job starts with
    SIGINT ignored, and a process started so keeps ignoring it, by design)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_preemption_signal_saves_a_resumable_checkpoint_and_exits_0(shards, tmp_path, sig):
    cmd = [sys.executable, "-m", "pyprotoclip", "train", "--train-data", shards["train_shards"], "--model", "tiny-vit",
           "--batch-size", "8", "--epochs", "100", "--workers", "0", "--warmup", "1", "--precision", "fp32",
           "--log-every-n-steps", "1", "--logs", str(tmp_path), "--name", "run", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_sigint_default,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    deadline = time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if "Train Epoch" in line:
            proc.send_signal(getattr(signal, sig))
            break
        assert time.time() < deadline, "".join(lines[-20:])
    out = "".join(lines) + proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"{sig} received" in out and "--resume latest" in out
    if sig == "SIGINT":
        assert "press Ctrl-C again to abort without saving" in out and "Aborted!" not in out
    from pyprotoclip.checkpoint import load_checkpoint

    state = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "epoch_latest.pt"))
    assert 1 <= state["step"] < 800


def test_a_second_sigint_aborts_at_once_without_saving(caplog):
    from pyprotoclip.train.policy import Preemption

    # as in a terminal, whatever launched the tests (a background job starts with SIGINT ignored, which stays so)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    pre = Preemption().install()
    try:
        assert signal.getsignal(signal.SIGINT) == pre._record
        pre._record(signal.SIGINT, None)
        assert pre.requested() and pre.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            pre._record(signal.SIGINT, None)
    finally:
        pre.uninstall()
        restored = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, previous)
    assert restored is signal.default_int_handler
    assert "press Ctrl-C again" in caplog.text and "nothing more was saved" in caplog.text


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same step (one all-reduce over a gloo group) and
    rank 0 writes a resumable checkpoint of that step."""
    from _two_ranks import run_two_forked_ranks

    from pyprotoclip.checkpoint import load_checkpoint

    w0, w1 = run_two_forked_ranks(tmp_path, "sigterm")
    assert w0["interrupted"] and w1["interrupted"] and w0["step"] == w1["step"] == 2
    assert load_checkpoint(str(tmp_path / "logs" / "ddp" / "checkpoints" / "epoch_latest.pt"))["step"] == 2
    assert "a signal to another process received" in open(tmp_path / "logs" / "ddp" / "out.log").read()


def test_a_failed_start_leaves_a_reusable_run_directory(tmp_path, fake_train):
    with pytest.raises(ValueError, match="pretrained"):
        fake_train(name="again", pretrained=str(tmp_path / "missing.pt"))
    # a start that failed after the directory was made (a bad model name here) leaves only its log
    with pytest.raises(ValueError, match="model"):
        fake_train(name="again", model="no-such-model")
    assert os.path.isfile(tmp_path / "logs" / "again" / "out.log")
    s = fake_train(name="again")  # the corrected command with the same --name runs
    assert s["step"] == 2
    with pytest.raises(ValueError, match="already holds a run"):
        fake_train(name="again")


def test_an_unwritable_logs_directory_is_a_one_line_error(tmp_path, fake_train):
    if os.geteuid() == 0:
        target = "/proc/no-such-dir"  # root ignores permission bits: use a place nobody can create files in
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro)
    with pytest.raises(ValueError, match="logs: cannot write the run directory"):
        fake_train(logs=target)


class _Marker:
    """Unpickling this would create a file: a stand-in for code a crafted checkpoint runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    from pyprotoclip.checkpoint import load_checkpoint

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}, "payload": _Marker(str(marker))}, bad)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Marker(str(marker))))
    for path in (bad, raw):
        with pytest.raises(ValueError, match="is not a torch checkpoint readable with weights_only=True") as info:
            load_checkpoint(str(path))
        assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("content,looks", [("filepath\ttitle\n", "a text file starting"), ("", "an empty file"),
                                           ("# x\n", "a text file starting")])
def test_text_given_as_a_checkpoint_says_what_it_looks_like(tmp_path, content, looks):
    from pyprotoclip.checkpoint import load_checkpoint
    from pyprotoclip.models.factory import _load_state_dict_file

    path = tmp_path / "not-a-checkpoint.pt"
    path.write_text(content)
    for load, prefix in ((load_checkpoint, "checkpoint:"), (_load_state_dict_file, "pretrained:")):
        with pytest.raises(ValueError) as info:
            load(str(path))
        msg = str(info.value)
        assert msg.startswith(prefix) and looks in msg and "\n" not in msg and "Traceback" not in msg, msg


def test_resume_into_a_different_run_is_a_one_line_error(fake_train):
    fake_train(epochs=2, stop_after_steps=1, save_every_n_steps=1)
    with pytest.raises(ValueError, match=r"resume: .* was written with 2 steps per epoch, this run has 4; keep --batch-size"):
        fake_train(epochs=2, batch_size=4, resume="latest")
    with pytest.raises(ValueError, match="resume: .* was trained with --method clip, this run has --method cyclip"):
        fake_train(epochs=2, method="cyclip", resume="latest")
