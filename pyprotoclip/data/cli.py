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


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items()}, indent=1))
        return
    click.echo(f"wrote {summary['num_samples']} samples in {summary['num_shards']} shard(s): {summary['shards']}")
    if summary.get("skipped"):
        click.echo(f"skipped {len(summary['skipped'])} unreadable image(s)")


@data.command("from-csv")
@click.option("--csv", "csv_path", required=True, type=click.Path(exists=True, dir_okay=False), help="CSV/TSV with a header row.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory for the shards.")
@click.option("--img-key", default="filepath", show_default=True, help="Column of image paths (relative to the CSV's folder).")
@click.option("--caption-key", default="title", show_default=True, help="Column of captions.")
@click.option("--sep", default="\\t", show_default=True, help="Column separator (\\t for TSV, ',' for CSV).")
@click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def from_csv(csv_path: str, out_dir: str, img_key: str, caption_key: str, sep: str, samples_per_shard: int, as_json: bool, quiet: bool) -> None:
    """Write shards + sizes.json from a CSV/TSV of image paths and captions."""
    from pyprotoclip.data.writer import write_from_csv

    sep = {"\\t": "\t", "tab": "\t", "comma": ","}.get(sep, sep)
    if len(sep) != 1:
        raise click.BadParameter(f"expected one character, got {sep!r}", param_hint="--sep")
    try:
        summary = write_from_csv(csv_path, out_dir, img_key=img_key, caption_key=caption_key, sep=sep,
                                 samples_per_shard=samples_per_shard, progress=not quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    _report(summary, as_json)


@data.command("from-folder")
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False), help="ImageFolder: ROOT/<class name>/<images>.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory for the shards.")
@click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--templates", "templates_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Caption templates, one per line with '{}' [default: 'a photo of a {}.' and a few more].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def from_folder(root: str, out_dir: str, samples_per_shard: int, templates_file: str | None, as_json: bool, quiet: bool) -> None:
    """Write shards + sizes.json + classnames.txt + templates.txt from an ImageFolder (captions from templates)."""
    from pyprotoclip.data.writer import DEFAULT_FOLDER_TEMPLATES, write_from_folder

    templates = DEFAULT_FOLDER_TEMPLATES
    if templates_file:
        with open(templates_file, encoding="utf-8") as f:
            templates = tuple(line.strip() for line in f if line.strip())
    try:
        summary = write_from_folder(root, out_dir, samples_per_shard=samples_per_shard, templates=templates, progress=not quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    _report(summary, as_json)
