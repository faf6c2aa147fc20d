import pytest
from click.testing import CliRunner

from pyprotoclip.cli import main


@pytest.fixture
def captured(monkeypatch):
    """Replace the trainer so CLI tests only check flag handling."""
    from pyprotoclip.train import params as P
    from pyprotoclip.train import trainer

    seen = {}

    def fake_run(p, **kw):
        P.validate(p)
        seen.update(p)
        return {}

    monkeypatch.setattr(trainer, "run", fake_run)
    return seen


def invoke(*args):
    return CliRunner().invoke(main, ["train", *args])


def test_help_lists_open_clip_flags():
    r = invoke("--help")
    assert r.exit_code == 0
    for flag in ("--train-data", "--val-data", "--train-num-samples", "--dataset-resampled", "--workers", "--batch-size",
                 "--epochs", "--lr", "--wd", "--warmup", "--lr-scheduler", "--grad-clip-norm", "--accum-freq",
                 "--precision", "--grad-checkpointing", "--model", "--pretrained", "--logs", "--name", "--report-to",
                 "--save-frequency", "--save-most-recent", "--resume", "--seed", "--zeroshot-frequency", "--method",
                 "--config"):
        assert flag in r.output, flag


def test_open_clip_defaults(captured):
    r = invoke("--train-data", "d/{0..1}.tar")
    assert r.exit_code == 0, r.output
    assert captured["batch_size"] == 64 and captured["epochs"] == 32 and captured["wd"] == 0.2
    assert captured["warmup"] == 10000 and captured["lr_scheduler"] == "cosine" and captured["precision"] == "amp"
    assert captured["model"] == "RN50" and captured["workers"] == 4 and captured["accum_freq"] == 1


def test_config_yaml_and_command_line_precedence(captured, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train-data: a/{0..3}.tar\nbatch_size: 32\nlr: 1.0e-3\nmodel: tiny-vit\nsave-most-recent: true\n")
    r = invoke("--config", str(cfg), "--batch-size", "16", "--logs-dir", "elsewhere")
    assert r.exit_code == 0, r.output
    assert captured["train_data"] == "a/{0..3}.tar" and captured["batch_size"] == 16
    assert captured["lr"] == 1e-3 and captured["model"] == "tiny-vit" and captured["save_most_recent"] is True
    assert captured["logs"] == "elsewhere"  # --logs-dir: the spelling torchrun lets through


@pytest.mark.parametrize(
    "args,config,message",
    [
        (["--train-data", "x", "--method", "nosuch"], None, "Invalid value for '--method'"),
        (["--train-data", "x", "--cylambda1", "0.3"], None, "cylambda1: CLIP has no cyclic terms"),
        (["--train-data", "x", "--inmodal"], None, "inmodal: the augmented-view term belongs to --method cyclip"),
        ([], "train-data: x\nmethod: nosuch\n", "method: expected one of"),
        ([], None, "train-data: required"),
        (["--train-data", "x", "--batch-size", "0"], None, "batch-size: expected a positive integer"),
        (["--train-data", "x", "--precision", "fp8"], None, "Invalid value for '--precision'"),
        (["--train-data", "x", "--report-to", "wandb"], None, "report-to"),
        (["--train-data", "x", "--pretrained", "/no/such.pt"], None, "does not exist"),
        (["--config", "/no/such.yaml"], None, "does not exist"),
        ([], "train-data: x\nbogus-key: 3\n", "config: unknown key 'bogus-key'"),
        ([], "train-data: x\nbatch-size: many\n", "batch-size: expected int"),
        ([], "train-data: x\nlr: a: b\n", "is not valid YAML at line 2, column 6: mapping values are not allowed here"),
        (["--train-data", "x", "--bogus"], None, "No such option"),
    ],
)
def test_bad_flags_give_clear_errors(captured, tmp_path, args, config, message):
    if config is not None:
        path = tmp_path / "c.yaml"
        path.write_text(config)
        args = [*args, "--config", str(path)]
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output


def test_config_that_is_not_yaml_is_one_line_error(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train-data: [x, y\n")
    r = invoke("--config", str(cfg))
    assert r.exit_code == 2, r.output
    assert "is not valid YAML at line 2, column 1" in r.output and "Traceback" not in r.output


def test_load_checkpoint_rejects_files_that_are_not_checkpoints(tmp_path):
    import torch

    from pyprotoclip.checkpoint import load_checkpoint, save_checkpoint

    good = tmp_path / "good.pt"
    save_checkpoint({"step": 3, "w": torch.ones(2)}, str(good))
    assert load_checkpoint(str(good))["step"] == 3
    text = tmp_path / "caps.tsv"
    text.write_text("filepath\ttitle\na.png\ta cat\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, why in ((text, "Unsupported operand"), (empty, "empty or truncated"), (trunc, "zip archive")):
        with pytest.raises(ValueError, match="is not a torch checkpoint readable with weights_only=True") as info:
            load_checkpoint(str(path))
        assert why in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_max_bad_fraction_of_one_or_more_means_no_limit():
    # the one rule train's loader, its bad-data monitor and ood train's loader share
    from pyprotoclip.train.params import bad_fraction_limit

    assert bad_fraction_limit(1) is None and bad_fraction_limit(1.0) is None and bad_fraction_limit(None) is None
    assert bad_fraction_limit(0.1) == 0.1 and bad_fraction_limit(0) == 0.0
