"""Every flag of every command, fed bad values: a usage error that names the flag, before any work.

The flags are read from the click commands themselves (``pyprotoclip train`` from ``train/params.py``'s
table), so a flag added later is tested without touching this file. For each one, the bad values of its
type: a wrong type ("abc", "1.5" for an int), NaN for a float, an unknown choice, a missing file, a negative
number and,
where the flag needs a positive one, zero (ranges of ``click.IntRange``/``FloatRange`` are read from the
type; for plain ``int``/``float`` flags the tables below say which accept zero or negatives, and every
other one must reject a negative value). Each bad call must

* exit with code 2 (a usage error) or 1 with a one-line ``Error:`` message,
* name the flag (``--batch-size`` or ``batch-size:``),
* print no traceback and raise nothing but click's exit,
* and stop before the command's work: its entry point (trainer, writer, evaluator, scorer) is replaced by
  one that fails the test when reached (for ``train`` and ``ood train`` by the flags' own ``validate``,
  which their real entry point runs first, before it creates a run directory or reads data).
"""

from __future__ import annotations

import os
import re
from typing import Any

import click
import pytest
from click.testing import CliRunner

from pyprotoclip.cli import main


class Reached(Exception):
    """The command got past its flag checks to the real work."""


# plain int/float flags: which accept 0 (default for those not listed under POSITIVE) and which a negative value
POSITIVE = {
    "train": {"batch-size", "epochs", "accum-freq", "log-every-n-steps", "threads", "train-num-samples",
              "val-num-samples", "grad-clip-norm", "epochs-cooldown", "num-prototypes", "kmeans-max-iter",
              "kmeans-nredo", "clustering-frequency", "projection-dim", "projection-hidden-dim", "lr-cooldown-power",
              "stop-after-steps"},
    "ood train": {"batch-size", "epochs", "nviews", "cache-size", "feat-dim", "log-every-n-steps", "lr", "num-classes",
                  "train-num-samples", "crop-scale", "temp", "proto-temp", "epsilon", "image-size", "stop-after-steps"},
    "ood score": {"knn-k", "batch-size", "train-num-samples", "mcm-temperature"},
    "ood eval": {"knn-k", "batch-size", "train-num-samples", "mcm-temperature"},
}
NEGATIVE_OK = {
    "train": {"lit-start-epoch", "lr-text", "target-temperature"},  # -1: off / --lr; <= 0: hard labels
}
# further bad values of some flags (fractions, momenta)
EXTRA_BAD = {
    ("train", "max-bad-fraction"): ["1.5"],
    ("train", "beta1"): ["1"],
    ("train", "beta2"): ["1"],
    ("ood train", "max-bad-fraction"): ["1.5"],
    ("ood train", "momentum"): ["1"],
    ("ood train", "crop-scale"): ["1.5"],
    ("ood train", "proto-m"): ["1.5"],
}
SKIP = {"help", "config"}  # --config: its keys are the flags themselves (tests/train/test_cli.py)


def _commands():
    ctx = click.Context(main)
    out = {}
    for name in ("train", "eval", "data", "ood"):
        cmd = main.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(ctx):
                out[f"{name} {sub}"] = cmd.get_command(ctx, sub)
        else:
            out[name] = cmd
    return out


