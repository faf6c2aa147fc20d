"""Without a terminal, training prints a progress line with an ETA at least every ~30 s (a fake clock here)."""

import re

from pyprotoclip import progress as progress_module
from pyprotoclip.progress import ProgressClock, eta_seconds, format_duration


def test_progress_clock_is_due_every_30_seconds_since_the_last_line():
    t = [100.0]
    clock = ProgressClock(clock=lambda: t[0])
    t[0] = 129.9
    assert not clock.due()
    t[0] = 130.0
    assert clock.due()
    clock.mark()  # a line was written at 130
    t[0] = 159.0
    assert not clock.due()
    t[0] = 160.5
    assert clock.due()
    assert not ProgressClock(every_s=0, clock=lambda: t[0]).due()  # 0: never


def test_eta_and_durations():
    assert eta_seconds(1.5, step=10, last_step=50) == 60.0 and eta_seconds(1.5, step=60, last_step=50) == 0.0
    assert [format_duration(s) for s in (42.4, 725, 3720, 0)] == ["42s", "12m05s", "1h02m", "0s"]


def test_training_without_a_terminal_logs_progress_lines_on_the_time_trigger(fake_train, monkeypatch, tmp_path):
    t = [0.0]

    def fake_now():  # every reading of the clock is 10 s later than the one before
        t[0] += 10.0
        return t[0]

    monkeypatch.setattr(progress_module, "_now", fake_now)
    fake_train(train_num_samples=64, batch_size=8, log_every_n_steps=1000)  # 8 steps, one step-count line (the last)
    lines = open(tmp_path / "logs" / "run" / "out.log").read().splitlines()
    progress = [ln.split("| INFO | ", 1)[1] for ln in lines if "Progress:" in ln]
    # clock readings: start 10; steps 1, 2, 3 ask at 20, 30, 40 -> due at step 3 (30 s), line marked at 50;
    # steps 4, 5, 6 ask at 60, 70, 80 -> due at step 6; step 8 is the epoch's end (a Train Epoch line)
    assert [re.search(r"step (\d+)/8", ln).group(1) for ln in progress] == ["3", "6"], progress
    assert all(re.search(r"\| ETA \d+s$", ln) for ln in progress), progress
    train = [ln for ln in lines if "Train Epoch:" in ln]
    assert len(train) == 1 and re.search(r"\| ETA 0s$", train[0]), train
