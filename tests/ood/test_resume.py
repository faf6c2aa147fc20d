"""`ood train` resumes as `train` does: results.jsonl loses the rows after the checkpoint (they are written
again), stale temp files of a killed writer go, rank 0 alone chooses the checkpoint, and a non-finite streak
goes on counting after a resume."""

from __future__ import annotations

import json
import os

import pytest

from pyprotoclip import checkpoint as ckpt
from pyprotoclip import distributed as pdist
from pyprotoclip.ood import train as T
from pyprotoclip.train.faults import TrainingError


def _train_steps(run_dir):
    return [r["step"] for r in map(json.loads, open(os.path.join(run_dir, "results.jsonl"))) if r["type"] == "train"]


def test_resume_removes_the_rows_written_after_its_checkpoint_and_stale_temp_files(train_params):
    common = dict(epochs=2, train_num_samples=24, save_frequency=1)  # 3 steps per epoch; epoch_1.pt at step 3
    s = T.run(train_params(name="cut", stop_after_steps=4, **common))  # epoch_latest.pt at step 4
    ckpt_dir = os.path.join(s["run_dir"], "checkpoints")
    os.remove(os.path.join(ckpt_dir, "epoch_latest.pt"))  # as if killed before it was written
    stale = os.path.join(ckpt_dir, ".epoch_latest.pt.tmp999999999")  # a writer that died mid-save
    open(stale, "wb").write(b"partial")
    with open(os.path.join(s["run_dir"], "results.jsonl"), "a") as f:
        f.write('{"type": "train", "step": 5, "lo')  # cut short by the kill
    resumed = T.run(train_params(name="cut", resume="latest", **common))
    assert resumed["step"] == 6
    assert _train_steps(s["run_dir"]) == [1, 2, 3, 4, 5, 6]  # step 4 once, the cut line gone
    assert not os.path.exists(stale)
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert f"removed {stale}, left by a checkpoint write that did not finish" in log
    assert "results.jsonl: removed 3 row(s) written after that checkpoint" in log  # step 4, the summary, the cut line


def test_rank_0_alone_chooses_the_checkpoint_and_broadcasts_it(train_params, monkeypatch, tmp_path):
    def no_search(d):
        raise AssertionError("find_latest on a rank other than 0")

    monkeypatch.setattr(ckpt, "find_latest", no_search)
    monkeypatch.setattr(pdist, "broadcast_object", lambda obj: "rank-0-choice.pt")
    monkeypatch.setattr(pdist, "barrier", lambda: None)
    os.makedirs(tmp_path / "logs" / "r" / "checkpoints")
    r = object.__new__(T._Run)  # rank 1 of a run: only the run-directory step
    r.p, r.is_main = train_params(name="r", resume="latest"), False
    r._run_dir()
    assert r.resume_path == "rank-0-choice.pt"


def test_the_count_in_a_row_survives_a_resume(train_params, monkeypatch):
    from tests.ood.test_faults import _NaNFeatures

    real, calls = T._Run.train_step, []

    def step(self, batch):  # calls 1-3 (steps 2-4, over both runs) see NaN network outputs
        model = self.model
        if len(calls) in (1, 2, 3):
            self.model = _NaNFeatures(model)
        try:
            return real(self, batch)
        finally:
            self.model = model
            calls.append(1)

    monkeypatch.setattr(T._Run, "train_step", step)
    T.run(train_params(name="streak", epochs=5, max_nonfinite=3, stop_after_steps=3))  # 2 in a row at its checkpoint
    with pytest.raises(TrainingError, match=r"3 steps in a row .*\(steps 2-4, --max-nonfinite 3\)"):
        T.run(train_params(name="streak", epochs=5, max_nonfinite=3, resume="latest"))
