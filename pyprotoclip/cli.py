"""The ``pyprotoclip`` command line: a click group whose subcommands are imported only when used,
so ``pyprotoclip --help`` and ``pyprotoclip doctor`` stay fast."""

from __future__ import annotations

import importlib
import json
import os
import runpy
import sys

import click

# name -> ("module:attribute" of a click command or group, one-line help)
SUBCOMMANDS = {
    "train": ("pyprotoclip.train.cli:train", "Train a contrastive image-text model (--method; torchrun-launchable)."),
    "eval": ("pyprotoclip.eval.cli:eval_cmd", "Zero-shot, linear-probe and retrieval evaluation of a checkpoint."),
    "data": ("pyprotoclip.data.cli:data", "Write datasets as webdataset shards (synthetic, from CSV, from folders)."),
    "ood": ("pyprotoclip.ood.cli:ood", "Out-of-distribution detection: PALM training, scores of any checkpoint, FPR95/AUROC."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(SUBCOMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in SUBCOMMANDS:
            target, _ = SUBCOMMANDS[name]
            module_name, attr = target.split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][1]) for name in sorted(SUBCOMMANDS)]
        rows += [(name, cmd.get_short_help_str()) for name, cmd in sorted(self.commands.items())]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyprotoclip")
def main() -> None:
    """pyprotoclip: prototype-based contrastive language-image pretraining."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def doctor(as_json: bool) -> None:
    """Say what was compiled (CPU/CUDA, archs, versions, threads) and which backend `auto` picks."""
    from pyprotoclip import build_info

    info = build_info()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key:<{width}}  {value}")
    if not info["compiled"]:
        click.echo("\nThe compiled kernels are not in use; every op runs its pure-PyTorch reference.", err=True)


BENCHES = {
    "infonce": "bench_infonce.py",
    "proto": "bench_proto_softmax.py",
    "proto_softmax": "bench_proto_softmax.py",
    "kmeans": "bench_kmeans.py",
    "cyclip": "bench_cyclip.py",
    "episode": "bench_episode.py",
    "train": "bench_train.py",
}


# --help after OP belongs to the benchmark script: the command has no help option of its own
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("op", required=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx: click.Context, op: str | None, args: tuple[str, ...]) -> None:
    """Run a benchmark from tools/ (source checkout): OP is one of infonce, proto_softmax (proto), kmeans,
    cyclip, episode, train (against open_clip_train); ARGS (and --help) go to the script."""
    if op in (None, "-h", "--help"):
        click.echo(ctx.get_help())
        return
    if op not in BENCHES:
        raise click.BadParameter(f"expected one of {', '.join(sorted(BENCHES))}, got {op!r}", param_hint="OP")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(here, "tools", BENCHES[op])
    if not os.path.exists(script):
        raise click.ClickException(f"{script} not found: benchmarks run from a source checkout of pyprotoclip")
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
