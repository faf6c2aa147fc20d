"""``pyprotoclip data ...``: write datasets as webdataset shards."""

from __future__ import annotations

import json

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """Write datasets as webdataset shards (synthetic, from CSV, from folders)."""


@data.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory (train/, val/, ood/ go inside).")
@click.option("--num-samples", required=True, type=click.IntRange(min=1), help="Number of training samples.")
@click.option("--seed", default=0, show_default=True, type=int, help="Generator seed: same seed, same bytes.")
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(min=8), help="Image side in pixels.")
@click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--num-val", default=None, type=click.IntRange(min=0), help="Held-out samples of the training classes [default: N/10 in 200..5000].")
@click.option("--num-ood", default=None, type=click.IntRange(min=0), help="Samples of held-out classes [default: N/10 in 200..5000].")
@click.option("--processes", default=None, type=click.IntRange(min=1), help="Writer processes [default: CPU count].")
@click.option("--quiet", is_flag=True, help="No progress output.")
def synthetic(out_dir: str, num_samples: int, seed: int, image_size: int, samples_per_shard: int, num_val: int | None,
              num_ood: int | None, processes: int | None, quiet: bool) -> None:
    """Write the built-in synthetic image-caption dataset (train / val / ood splits) to OUT."""
    from pyprotoclip.data.synthetic import write_synthetic_dataset

    try:
        summary = write_synthetic_dataset(out_dir, num_samples, seed=seed, image_size=image_size, samples_per_shard=samples_per_shard,
                                          num_val=num_val, num_ood=num_ood, progress=not quiet, processes=processes)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    total = summary["num_train"] + summary["num_val"] + summary["num_ood"]
    click.echo(f"wrote {total} samples in {summary['seconds']:.1f} s ({summary['samples_per_s']:.0f} samples/s, "
               f"{summary['processes']} processes) to {summary['out_dir']}")
    for split in ("train", "val", "ood"):
        click.echo(f"  {split:<5} {summary['num_' + split]:>7}  {summary[split + '_shards']}")
    click.echo(f"  classes: {len(summary['classnames'])} train/val, {len(summary['ood_classnames'])} ood; info: {summary['info']}")


def _echo_json(obj: dict) -> None:
    click.echo(json.dumps(obj, indent=1))
