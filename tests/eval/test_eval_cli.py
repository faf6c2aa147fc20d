import json
import os
import re
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
    # a state dict whose shapes match no built-in config (one tensor widened): a one-line error naming --model
    state = torch.load(path, weights_only=True)["state_dict"]
    plain = tmp_path / "plain.pt"
    torch.save({**state, "logit_scale": torch.zeros(2)}, plain)
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(plain), "--data", "fake", "--workers", "0"])
    assert r.exit_code == 2 and "match no built-in config" in r.output and "pass --model NAME" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()[-1]) > 40
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


def test_eval_without_labels_reports_retrieval_and_says_what_was_skipped(tmp_path, monkeypatch, fake_pdata):
    import pyprotoclip.data as pdata

    def unlabelled(cfg, **kw):
        for batch in fake_data.build_loader(cfg, **kw):
            yield {**batch, "label": torch.full_like(batch["label"], -1)}

    monkeypatch.setattr(pdata, "build_loader", unlabelled)

    def no_files(spec):
        raise FileNotFoundError("not found")

    monkeypatch.setattr(pdata, "read_zeroshot_files", no_files)
    path, _ = _checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(path), "--data", "fake", "--workers", "0", "--batch-size", "16"])
    assert r.exit_code == 0, r.output
    assert "image->text R@1" in r.output and "zero-shot top-1" not in r.output and "linear probe top-1" not in r.output
    skipped = [line for line in r.output.splitlines() if line.startswith("skipped:")]
    assert skipped == ["skipped: zero-shot and linear probe (no sample has a class label); zero-shot also needs class names"]
    ev = json.loads(open(tmp_path / "run" / "results.jsonl").read().splitlines()[-1])
    assert "zeroshot_top1" not in ev and "linear_probe_top1" not in ev and 0 <= ev["mean_recall"] <= 1
    assert ev["skipped"] == ["zero-shot and linear probe (no sample has a class label); zero-shot also needs class names"]
    assert (tmp_path / "run" / "eval-epoch_1.png").stat().st_size > 1000


def test_eval_without_classnames_skips_zero_shot_only(tmp_path, monkeypatch, fake_pdata):
    import pyprotoclip.data as pdata

    def no_files(spec):
        raise FileNotFoundError("not found")

    monkeypatch.setattr(pdata, "read_zeroshot_files", no_files)
    path, _ = _checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(path), "--data", "fake", "--workers", "0", "--batch-size", "16",
                                  "--no-plot"])
    assert r.exit_code == 0, r.output
    assert "linear probe top-1" in r.output and "zero-shot top-1" not in r.output
    assert ("skipped: zero-shot (no classnames.txt / templates.txt beside the shards; pass --classnames and --templates)"
            in r.output.splitlines())


