"""``pyprotoclip data ...``: write datasets as webdataset shards."""

from __future__ import annotations

import json

import click


def _seed(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and not 0 <= value < 2**32:
        raise click.BadParameter(f"expected an integer in [0, 2**32), got {value}")
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """Write datasets as webdataset shards (synthetic, from CSV, from folders)."""


@data.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory (train/, val/, ood/ go inside).")
@click.option("--num-samples", required=True, type=click.IntRange(min=1), help="Number of training samples.")
@click.option("--seed", default=0, show_default=True, type=int, callback=_seed, help="Generator seed: same seed, same bytes.")
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


def _flag_error(exc: Exception) -> click.ClickException:
    """The writers' messages start with the argument they are about ("label_key: ..."): name the flag instead."""
    msg = str(exc)
    head, sep, rest = msg.partition(": ")
    if sep and head in _ARG_FLAGS:
        msg = f"{_ARG_FLAGS[head]}: {rest}"
    return click.ClickException(msg)


_ARG_FLAGS = {"img_key": "--img-key", "caption_key": "--caption-key", "label_key": "--label-key", "classnames": "--classnames",
              "templates": "--templates", "csv": "--csv", "root": "--root"}


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({k: v for k, v in summary.items()}, indent=1))
        return
    click.echo(f"wrote {summary['num_samples']} samples in {summary['num_shards']} shard(s): {summary['shards']}")
    if summary.get("skipped"):
        click.echo(f"skipped {len(summary['skipped'])} unreadable image(s)")
    if "own_captions" in summary:
        listed = summary["num_samples"] + len(summary.get("skipped") or [])
        line = f"captions: {summary['own_captions']} of {listed} image(s) had their own caption file, the others a template"
        if summary.get("empty_caption_files"):
            line += f" ({summary['empty_caption_files']} caption file(s) were empty)"
        click.echo(line)
    if "classnames" in summary:
        kind = {"ids": " (integer ids)", "names": " (class names)"}.get(summary.get("labels"), "")
        n = len(summary["classnames"])
        click.echo(f"labels{kind}: {_count(n, 'class', 'classes')}; classnames.txt and templates.txt in {summary['out_dir']}")
        without = summary.get("classes_without_images") or []
        if without:
            more = f", ... ({len(without)} in all)" if len(without) > 5 else ""
            click.echo(f"{_count(len(without), 'class', 'classes')} without images: {', '.join(without[:5])}{more}")
    if summary.get("images_at_root"):
        click.echo(f"{_count(summary['images_at_root'], 'image', 'images')} directly under --root left out: an image's class is "
                   "the folder it is in (ROOT/<class name>/<images>)")
    if "order" in summary:
        click.echo("order: " + ("as listed" if summary["order"] == "input" else f"shuffled across shards ({summary['order']})"))


def _read_templates(templates_file: str | None) -> tuple[str, ...]:
    from pyprotoclip.data.writer import DEFAULT_FOLDER_TEMPLATES

    if not templates_file:
        return DEFAULT_FOLDER_TEMPLATES
    with open(templates_file, encoding="utf-8-sig") as f:
        return tuple(line.strip() for line in f if line.strip())


def _order_options(f):
    f = click.option("--keep-order", is_flag=True,
                     help="Write samples in input order instead of shuffling them (shards then follow the input, e.g. class by class).")(f)
    f = click.option("--seed", default=0, show_default=True, type=int, callback=_seed,
                     help="Seed of the order samples are written in, shuffled across all shards; same seed and input, same bytes.")(f)
    return f


_TEMPLATES_HELP = "Prompt templates for templates.txt, one per line with '{}' [default: 'a photo of a {}.' and 3 more]."


@data.command("from-csv")
@click.option("--csv", "csv_path", required=True, type=click.Path(exists=True, dir_okay=False), help="CSV/TSV with a header row.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory for the shards.")
@click.option("--img-key", default="filepath", show_default=True, help="Column of image paths (relative to the CSV's folder).")
@click.option("--caption-key", default="title", show_default=True, help="Column of captions.")
@click.option("--label-key", default=None,
              help="Column of class labels, written as <key>.cls, with classnames.txt + templates.txt. If every value is an "
                   "integer they are ids (0-based) and --classnames is required; otherwise they are class names, "
                   "labelled by their index in sorted (code-point) order, as from-folder does, or by their line in --classnames.")
