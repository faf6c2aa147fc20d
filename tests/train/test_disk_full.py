"""A disk that fills up while a checkpoint is written: the previous checkpoint stays as it was, no temp file
is left, and the run stops with a one-line error naming the file, why, and the checkpoint that is intact."""

from __future__ import annotations

import os

import pytest

from pyprotoclip.checkpoint import load_checkpoint
from pyprotoclip.train.faults import TrainingError
from tests.utils import DiskFull


@pytest.fixture
def disk_fills_up(monkeypatch):
    """disk_fills_up(after=N): N checkpoint files are written, then the disk is full (ENOSPC from the file's
    write after 1000 bytes, under torch's own writer, as on a real disk); returns the DiskFull (``opened``)."""
    return lambda after: DiskFull(after).install(monkeypatch)


def _snapshot(ckpt_dir):
    return {n: open(os.path.join(ckpt_dir, n), "rb").read() for n in sorted(os.listdir(ckpt_dir))}


def test_disk_full_keeps_the_previous_checkpoint_and_stops_with_one_line(fake_train, disk_fills_up, tmp_path,
                                                                         monkeypatch):
    from pyprotoclip.train import trainer

    ckpt_dir = tmp_path / "logs" / "run" / "checkpoints"
    disk = disk_fills_up(after=2)  # epoch 1 writes epoch_1.pt and epoch_latest.pt; epoch 2's first write fails
    seen = {}
    evaluate = trainer.evaluate

    def remember(r, epochs_done):  # after epoch 1's save: the files as they were before epoch 2's
        seen.update(_snapshot(ckpt_dir))
        return evaluate(r, epochs_done)

    monkeypatch.setattr(trainer, "evaluate", remember)
    with pytest.raises(TrainingError) as info:
        fake_train(epochs=2, save_most_recent=True)
    assert disk.opened == 3
    msg = str(info.value)
    assert set(seen) == {"epoch_1.pt", "epoch_latest.pt"}
    assert _snapshot(ckpt_dir) == seen  # bitwise the same files, and nothing else (no temp file)
    assert load_checkpoint(str(ckpt_dir / "epoch_latest.pt"))["step"] == 2
    assert "\n" not in msg
    assert msg.startswith(f"could not write checkpoint {ckpt_dir / 'epoch_2.pt'}: No space left on device"), msg
    assert f"the previous checkpoint {ckpt_dir / 'epoch_latest.pt'} (step 2) is intact" in msg and "--resume latest" in msg


def test_disk_full_on_the_first_checkpoint_says_none_exists(fake_train, disk_fills_up, tmp_path):
    disk_fills_up(after=0)
    with pytest.raises(TrainingError, match=r"epoch_1\.pt: No space left on device \(no earlier checkpoint exists\)"):
        fake_train()
    assert os.listdir(tmp_path / "logs" / "run" / "checkpoints") == []


def test_the_cli_prints_the_error_on_one_line_and_exits_1(disk_fills_up, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import fake_data

    from pyprotoclip.train import cli, trainer

    real = trainer.run
    monkeypatch.setattr(trainer, "run", lambda p, **k: real(p, data=fake_data.module))
    disk_fills_up(after=0)
    res = CliRunner().invoke(cli.train, ["--train-data", "fake", "--model", "tiny-vit", "--batch-size", "8",
                                         "--epochs", "1", "--workers", "0", "--precision", "fp32", "--warmup", "1",
                                         "--train-num-samples", "16", "--logs", str(tmp_path), "--name", "run"])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "could not write checkpoint" in errors[0] and "Usage:" not in res.output, res.output



@pytest.mark.slow
def test_disk_full_on_rank_0_stops_every_rank_with_the_same_line(tmp_path):
    """Only rank 0 writes checkpoints: its failure reaches rank 1, which would otherwise wait in the next step's
    collectives, and both end with the same one-line error."""
    from _two_ranks import run_two_forked_ranks

    r0, r1 = run_two_forked_ranks(tmp_path, "enospc")
    assert r0["error"] == r1["error"] and r0["error"].startswith("could not write checkpoint "), r0
    assert "epoch_latest.pt: No space left on device (no earlier checkpoint exists)" in r0["error"]
