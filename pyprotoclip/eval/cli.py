"""``pyprotoclip eval``: zero-shot, linear probe and retrieval for a checkpoint."""

from __future__ import annotations

import json

import click

from pyprotoclip.cli_helpers import finite, usage_or_data_error
from pyprotoclip.eval.evaluate import DEFAULT_PROBE_TRAIN_SAMPLES


def _seed(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and not 0 <= value < 2**32:
        raise click.BadParameter(f"expected an integer in [0, 2**32), got {value}")
    return value


@click.command(name="eval", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False), help="pyprotoclip training checkpoint, open_clip checkpoint or plain state dict.")
@click.option("--data", required=True, help="Evaluation shards (brace spec(s) joined by '::'), e.g. DIR/val/{00000..00001}.tar.")
@click.option("--model", "model_name", default=None, help="Architecture (overrides the checkpoint's; needed for a state dict of anything but the built-in tiny configs).")
@click.option("--classnames", type=click.Path(exists=True, dir_okay=False), default=None, help="Class names, one a line (default: classnames.txt beside the shards).")
@click.option("--templates", type=click.Path(exists=True, dir_okay=False), default=None, help="Prompt templates with '{}', one a line (default: templates.txt beside the shards).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Samples per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True, help="Data-loader worker processes (0: load in this process).")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Samples in --data (default: sizes.json).")
@click.option("--train-data", "--probe-train-data", "train_data", default=None,
              help="Training shards for the linear probe (brace spec(s) joined by '::'): fit on their image features, test on "
                   "--data, C chosen on a 20% held-out part of them. When both sets have a classnames.txt and they differ, "
                   "the training labels are matched to --data's by class name. Without it the probe uses a split of --data.")
@click.option("--train-num-samples", "--probe-train-num-samples", "train_num_samples", type=click.IntRange(min=0),
              default=DEFAULT_PROBE_TRAIN_SAMPLES, show_default=True,
              help="Fit the linear probe on the first N samples of --train-data (shard order); 0: all of them.")
@click.option("--probe-test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), callback=finite, default=0.5, show_default=True,
              help="Held-out share of --data for the linear probe when no --train-data is given.")
@click.option("--probe-c", type=click.FloatRange(min=0, min_open=True), callback=finite, default=None,
              help="Inverse L2 strength of the logistic regression (default: a sweep of 1e-3..1e2 with --train-data, "
                   "else 1).")
@click.option("--seed", type=int, callback=_seed, default=0, show_default=True, help="Seed of the linear probe's split and k-means.")
@click.option("--out", "out_dir", default=None, help="Where results.jsonl and the PNG go (default: the run directory).")
@click.option("--no-plot", is_flag=True, help="Skip the PNG summary.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def eval_cmd(checkpoint, data, model_name, classnames, templates, batch_size, workers, num_samples, train_data,
             train_num_samples, probe_test_fraction, probe_c, seed, out_dir, no_plot, device, as_json) -> None:
    """Evaluate CHECKPOINT on DATA: zero-shot classification (prompt ensembling), linear probe on
    frozen image features, image<->text retrieval recall@1/5/10 (a caption with the same text as the
    query's counts as correct). Data without class labels gets retrieval only; what is skipped is
    said. While features are extracted, a progress line (samples, rate, ETA) goes to stderr every
    ~30 s. Appends to results.jsonl."""
    import torch

    from pyprotoclip.eval.evaluate import evaluate, format_notes, format_table

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        results = evaluate(
            checkpoint, data, model_name=model_name, classnames_file=classnames, templates_file=templates,
            batch_size=batch_size, workers=workers, num_samples=num_samples, probe_test_fraction=probe_test_fraction,
            probe_c=probe_c, train_data=train_data, train_num_samples=train_num_samples, seed=seed, out_dir=out_dir, plot=not no_plot, device=device,
            progress=lambda line: click.echo(line, err=True), warn=lambda line: click.echo(f"warning: {line}", err=True),
        )
    except (ValueError, FileNotFoundError) as exc:
        raise usage_or_data_error(exc) from None
    if as_json:
        click.echo(json.dumps(results, indent=2, default=str))
        return
    arch = results.get("ckpt_model")
    if results.get("ckpt_model_inferred"):
        arch = f"{arch}, inferred from the state dict's shapes"
    click.echo(f"checkpoint {checkpoint} ({arch}, step {results.get('ckpt_step')}) on {results['num_samples']} samples")
    click.echo(format_table(results))
    for line in format_notes(results):
        click.echo(line)
    click.echo(f"results: {results['results']}")
    if "plot" in results:
        click.echo(f"plot: {results['plot']}")
