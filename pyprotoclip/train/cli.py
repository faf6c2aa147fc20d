"""``pyprotoclip train``: click options generated from ``pyprotoclip.train.params.FLAGS``."""

from __future__ import annotations

from typing import Any

import click

from pyprotoclip.train import params as P


def _option(flag: P.Flag):
    kwargs: dict[str, Any] = {"help": flag.help, "hidden": flag.hidden, "show_default": not (flag.default is None or flag.default is False or flag.default == "")}
    if flag.type is bool:
        return click.option(f"--{flag.name}", flag.key, is_flag=True, default=flag.default, **kwargs)
    if isinstance(flag.type, tuple):
        return click.option(f"--{flag.name}", flag.key, type=click.Choice(flag.type), default=flag.default, **kwargs)
    if flag.name in ("config", "pretrained"):
        return click.option(f"--{flag.name}", flag.key, type=click.Path(exists=True, dir_okay=False), default=None, **kwargs)
    names = [f"--{flag.name}", *(f"--{a}" for a in flag.aliases)]
    if flag.name == "logs":
        # torchrun's own argument parser takes `--logs` for an abbreviation of its `--logs-specs`
        # and stops; `--logs-dir` passes through it untouched.
        names.append("--logs-dir")
    return click.option(*names, flag.key, type=flag.type, default=flag.default, **kwargs)


def _with_flags(fn):
    for flag in reversed(P.FLAGS):
        fn = _option(flag)(fn)
    return fn


def resolve_params(ctx: click.Context, given: dict[str, Any]) -> dict[str, Any]:
    """Defaults < --config YAML < flags given on the command line."""
    params = P.defaults()
    if given.get("config"):
        params.update(P.read_config_file(given["config"]))
    for key, value in given.items():
        if ctx.get_parameter_source(key) == click.core.ParameterSource.COMMANDLINE:
            params[key] = value
    return params


@click.command(name="train", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@_with_flags
@click.pass_context
def train(ctx: click.Context, **given: Any) -> None:
    """Train a contrastive image-text model (--method) on webdataset shards.

    Single process: `pyprotoclip train --train-data 'd/train/{00000..00009}.tar' --model tiny-vit ...`.
    Several processes: `torchrun --nproc_per_node N -m pyprotoclip train ...` (gloo on CPU, NCCL on GPU).
    Flags follow open_clip's names and defaults; see docs/training.md.
    """
    from pyprotoclip.data.pipeline import BadDataError
    from pyprotoclip.train.faults import TrainingError

    try:
        params = resolve_params(ctx, given)
        from pyprotoclip.train.trainer import run

        run(params)
    except BadDataError as exc:  # the data, not the flags: no usage text
        raise click.ClickException(str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from None
    except TrainingError as exc:  # a fault during the run: the flags were fine, so no usage text
        raise click.ClickException(str(exc)) from None