def test_eval_names_the_probe_protocol_and_the_distinct_captions(tmp_path, fake_pdata):
    path, _ = _checkpoint(tmp_path)
    args = ["eval", "--checkpoint", str(path), "--data", "fake", "--workers", "0", "--batch-size", "16", "--no-plot"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "linear probe: 50/50 split of the evaluation data, C=1 (32 training, 32 test samples)" in r.output
    # the fake data's captions are "class 0" .. "class 3": 4 distinct texts among 64
    assert "retrieval: 4 distinct captions among 64" in r.output
    # with a training split (the fake loader yields the same 64 samples for any spec; capped at 40 here)
    r = CliRunner().invoke(main, args + ["--train-data", "faketrain", "--train-num-samples", "40"])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("linear probe:"))
    assert line.startswith("linear probe: train->eval, C=") and "chosen on a 20% held-out part of the training split" in line
    assert "(40 training, 64 test samples)" in line
    ev = json.loads(open(tmp_path / "run" / "results.jsonl").read().splitlines()[-1])
    assert ev["linear_probe_protocol"].startswith("train->eval, C=") and ev["linear_probe_train_data"] == "faketrain"
    assert ev["linear_probe_num_train"] == 40 and ev["linear_probe_num_test"] == 64 and len(ev["linear_probe_c_sweep"]) == 11
    assert ev["retrieval_distinct_captions"] == 4 and ev["retrieval_num_captions"] == 64
    # the alias and an explicit C
    r = CliRunner().invoke(main, args + ["--probe-train-data", "faketrain", "--train-num-samples", "0", "--probe-c", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)  # progress lines, if any, go to stderr
    assert got["linear_probe_protocol"] == "train->eval, C=0.5 (--probe-c)" and got["linear_probe_num_train"] == 64


def test_eval_warns_when_the_probe_training_samples_miss_evaluation_classes(tmp_path, fake_pdata, monkeypatch):
    import pyprotoclip.data as pdata

    def class_sorted(cfg, **kw):  # --train-data as class-sorted shards: batch b holds class b only
        loader = fake_data.build_loader(cfg, **kw)
        if cfg.flag != "train-data":
            return loader

        class Sorted:
            num_samples = loader.num_samples

            def __iter__(self):
                for b, batch in enumerate(loader):
                    yield {**batch, "label": torch.full_like(batch["label"], b % 4)}

        return Sorted()

    monkeypatch.setattr(pdata, "build_loader", class_sorted)
    path, _ = _checkpoint(tmp_path)
    args = ["eval", "--checkpoint", str(path), "--data", "fake", "--workers", "0", "--batch-size", "16", "--no-plot",
            "--train-data", "faketrain", "--probe-c", "1"]
    r = CliRunner().invoke(main, args + ["--train-num-samples", "32"])  # the first two batches: classes 0 and 1
    assert r.exit_code == 0, r.output
    warning = [ln for ln in r.stderr.splitlines() if "have no sample among" in ln]
    assert warning == ["warning: linear probe: 2 class(es) of the evaluation data have no sample among the first 32 samples of "
                       "--train-data (shard order), which hold 2 class(es), so their 32 evaluation sample(s) always count "
                       "as wrong; pass --train-num-samples 0 (all of --train-data) or write the training shards shuffled "
                       "(data from-folder without --keep-order)"]
    ev = json.loads(open(tmp_path / "run" / "results.jsonl").read().splitlines()[-1])
    assert ev["linear_probe_train_classes"] == 2 and ev["linear_probe_missing_classes"] == 2
    assert ev["linear_probe_top1"] <= 0.5  # the missing classes' half of the evaluation data is always wrong
    # every class among the training samples: no warning, the count still recorded
    r = CliRunner().invoke(main, args + ["--train-num-samples", "0"])
    assert r.exit_code == 0, r.output
    assert "have no sample among" not in r.stderr
    ev = json.loads(open(tmp_path / "run" / "results.jsonl").read().splitlines()[-1])
    assert ev["linear_probe_train_classes"] == 4 and ev["linear_probe_missing_classes"] == 0


def test_eval_help_names_the_probe_flags():
    from pyprotoclip.eval import cli as eval_cli
    from pyprotoclip.eval import evaluate as ev

    r = CliRunner().invoke(main, ["eval", "--help"])
    assert r.exit_code == 0
    for flag in ("--train-data", "--probe-train-data", "--train-num-samples", "--probe-c"):
        assert flag in r.output
    assert eval_cli.DEFAULT_PROBE_TRAIN_SAMPLES == ev.DEFAULT_PROBE_TRAIN_SAMPLES


def test_eval_open_clip_checkpoints_without_model(tmp_path, fake_pdata):
    """open_clip's own files carry no architecture name: the built-in config is read off the shapes."""
    path, model = _checkpoint(tmp_path)
    state = model.state_dict()
    plain, oc_train = tmp_path / "oc" / "plain.pt", tmp_path / "oc" / "epoch_3.pt"
    plain.parent.mkdir()
    torch.save(state, plain)  # torch.save(model.state_dict())
    # open_clip's training checkpoint: epoch, run name, DDP-prefixed state_dict, optimizer
    torch.save({"epoch": 3, "name": "oc-run", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, oc_train)
    for ckpt in (plain, oc_train):
        r = CliRunner().invoke(main, ["eval", "--checkpoint", str(ckpt), "--data", "fake", "--workers", "0", "--batch-size", "32",
                                      "--no-plot", "--json"])
        assert r.exit_code == 0, r.output
        got = json.loads(r.stdout)  # progress lines, if any, go to stderr
        assert got["ckpt_model"] == "tiny-rn" and got["ckpt_model_inferred"] is True
        assert "zeroshot_top1" in got
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(plain), "--data", "fake", "--workers", "0", "--batch-size", "32",
                                  "--no-plot"])
    assert r.exit_code == 0 and "(tiny-rn, inferred from the state dict's shapes, step None)" in r.output


def test_feature_extraction_progress_lines_every_30_s(monkeypatch, tmp_path, fake_pdata):
    from pyprotoclip.eval.evaluate import _feature_progress
    from pyprotoclip import progress as progress_module

    t = [0.0]
    monkeypatch.setattr(progress_module, "_now", lambda: t[0])
    lines = []
    report = _feature_progress(lines.append, "data", 100)
    for n, now in ((10, 10.0), (20, 29.0), (30, 31.0), (40, 45.0), (50, 62.0)):
        t[0] = now
        report(n)
    assert [ln.split(" samples,")[0] for ln in lines] == ["data: image and text features of 30/100",
                                                          "data: image and text features of 50/100"]
    assert all(re.search(r"samples/s, ETA \d+s$", ln) for ln in lines), lines
    assert _feature_progress(None, "data", 100) is None
    # through the command: a clock that jumps 31 s a reading prints to stderr, never into --json's stdout
    monkeypatch.setattr(progress_module, "_now", lambda: t.__setitem__(0, t[0] + 31.0) or t[0])
    path, _ = _checkpoint(tmp_path)
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(path), "--data", "fake", "--workers", "0", "--batch-size", "32",
                                  "--no-plot", "--json"])
    assert r.exit_code == 0, r.output
    assert "data: image and text features of 32/64 samples" in r.stderr and "features" not in r.stdout.split("{", 1)[0]
    json.loads(r.stdout)