COMMANDS = _commands()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Stand-ins for the commands' work, the baseline (valid) arguments of each command, a clean cwd."""
    monkeypatch.chdir(tmp_path)
    from pyprotoclip.data import synthetic, writer
    from pyprotoclip.eval import evaluate
    from pyprotoclip.ood import score
    from pyprotoclip.ood import train as ood_train
    from pyprotoclip.train import params as P
    from pyprotoclip.train import trainer

    def reached(*args, **kwargs):
        raise Reached()

    def train_run(p, **kw):
        P.validate(p)  # what trainer.run does first (train/setup.py build_run), before the run directory
        raise Reached()

    def ood_run(p, **kw):
        ood_train.validate({**ood_train.DEFAULTS, **p})  # what ood train's run does first
        raise Reached()

    monkeypatch.setattr(trainer, "run", train_run)
    monkeypatch.setattr(ood_train, "run", ood_run)
    monkeypatch.setattr(evaluate, "evaluate", reached)
    for name in ("load_scoring_model", "run_eval", "eval_score_files", "extract"):
        monkeypatch.setattr(score, name, reached)
    monkeypatch.setattr(synthetic, "write_synthetic_dataset", reached)
    monkeypatch.setattr(writer, "write_from_csv", reached)
    monkeypatch.setattr(writer, "write_from_folder", reached)

    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"x")
    csv = tmp_path / "d.csv"
    csv.write_text("filepath\ttitle\n")
    (tmp_path / "root").mkdir()
    scores = tmp_path / "s.npy"
    scores.write_bytes(b"x")
    base = {
        "train": ["--train-data", "d/{0..1}.tar"],
        "eval": ["--checkpoint", str(ckpt), "--data", "d/{0..1}.tar"],
        "data synthetic": ["--out", str(tmp_path / "out"), "--num-samples", "10"],
        "data from-csv": ["--csv", str(csv), "--out", str(tmp_path / "out")],
        "data from-folder": ["--root", str(tmp_path / "root"), "--out", str(tmp_path / "out")],
        "ood train": ["--train-data", "d/{0..1}.tar"],
        "ood score": ["--checkpoint", str(ckpt), "--data", "d/{0..1}.tar"],
        "ood eval": ["--id-scores", str(scores), "--ood-scores", str(scores)],
    }
    return base


def _flag(param: click.Parameter) -> str:
    return max(param.opts, key=len).lstrip("-")


def _method_for(command: str, param: click.Parameter) -> list[str]:
    """ProtoCLIP/CyCLIP flags are checked with their method."""
    help_ = getattr(param, "help", "") or ""
    if command == "train" and help_.startswith("ProtoCLIP:"):
        return ["--method", "protoclip"]
    if command == "train" and "CyCLIP" in help_:
        return ["--method", "cyclip"]
    return []


def _bad_values(command: str, param: click.Parameter) -> list[str]:
    t, flag = param.type, _flag(param)
    if isinstance(t, click.Choice):
        return ["nosuch"]
    if isinstance(t, click.Path) and t.exists:
        return [os.path.join("no", "such", "file")]
    if isinstance(t, (click.IntRange, click.FloatRange)):
        bad = ["abc"] + (["1.5"] if isinstance(t, click.IntRange) else ["nan"])
        if t.min is not None:
            bad.append(str(t.min - 1) if isinstance(t, click.IntRange) else str(t.min if t.min_open else t.min - 1))
        if t.max is not None:
            bad.append(str(t.max + 1) if isinstance(t, click.IntRange) else str(t.max if t.max_open else t.max + 1))
        return bad
    if t in (click.INT, click.FLOAT):
        bad = ["abc"] + (["1.5"] if t is click.INT else ["nan"])
        if flag not in NEGATIVE_OK.get(command, set()):
            bad.append("-1")
        if flag in POSITIVE.get(command, set()):
            bad.append("0")
        return bad + EXTRA_BAD.get((command, flag), [])
    if param.callback is not None and flag in ("mean", "std"):
        return ["a b c", "1 2"]
    return []


def _cases():
    cases = []
    for command, cmd in COMMANDS.items():
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.is_flag or param.name in SKIP:
                continue
            for value in _bad_values(command, param):
                cases.append(pytest.param(command, _flag(param), value, id=f"{command}--{_flag(param)}={value}"))
    return cases


CASES = _cases()


def _option(command: str, flag: str) -> click.Option:
    return next(p for p in COMMANDS[command].params if isinstance(p, click.Option) and _flag(p) == flag)


def _assert_usage_error(result, flag: str, names: tuple[str, ...] = ()) -> None:
    out = result.output
    assert "Traceback" not in out, out
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}")
    assert result.exit_code in (1, 2), f"exit code {result.exit_code}: {out}"
    if result.exit_code == 1:
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), out
    error = out.split("Error:", 1)[-1]  # the usage line before it lists no flag
    assert any(re.search(rf"(--|\b){re.escape(name)}\b", error) for name in (flag, *names)), (
        f"the message does not name --{flag}: {out}")


@pytest.mark.parametrize("command,flag,value", CASES)
def test_bad_value_is_a_usage_error_naming_the_flag(env, command, flag, value):
    param = _option(command, flag)
    args = [*command.split(), *env[command], *_method_for(command, param), f"--{flag}", value]
    result = CliRunner().invoke(main, args)
    assert not isinstance(result.exception, Reached), f"{' '.join(args)}: the command ran with a bad --{flag}"
    _assert_usage_error(result, flag, tuple(o.lstrip("-") for o in param.opts))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_baseline_arguments_reach_the_work(env, command):
    """The baseline is valid: without a bad value each command gets to its work (the tests above can fail)."""
    result = CliRunner().invoke(main, [*command.split(), *env[command]])
    assert isinstance(result.exception, Reached), result.output


