"""results.jsonl on resume: rows after the checkpoint go only when the checkpoint is this run directory's,
and a cut never falls inside a line."""

import json
import os

from pyprotoclip.train.reporting import Results


def _rows(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "results.jsonl"))]


def test_resume_from_another_run_directory_keeps_this_runs_rows(fake_train):
    a = fake_train(name="a", epochs=2)  # 4 train rows; epoch_1.pt recorded the size of a's results.jsonl at step 2
    b = fake_train(name="b", epochs=1, train_num_samples=24)  # 3 train rows: a longer file than a's at step 2
    before = _rows(b["run_dir"])
    resumed = fake_train(name="b", epochs=2, resume=os.path.join(a["run_dir"], "checkpoints", "epoch_1.pt"))
    assert resumed["step"] == 4
    rows = _rows(b["run_dir"])  # every line whole JSON (a cut inside a line would fail here)
    assert rows[: len(before)] == before
    assert [r["step"] for r in rows[len(before):] if r["type"] == "train"] == [3, 4]
    assert "is another run directory's checkpoint" in open(os.path.join(b["run_dir"], "out.log")).read()


def test_rewind_never_cuts_inside_a_line(tmp_path):
    results = Results(str(tmp_path), True, False)
    for step in (1, 2, 3):
        results.write({"type": "train", "step": step})
    first = len(json.dumps({"type": "train", "step": 1})) + 1
    assert results.rewind(first + 5, 1) == 2  # 5 bytes into row 2: cut at the start of that row
    assert open(results.path).read() == json.dumps({"type": "train", "step": 1}) + "\n"