def test_eval_probe_matches_training_labels_to_the_evaluation_classnames_by_name(tmp_path, fake_pdata, monkeypatch):
    # --train-data has a class the evaluation data lacks ("blue"), so from-folder numbered its classes differently:
    # the evaluation data's c0..c3 are labels 1..4 there
    import pyprotoclip.data as pdata

    state = {"names": ["blue", "c0", "c1", "c2", "c3"], "shift": 1}

    def names(spec):
        if spec != "faketrain":
            return fake_data.read_zeroshot_files(spec)
        if state["names"] is None:
            raise FileNotFoundError("no classnames.txt")
        return list(state["names"]), ["a photo of {}."]

    def shifted(cfg, **kw):
        loader = fake_data.build_loader(cfg, **kw)
        if cfg.flag != "train-data":
            return loader

        class Shifted:
            num_samples = loader.num_samples

            def __iter__(self):
                for batch in loader:
                    yield {**batch, "label": batch["label"] + state["shift"]}

        return Shifted()

    monkeypatch.setattr(pdata, "read_zeroshot_files", names)
    monkeypatch.setattr(pdata, "build_loader", shifted)
    path, _ = _checkpoint(tmp_path)
    args = ["eval", "--checkpoint", str(path), "--data", "fake", "--workers", "0", "--batch-size", "16", "--no-plot",
            "--train-data", "faketrain", "--train-num-samples", "0", "--probe-c", "1"]

    def last() -> dict:
        return json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[-1])

    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    matched = last()
    line = next(ln for ln in r.output.splitlines() if ln.startswith("linear probe:"))
    assert "training labels matched to the evaluation data's by class name" in line
    assert matched["linear_probe_labels"].startswith("matched by name:") and "(--train-data)" in matched["linear_probe_labels"]
    # the same numbering on both sides: unchanged, and the same score as the matched run
    state.update(names=["c0", "c1", "c2", "c3"], shift=0)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    same = last()
    assert "linear_probe_labels" not in same and "by class name" not in r.output
    assert matched["linear_probe_top1"] == same["linear_probe_top1"] > 0.5
    assert matched["linear_probe_missing_classes"] == 0
    # no name in common, or names on one side only while the labels run past them: a one-line error
    for names_, shift, want in ((["x", "y", "z", "v", "w"], 1, "no class name of"),
                                (None, 1, "has 4 class names but the other set")):
        state.update(names=names_, shift=shift)
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 1, r.output
        out = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(out) == 1 and out[0].startswith("Error: train-data:") and want in out[0], r.output
        assert "--train-data" in out[0] and out[0].count("classnames.txt") >= 2, out[0]


def test_probe_label_map_by_name_and_the_classnames_file_found(tmp_path):
    from pyprotoclip.data.pipeline import BadDataError
    from pyprotoclip.eval.evaluate import _classnames_path, probe_label_map

    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "00000.tar").write_bytes(b"")
    (tmp_path / "val" / "classnames.txt").write_text("green\nred\n")
    assert _classnames_path(str(tmp_path / "val" / "00000.tar")) == str(tmp_path / "val" / "classnames.txt")
    assert _classnames_path(str(tmp_path / "nope" / "00000.tar")) is None
    lab = torch.tensor([0, 1, 2])
    kw = {"train_file": "train/classnames.txt", "eval_file": "val/classnames.txt"}
    # the training set's extra class gets an index past the evaluation names; '_' vs space and case are ignored
    assert probe_label_map(["blue", "Green", "red"], ["green", "red"], lab, torch.tensor([0, 1]), **kw) == [2, 0, 1]
    assert probe_label_map(["sky_blue", "red"], ["red", "sky blue"], torch.tensor([0, 1]), torch.tensor([0, 1]), **kw) == [1, 0]
    assert probe_label_map(["a", "b", "c"], ["a", "b", "c"], lab, lab, **kw) is None  # same names, same order: unchanged
    assert probe_label_map(None, None, lab, lab, **kw) is None
    assert probe_label_map(None, ["a", "b", "c"], lab, lab, **kw) is None  # labels within the names: unchanged
    with pytest.raises(BadDataError, match="has 2 class names but the other set"):
        probe_label_map(["a", "b"], None, torch.tensor([0, 1]), lab, **kw)
    with pytest.raises(BadDataError, match="no class name of train/classnames.txt .--train-data. is in val/classnames.txt"):
        probe_label_map(["x", "y"], ["a", "b"], torch.tensor([0, 1]), torch.tensor([0, 1]), **kw)