def test_every_command_has_cases_and_new_train_flags_are_picked_up():
    commands = {c.values[0] for c in CASES}
    assert commands == set(COMMANDS)
    from pyprotoclip.train.params import FLAGS

    numeric = [f.name for f in FLAGS if f.type in (int, float) and not f.hidden]
    flags = {c.values[1] for c in CASES if c.values[0] == "train"}
    assert set(numeric) <= flags, set(numeric) - flags


def test_unknown_choice_and_missing_required_flags(env):
    for args, flag in [
        (["bench", "nosuch"], "OP"),
        (["data", "synthetic", "--out", "o"], "num-samples"),
        (["eval", "--data", "d"], "checkpoint"),
        (["ood", "score", "--data", "d"], "checkpoint"),
        (["ood", "train"], "train-data"),
        (["data", "from-csv", *env["data from-csv"], "--sep", "ab"], "sep"),
    ]:
        result = CliRunner().invoke(main, args)
        assert not isinstance(result.exception, Reached), args
        _assert_usage_error(result, flag)


def test_real_trainer_validates_before_creating_the_run_directory(tmp_path, monkeypatch):
    """The real entry point (not the stand-in above): a bad flag leaves no logs/ behind and reads no data."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["train", "--train-data", "nosuch/{0..1}.tar", "--model", "tiny-vit",
                                       "--logs", str(tmp_path / "logs"), "--seed", "-1"])
    _assert_usage_error(result, "seed")
    assert not (tmp_path / "logs").exists()
    result = CliRunner().invoke(main, ["ood", "train", "--train-data", "nosuch/{0..1}.tar", "--logs",
                                       str(tmp_path / "ood-logs"), "--batch-size", "0"])
    _assert_usage_error(result, "batch-size")
    assert not (tmp_path / "ood-logs").exists()


def test_bench_bad_op_and_unknown_script_flag():
    """bench: an unknown OP is a usage error naming OP; the scripts' own argparse rejects an unknown flag
    (exit 2, naming it) before any benchmark runs."""
    from pyprotoclip.cli import BENCHES

    result = CliRunner().invoke(main, ["bench", "nosuch"])
    _assert_usage_error(result, "OP")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(here, "tools")):
        pytest.skip("benchmarks run from a source checkout")
    for op in BENCHES:
        result = CliRunner().invoke(main, ["bench", op, "--bogus-flag", "1"])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (op, result.output)
        assert "--bogus-flag" in result.output and "Traceback" not in result.output, (op, result.output)


def _config_cases():
    from pyprotoclip.train.params import FLAGS

    cases = []
    for f in FLAGS:
        if f.type in (int, float) and f.name not in NEGATIVE_OK["train"]:
            cases.append(pytest.param(f.name, "-1", id=f"{f.name}=-1"))
        if f.type in (int, float) and f.name in POSITIVE["train"]:
            cases.append(pytest.param(f.name, "0", id=f"{f.name}=0"))
        if f.type is int:
            cases.append(pytest.param(f.name, "many", id=f"{f.name}=many"))
        if isinstance(f.type, tuple):
            cases.append(pytest.param(f.name, "nosuch", id=f"{f.name}=nosuch"))
    return cases


@pytest.mark.parametrize("flag,value", _config_cases())
def test_bad_value_in_a_train_config_file_names_the_flag(env, tmp_path, flag, value):
    """The same values through ``--config FILE.yaml``: the same checks, the same kind of error."""
    from pyprotoclip.train.params import FLAG_BY_KEY

    extra = _method_for("train", next(p for p in COMMANDS["train"].params if p.name == FLAG_BY_KEY[flag.replace("-", "_")].key))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"train-data: d/{{0..1}}.tar\n{flag}: {value}\n")
    result = CliRunner().invoke(main, ["train", *extra, "--config", str(cfg)])
    assert not isinstance(result.exception, Reached), f"{flag}: {value} in a config file ran"
    _assert_usage_error(result, flag)