@click.option("--classnames", "classnames_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Class names, one per line, in label order: line i names id i. With name labels, every name in the "
                   "column must be in it (it may list more).")
@click.option("--templates", "templates_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help=_TEMPLATES_HELP + " Only with --label-key.")
@click.option("--sep", default="\\t", show_default=True, help="Column separator (\\t for TSV, ',' for CSV).")
@click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1))
@_order_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def from_csv(csv_path: str, out_dir: str, img_key: str, caption_key: str, label_key: str | None, classnames_file: str | None,
             templates_file: str | None, sep: str, samples_per_shard: int, seed: int, keep_order: bool, as_json: bool,
             quiet: bool) -> None:
    """Write shards + sizes.json from a CSV/TSV of image paths and captions (and labels, with --label-key).

    Samples are shuffled across the shards with --seed unless --keep-order is given. A sample's key is its row's
    index among the rows that have an image path and a caption.
    """
    from pyprotoclip.data.writer import write_from_csv

    sep = {"\\t": "\t", "tab": "\t", "comma": ","}.get(sep, sep)
    if len(sep) != 1:
        raise click.BadParameter(f"expected one character, got {sep!r}", param_hint="--sep")
    for flag, given in (("--classnames", classnames_file), ("--templates", templates_file)):
        if given is not None and label_key is None:
            raise click.UsageError(f"{flag}: only used with --label-key COLUMN (the column of class labels)")
    try:
        summary = write_from_csv(csv_path, out_dir, img_key=img_key, caption_key=caption_key, sep=sep, label_key=label_key,
                                 classnames_file=classnames_file, templates=_read_templates(templates_file),
                                 samples_per_shard=samples_per_shard, seed=None if keep_order else seed, progress=not quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise _flag_error(exc) from exc
    _report(summary, as_json)


@data.command("from-folder")
@click.option("--root", required=True, type=click.Path(exists=True, file_okay=False), help="ImageFolder: ROOT/<class name>/<images>.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory for the shards.")
@click.option("--samples-per-shard", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--templates", "templates_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Caption templates, one per line with '{}', for images without a caption file; also written to "
                   "templates.txt [default: 'a photo of a {}.' and 3 more].")
@click.option("--classnames", "classnames_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The class order: one folder name per line ('_' or spaces), line i = label i. It must name every "
                   "class folder and may name classes without images (they keep their label, e.g. the training set's "
                   "file for a validation folder missing a class) [default: alphabetical order of the folder names].")
@_order_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def from_folder(root: str, out_dir: str, samples_per_shard: int, templates_file: str | None, classnames_file: str | None,
                seed: int, keep_order: bool, as_json: bool, quiet: bool) -> None:
    """Write shards + sizes.json + classnames.txt + templates.txt from an ImageFolder (ROOT/<class name>/<images>).

    Labels: the index of the class folder's name in alphabetical (code-point) order, or its line in --classnames.
    classnames.txt lists the class names (folder names, '_' as spaces) in label order.

    Captions: an image with a caption file beside it (img.jpg + img.txt) gets the file's first non-empty line; when
    the file has more lines, all of them are kept in the sample's .json as {"captions": [...]}. Other images get a
    template filled with the class name.

    Order: samples are shuffled across the shards with --seed unless --keep-order is given (then class by class).
    """
    from pyprotoclip.data.writer import write_from_folder

    try:
        summary = write_from_folder(root, out_dir, samples_per_shard=samples_per_shard, templates=_read_templates(templates_file),
                                    classnames_file=classnames_file, seed=None if keep_order else seed, progress=not quiet)
    except (ValueError, FileNotFoundError) as exc:
        raise _flag_error(exc) from exc
    _report(summary, as_json)
