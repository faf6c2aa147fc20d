import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
import fake_data  # noqa: E402

from pyprotoclip.cli import main  # noqa: E402


@pytest.fixture
def fake_pdata(monkeypatch):
    import pyprotoclip.data as pdata

    for name in ("DataConfig", "build_loader", "read_zeroshot_files"):
        monkeypatch.setattr(pdata, name, getattr(fake_data, name), raising=False)


def _checkpoint(tmp_path):
    from pyprotoclip.models import create_model
    from pyprotoclip.checkpoint import save_checkpoint

    model = create_model("tiny-rn", seed=0)[0]
    path = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    save_checkpoint({"state_dict": model.state_dict(), "model": "tiny-rn", "step": 7, "epoch": 1}, str(path))
    # a training curve for the plot
    (tmp_path / "run" / "results.jsonl").write_text(
        "".join(json.dumps({"type": "train", "step": s, "contrastive_loss": 3.0 - s / 10, "scale": 14.0}) + "\n" for s in range(1, 5))
    )
    return path, model


def test_eval_end_to_end_on_fake_data(tmp_path, fake_pdata):
    path, model = _checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(path), "--data", "fake", "--workers", "0", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    for label in ("zero-shot top-1", "linear probe top-1", "image->text R@1", "retrieval mean recall"):
        assert label in r.output
    run = tmp_path / "run"
    assert (run / "eval-epoch_1.png").stat().st_size > 1000
    rows = [json.loads(line) for line in open(run / "results.jsonl")]
    ev = rows[-1]
    assert ev["type"] == "eval" and ev["ckpt_model"] == "tiny-rn" and ev["ckpt_step"] == 7 and ev["num_samples"] == 64
    assert 0 <= ev["zeroshot_top1"] <= ev["zeroshot_top5"] <= 1 and ev["num_classes"] == 4
    # the same numbers by hand from the metric modules
    from pyprotoclip.eval.features import extract_features
    from pyprotoclip.eval.retrieval import retrieval_recall

    loader = fake_data.build_loader(fake_data.DataConfig("fake", 16, drop_last=False), preprocess=None, tokenize=None, is_train=False)
    feats = extract_features(model, loader)
    want = retrieval_recall(feats["image_features"], feats["text_features"])
    assert ev["image_to_text_R@5"] == pytest.approx(want["image_to_text_R@5"])


def test_eval_model_override_and_errors(tmp_path, fake_pdata):
    path, _ = _checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(path), "--data", "fake", "--model", "tiny-vit", "--workers", "0"])
    assert r.exit_code == 2 and "does not match architecture 'tiny-vit'" in r.output
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "nope.pt"), "--data", "fake"])
    assert r.exit_code == 2 and "does not exist" in r.output
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(path, weights_only=True)["state_dict"], plain)
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(plain), "--data", "fake", "--workers", "0"])
    assert r.exit_code == 2 and "pass --model NAME" in r.output
    cls = tmp_path / "c.txt"
    cls.write_text("a\nb\n")
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(path), "--data", "fake", "--classnames", str(cls)])
    assert r.exit_code == 2 and "give both --classnames and --templates" in r.output


def test_eval_on_a_file_that_is_not_a_checkpoint(tmp_path, fake_pdata):
    for name, data in (("caps.tsv", b"filepath\ttitle\n"), ("empty.pt", b"")):
        path = tmp_path / name
        path.write_bytes(data)
        r = CliRunner().invoke(main, ["eval", "--checkpoint", str(path), "--data", "fake", "--workers", "0"])
        assert r.exit_code == 2, r.output
        assert f"checkpoint: '{path}' is not a torch checkpoint" in r.output and "Traceback" not in r.output


def test_eval_help():
    r = CliRunner().invoke(main, ["eval", "--help"])
    assert r.exit_code == 0 and "--checkpoint" in r.output and "--data" in r.output and "--model" in r.output
