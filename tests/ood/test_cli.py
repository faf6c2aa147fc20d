"""`pyprotoclip ood score | eval` on an `ood train` checkpoint and on an image-text (CLIP) checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pyprotoclip.checkpoint import save_checkpoint
from pyprotoclip.cli import main


@pytest.fixture(scope="module")
def palm_ckpt(ood_data, tmp_path_factory):
    from pyprotoclip.ood import train as T

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    logs = tmp_path_factory.mktemp("logs")
    try:
        T.run(dict(train_data=ood_data["train"], backbone="tiny-rn", batch_size=8, epochs=1, workers=0, precision="fp32",
                   logs=str(logs), name="palm", train_num_samples=8, cache_size=2, k=2, device="cpu", warmup_epochs=0))
    finally:
        torch.set_num_threads(before)
    return str(logs / "palm" / "checkpoints" / "epoch_1.pt")


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    from pyprotoclip.models import create_model

    model = create_model("tiny-vit", seed=0)[0]
    path = str(tmp_path_factory.mktemp("clip") / "clip.pt")
    save_checkpoint({"state_dict": model.state_dict(), "model": "tiny-vit", "method": "clip", "step": 0}, path)
    return path


def _invoke(args):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    return r


def test_eval_writes_rows_and_a_plot(palm_ckpt, ood_data, tmp_path):
    r = _invoke(["ood", "eval", "--checkpoint", palm_ckpt, "--train-data", ood_data["train"], "--id-data", ood_data["val"],
                 "--ood-data", ood_data["ood"], "--ood-data", ood_data["ood"], "--ood-name", "shapes", "--ood-name", "again",
                 "--score", "mahalanobis", "--score", "knn", "--score", "msp", "--knn-k", "3", "--workers", "0",
                 "--train-num-samples", "48", "--out", str(tmp_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert [(x["score"], x["ood"]) for x in rows] == [(s, o) for s in ("mahalanobis", "knn", "msp")
                                                      for o in ("shapes", "again", "average")]
    for x in rows:
        assert 0 <= x["fpr95"] <= 1 and 0 <= x["auroc"] <= 1 and x["n_id"] == 32 and x["n_train"] == 48
    assert rows[0]["mahalanobis_form"] == "official" and rows[6]["msp_head"] == "fitted logistic regression"
    assert rows[0]["auroc"] == rows[1]["auroc"] == rows[2]["auroc"]  # the same OOD set twice, and their mean
    assert os.path.getsize(tmp_path / "ood-epoch_1.png") > 10_000
    assert "FPR95" in r.output and "mahalanobis" in r.output


def test_score_file_then_eval_of_the_files(palm_ckpt, ood_data, tmp_path):
    outs = {}
    for split in ("val", "ood"):
        out = str(tmp_path / f"{split}.npz")
        r = _invoke(["ood", "score", "--checkpoint", palm_ckpt, "--train-data", ood_data["train"], "--data", ood_data[split],
                     "--score", "knn", "--knn-k", "3", "--knn-backend", "torch", "--workers", "0", "--out", out,
                     "--device", "cpu"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output.strip().splitlines()[-1])["n"] == 32
        outs[split] = out
    with np.load(outs["val"]) as z:
        assert z["scores"].shape == (32,) and z["labels"].min() >= 0 and len(z["keys"]) == 32
    r = _invoke(["ood", "eval", "--id-scores", outs["val"], "--ood-scores", outs["ood"], "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.output)["knn"]["ood"]  # the score name the .npz files store
    assert set(metrics) == {"fpr95", "auroc", "aupr_in", "aupr_out", "detection_error"}
    assert (tmp_path / "ood-val.png").exists()


def _score_npz(path, score, seed):
    np.savez(path, scores=np.random.default_rng(seed).normal(size=16), score=score)
    return str(path)


def test_eval_of_score_files_names_the_stored_score_and_refuses_a_mix(tmp_path):
    id_f, ood_f = _score_npz(tmp_path / "id.npz", "knn", 0), _score_npz(tmp_path / "ood.npz", "knn", 1)
    r = _invoke(["ood", "eval", "--id-scores", id_f, "--ood-scores", ood_f, "--out", str(tmp_path), "--no-plot"])
    assert r.exit_code == 0, r.output
    assert "knn" in r.output and "scores" not in r.output.split("results:")[0]
    assert [json.loads(x)["score"] for x in open(tmp_path / "results.jsonl")] == ["knn"]
    np.save(tmp_path / "plain.npy", np.zeros(4))  # no stored name: the .npz's name stands
    r = _invoke(["ood", "eval", "--id-scores", str(tmp_path / "plain.npy"), "--ood-scores", ood_f, "--out", str(tmp_path),
                 "--no-plot", "--json"])
    assert r.exit_code == 0 and list(json.loads(r.output)) == ["knn"], r.output
    msp = _score_npz(tmp_path / "msp.npz", "msp", 2)
    r = _invoke(["ood", "eval", "--id-scores", id_f, "--ood-scores", msp, "--out", str(tmp_path), "--no-plot"])
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert "--id-scores" in line and "--ood-scores" in line and "'knn'" in line and "'msp'" in line


@pytest.mark.parametrize("name, content", [("model.pt", b"\x80\x02garbage\x00\xff"), ("bad.npz", b"\x80not a zip"),
                                           ("words.txt", b"hello world\n")])
def test_eval_of_a_file_that_is_no_score_file_is_a_one_line_error(tmp_path, name, content):
    bad = tmp_path / name
    bad.write_bytes(content)
    ok = _score_npz(tmp_path / "ood.npz", "knn", 1)
    for flag, args in (("--id-scores", [str(bad), "--ood-scores", ok]), ("--ood-scores", [ok, "--ood-scores", str(bad)])):
        r = _invoke(["ood", "eval", "--id-scores", *args, "--out", str(tmp_path), "--no-plot"])
        assert r.exit_code == 2, r.output
        line = r.output.strip().splitlines()[-1]
        assert line.startswith("Error: ") and flag.lstrip("-") in line and name in line, r.output
        assert "utf-8" not in line and ".npz" in line and ".npy" in line and "text file of numbers" in line


def test_image_text_checkpoint_mahalanobis_and_mcm(clip_ckpt, ood_data, tmp_path):
    r = _invoke(["ood", "eval", "--checkpoint", clip_ckpt, "--train-data", ood_data["train"], "--id-data", ood_data["val"],
                 "--ood-data", ood_data["ood"], "--score", "mahalanobis", "--score", "mcm", "--workers", "0",
                 "--out", str(tmp_path), "--no-plot", "--device", "cpu", "--aupr", "trapezoid"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert [x["score"] for x in rows] == ["mahalanobis", "mcm"] and rows[1]["num_classes"] == 20
    assert rows[0]["ckpt_model"] == "tiny-vit" and rows[0]["aupr"] == "trapezoid"


def test_bad_requests(palm_ckpt, ood_data, tmp_path):
    r = CliRunner().invoke(main, ["ood", "eval", "--checkpoint", palm_ckpt, "--id-data", ood_data["val"], "--ood-data",
                                  ood_data["ood"], "--score", "mcm", "--workers", "0", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "mcm needs an image-text checkpoint" in r.output
    r = CliRunner().invoke(main, ["ood", "eval", "--checkpoint", palm_ckpt, "--id-data", ood_data["val"], "--workers", "0"])
    assert r.exit_code == 2 and "--ood-data" in r.output
    r = CliRunner().invoke(main, ["ood", "eval", "--checkpoint", palm_ckpt, "--id-data", ood_data["val"], "--ood-data",
                                  ood_data["ood"], "--score", "knn", "--workers", "0", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "pass --train-data" in r.output
    r = CliRunner().invoke(main, ["ood", "train", "--train-data", ood_data["train"], "--backbone", "tiny-rn", "--k", "-1"])
    assert r.exit_code == 2 and "k: expected an int >= 0" in r.output
