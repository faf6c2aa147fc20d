"""The command line advertises only what works."""

import pathlib
import re

from click.testing import CliRunner

from pyprotoclip.cli import main
from pyprotoclip.losses import method_names


def test_top_level_help_lists_the_working_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    listed = re.findall(r"^  (\w+)\s", r.output.split("Commands:")[1], flags=re.M)
    assert listed == ["bench", "data", "doctor", "eval", "ood", "train"]
    for name in listed:
        assert CliRunner().invoke(main, [name, "--help"]).exit_code == 0, name


def test_method_choices_are_the_registered_methods():
    r = CliRunner().invoke(main, ["train", "--help"])
    choices = re.search(r"--method \[([^\]]+)\]", r.output).group(1).split("|")
    assert choices == list(method_names()) and "clip" in choices


def test_user_facing_text_does_not_speak_of_the_work_plan():
    root = pathlib.Path(__file__).resolve().parents[1] / "pyprotoclip"
    hits = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bissues?\b|\bticket", line, re.I)]
    assert not hits, hits


def test_help_shows_zero_defaults_and_bench_passes_help_to_the_script():
    r = CliRunner().invoke(main, ["train", "--help"])
    for flag in ("--seed", "--save-every-n-steps"):
        block = r.output.split(flag, 1)[1].split("\n  --", 1)[0]
        assert "[default: 0]" in " ".join(block.split()), flag
    assert "[default: 0]" in CliRunner().invoke(main, ["eval", "--help"]).output
    r = CliRunner().invoke(main, ["bench", "--help"])
    assert r.exit_code == 0 and "OP is one of" in r.output
