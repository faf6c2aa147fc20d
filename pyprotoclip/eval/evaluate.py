"""Evaluate a checkpoint on webdataset shards: zero-shot, linear probe, retrieval; results + plot."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import torch

from pyprotoclip.eval.metrics import evaluate_model
from pyprotoclip.progress import ProgressClock, format_duration

# training samples whose image features the linear probe is fitted on, by default (0: all)
DEFAULT_PROBE_TRAIN_SAMPLES = 10_000

log = logging.getLogger("pyprotoclip.eval")


def probe_coverage_warning(results: dict[str, Any], train_num_samples: int | None) -> str | None:
    """The one-line warning when evaluation classes have no sample among the probe's training samples, else None."""
    missing = results.get("linear_probe_missing_classes", 0)
    if not missing:
        return None
    fitted = results["linear_probe_num_train"]
    how = (f"the first {fitted} samples of --train-data (shard order)" if train_num_samples
           else f"the {fitted} samples of --train-data")
    fix = ("pass --train-num-samples 0 (all of --train-data) or write the training shards shuffled "
           "(data from-folder without --keep-order)" if train_num_samples
           else "give training shards with samples of every class")
    return (f"linear probe: {missing} class(es) of the evaluation data have no sample among {how}, which hold "
            f"{results['linear_probe_train_classes']} class(es), so their {results['linear_probe_num_test_missing']} "
            f"evaluation sample(s) always count as wrong; {fix}")


def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    with open(path, encoding="utf-8-sig") as f:  # a leading BOM (Notepad) is not part of the first line
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise ValueError(f"{what}: {path!r} is empty")
    return lines


def _classnames_path(spec: str) -> str | None:
    """The classnames.txt that read_zeroshot_files reads for ``spec`` (the first shard's directory, else its
    parent), or None when it cannot be located."""
    import pyprotoclip.data as pdata

    try:
        d = os.path.dirname(os.path.abspath(pdata.expand_shards(spec)[0]))
    except (FileNotFoundError, ValueError):
        return None
    for cand in (d, os.path.dirname(d)):
        if os.path.isfile(os.path.join(cand, "classnames.txt")):
            return os.path.join(cand, "classnames.txt")
    return None


def _name_key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def probe_label_map(train_names: list[str] | None, eval_names: list[str] | None, train_labels: torch.Tensor,
                    eval_labels: torch.Tensor, *, train_file: str, eval_file: str) -> list[int] | None:
    """How the linear probe's training labels become evaluation labels: None when they already agree (the same
    class names in the same order, or neither set has names), else ``new[i]`` for training label i, matched by
    class name ('_' as spaces, case ignored); a training class absent from the evaluation names gets an index past
    them (predicting it is always wrong). BadDataError (one line naming --train-data and both files) when no name
    matches, or when one set has names and the other, without, has labels outside them."""
    # a data error: the CLI prints one line, no usage text
    from pyprotoclip.data.pipeline import BadDataError

    t_max = int(train_labels.max()) if train_labels.numel() else -1
    e_max = int(eval_labels.max()) if eval_labels.numel() else -1
    if train_names is None and eval_names is None:
        return None
    if train_names is None or eval_names is None:
        named, names, other_max = ("evaluation", eval_names, t_max) if train_names is None else ("training", train_names, e_max)
        if other_max >= len(names):
            have, lack = (eval_file, train_file) if train_names is None else (train_file, eval_file)
            raise BadDataError(f"train-data: {have} (the {named} data) has {len(names)} class names but the other set, "
                               f"without {lack}, has label {other_max}; the labels of --train-data and the evaluation "
                               "data cannot be matched: write a classnames.txt beside both")
        return None
    if list(train_names) == list(eval_names):
        return None
    if t_max >= len(train_names):
        raise BadDataError(f"train-data: label {t_max} of --train-data is outside its {train_file} ({len(train_names)} names)")
    pos = {_name_key(n): i for i, n in enumerate(eval_names)}
    if not any(_name_key(n) in pos for n in train_names):
        raise BadDataError(f"train-data: no class name of {train_file} (--train-data) is in {eval_file} (the evaluation data), "
                           "so the linear probe's labels cannot be matched")
    new, extra = [], len(eval_names)
    for n in train_names:
        if _name_key(n) in pos:
            new.append(pos[_name_key(n)])
        else:
            new.append(extra)
            extra += 1
    return new


def _feature_progress(say: Callable[[str], None] | None, what: str, total: int | None) -> Callable[[int], None] | None:
    """extract_features' callback: ``say`` a line (samples done, rate, ETA) when 30 s passed since the last."""
    if say is None:
        return None
    clock, t0 = ProgressClock(), time.time()

    def report(n: int) -> None:
        if clock.due():
            rate = n / max(time.time() - t0, 1e-9)
            eta = f", ETA {format_duration(max(total - n, 0) / rate)}" if total else ""
            say(f"{what}: image and text features of {n}{f'/{total}' if total else ''} samples, {rate:.1f} samples/s{eta}")
            clock.mark()

    return report


def load_model_from_checkpoint(path: str, model_name: str | None = None, device: str | torch.device = "cpu"):
    """(model, preprocess_val, tokenizer, checkpoint_meta) from a training checkpoint or a plain state dict.

    The architecture comes from the checkpoint's ``model`` entry unless ``model_name`` overrides it.
    A checkpoint without one (a plain state dict, or open_clip's training checkpoint, whose ``state_dict``
    has no architecture name) gets the built-in tiny config its keys and shapes match
    (``meta["model_inferred"]``); any other architecture needs ``model_name``. A method's additions to
    the model are not loaded.
    """
    from pyprotoclip.checkpoint import load_checkpoint, model_weights
    from pyprotoclip.models import create_model, infer_architecture, load_weights

    weights, meta = model_weights(load_checkpoint(path))
    meta = {k: v for k, v in meta.items() if k != "model" or isinstance(v, str)}
    name = model_name or meta.get("model")
    if not name:
        name = infer_architecture(weights) if isinstance(weights, dict) and weights else None
        if not name:
            raise ValueError(f"model: {path!r} records no architecture name and its shapes match no built-in config; "
                             "pass --model NAME")
        meta["model_inferred"] = True
    model, _, preprocess_val, tokenizer = create_model(name, device=device)
    load_weights(model, weights, what="model", source=path, name=name)
    model.eval()
    meta["model"] = name
    return model, preprocess_val, tokenizer, meta


def evaluate(
    checkpoint: str,
    data: str,
    *,
    model_name: str | None = None,
    classnames_file: str | None = None,
    templates_file: str | None = None,
    batch_size: int = 256,
    workers: int = 2,
    num_samples: int | None = None,
    probe_test_fraction: float = 0.5,
    probe_c: float | None = None,
    train_data: str | None = None,
    train_num_samples: int | None = DEFAULT_PROBE_TRAIN_SAMPLES,
    seed: int = 0,
    out_dir: str | None = None,
    plot: bool = True,
    device: str = "cpu",
    build_loader=None,
    progress: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every metric the data allows; append a row to ``<out_dir>/results.jsonl`` and draw ``eval-<ckpt>.png``.

    Retrieval needs only image-caption pairs; zero-shot needs class labels and class names (from the
    files or beside the shards), the linear probe class labels. What the data does not allow is
    skipped and named in "skipped". With ``train_data``, the linear probe is fitted on the image
    features of the first ``train_num_samples`` samples of those shards (None or 0: all of them) and
    tested on ``data``; without it, on a split of ``data``. When evaluation classes have no sample among
    those training samples (class-sorted shards cut short), a one-line warning says how many, and the
    results name ``linear_probe_train_classes`` and ``linear_probe_missing_classes``.
    When both sets have class names and they differ, the training labels are matched to the evaluation set's by
    name (:func:`probe_label_map`; results: ``linear_probe_labels``).
    out_dir defaults to the run directory when the checkpoint lies in ``<run>/checkpoints/``,
    else the checkpoint's directory. ``progress(line)``: a line about the feature extraction at least
    every 30 s while it runs; ``warn(line)``: a warning about the results (default: logged). Returns
    the metrics dict (with "plot" and "results" paths).
    """
    import pyprotoclip.data as pdata

    build_loader = build_loader or pdata.build_loader
    t0 = time.time()
    model, preprocess_val, tokenizer, meta = load_model_from_checkpoint(checkpoint, model_name, device)

    if (classnames_file is None) != (templates_file is None):
        raise ValueError("classnames/templates: give both --classnames and --templates, or neither")
    no_classnames = None
    if classnames_file:
        classnames, templates = _read_lines(classnames_file, "classnames"), _read_lines(templates_file, "templates")
    else:
        try:
            classnames, templates = pdata.read_zeroshot_files(data)
        except FileNotFoundError:
            classnames = templates = None
            no_classnames = "no classnames.txt / templates.txt beside the shards; pass --classnames and --templates"
    cfg = pdata.DataConfig(shards=data, batch_size=batch_size, workers=workers, num_samples=num_samples, seed=seed, drop_last=False,
                           flag="data")
    loader = build_loader(cfg, preprocess=preprocess_val, tokenize=tokenizer, is_train=False)
    probe_train = None
    if train_data:
        from pyprotoclip.eval.features import extract_features

        cap = train_num_samples or None
        tcfg = pdata.DataConfig(shards=train_data, batch_size=batch_size, workers=workers, num_samples=cap, seed=seed,
                                drop_last=False, flag="train-data")
        tloader = build_loader(tcfg, preprocess=preprocess_val, tokenize=tokenizer, is_train=False)
        probe_train = extract_features(model, tloader, device=device, max_samples=cap,
                                       progress=_feature_progress(progress, "train-data", cap or getattr(tloader, "num_samples", None)))
        if not bool((probe_train["labels"] >= 0).any()):
            raise ValueError(f"train-data: no sample of {train_data!r} has a class label; the linear probe needs labels")
    probe_relabel, matched = None, {}
    if probe_train is not None:
        eval_file = classnames_file or _classnames_path(data) or f"the classnames.txt beside {data!r}"
        train_file = _classnames_path(train_data) or f"the classnames.txt beside {train_data!r}"
        try:
            train_names, _ = pdata.read_zeroshot_files(train_data)
        except FileNotFoundError:
            train_names = None
        train_labels = probe_train["labels"]

        def probe_relabel(eval_labels: torch.Tensor) -> torch.Tensor | None:
            lab = train_labels[train_labels >= 0]
            new = probe_label_map(train_names, classnames, lab, eval_labels[eval_labels >= 0],
                                  train_file=train_file, eval_file=eval_file)
            if new is None:
                return None
            matched.update(train=train_file, eval=eval_file)
            table = torch.tensor(new, dtype=torch.long)
            return torch.where(train_labels >= 0, table[train_labels.clamp(min=0)], train_labels)
    metrics, details = evaluate_model(
        model, loader, tokenizer=tokenizer, device=device, classnames=classnames, templates=templates, linear_probe=True,
        probe_test_fraction=probe_test_fraction, probe_c=probe_c, probe_train=probe_train, probe_relabel=probe_relabel, seed=seed,
        progress=_feature_progress(progress, "data", getattr(loader, "num_samples", None)),
    )
    skipped = []
    for line in details["skipped"]:
        if no_classnames and line.startswith("zero-shot ("):
            line = f"zero-shot ({no_classnames})"
        elif classnames is None and line.startswith("zero-shot and"):
            line += "; zero-shot also needs class names"
        skipped.append(line)
    results: dict[str, Any] = {"checkpoint": os.path.abspath(checkpoint), "data": data, **{f"ckpt_{k}": v for k, v in meta.items()}}
    results.update(metrics)
    if train_data:
        results["linear_probe_train_data"] = train_data
        if matched:
            results["linear_probe_labels"] = (f"matched by name: {matched['train']} (--train-data) onto {matched['eval']} "
                                              "(the evaluation data)")
        warning = probe_coverage_warning(results, train_num_samples)
        if warning:
            (warn or log.warning)(warning)
    if skipped:
        results["skipped"] = skipped
    results["eval_seconds"] = time.time() - t0

    ckpt_dir = os.path.dirname(os.path.abspath(checkpoint))
    if out_dir is None:
        out_dir = os.path.dirname(ckpt_dir) if os.path.basename(ckpt_dir) == "checkpoints" else ckpt_dir
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.jsonl")
    results["results"] = results_path
    if plot:
        from sklearn.metrics import confusion_matrix

        from pyprotoclip.eval.plot import summary_plot

        stem = os.path.splitext(os.path.basename(checkpoint))[0]
        png = os.path.join(out_dir, f"eval-{stem}.png")
        cm = None
        if "zeroshot" in details:
            zs = details["zeroshot"]
            cm = confusion_matrix(zs["target"].numpy(), zs["pred"].numpy(), labels=list(range(len(classnames))))
        summary_plot(png, confusion=cm, classnames=classnames or [], run_dir=out_dir, metrics=results)
        results["plot"] = png
    row = {"type": "eval", **{k: v for k, v in results.items() if k != "results"}}
    with open(results_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return results


TABLE_ROWS = (
    ("zero-shot top-1", "zeroshot_top1"),
    ("zero-shot top-5", "zeroshot_top5"),
    ("cross-modal consistency @1", "crossmodal_consistency@1"),
    ("cross-modal consistency @5", "crossmodal_consistency@5"),
    ("in-modal consistency @1", "inmodal_consistency@1"),
    ("in-modal consistency @5", "inmodal_consistency@5"),
    ("image kNN top-1 (k=1)", "image_knn_top1@1"),
    ("linear probe top-1", "linear_probe_top1"),
    ("image->text R@1", "image_to_text_R@1"),
    ("image->text R@5", "image_to_text_R@5"),
    ("image->text R@10", "image_to_text_R@10"),
    ("text->image R@1", "text_to_image_R@1"),
    ("text->image R@5", "text_to_image_R@5"),
    ("text->image R@10", "text_to_image_R@10"),
    ("retrieval mean recall", "mean_recall"),
    ("clustering ARI", "clustering_ari"),
    ("clustering AMI", "clustering_ami"),
)


def format_table(results: dict[str, Any]) -> str:
    width = max(len(label) for label, _ in TABLE_ROWS)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{label:<{width}}  {100 * results[key]:5.1f}%" for label, key in TABLE_ROWS if key in results]
    if "modality_gap" in results:
        lines.append(f"{'modality gap':<{width}}  {results['modality_gap']:.3f}")
    return "\n".join(lines)


def format_notes(results: dict[str, Any]) -> list[str]:
    """One line each: how the linear probe and retrieval were measured, and what was skipped and why."""
    notes = []
    if "linear_probe_protocol" in results:
        labels = "; training labels matched to the evaluation data's by class name" if "linear_probe_labels" in results else ""
        notes.append(f"linear probe: {results['linear_probe_protocol']} ({results['linear_probe_num_train']} training, "
                     f"{results['linear_probe_num_test']} test samples{labels})")
    if "retrieval_distinct_captions" in results:
        notes.append(f"retrieval: {results['retrieval_distinct_captions']} distinct captions among "
                     f"{results['retrieval_num_captions']}; a caption with the same text as the query's counts as correct")
    if results.get("bad_samples"):
        notes.append(f"data: {results['bad_samples']} bad sample(s) skipped ({results.get('damaged_shards', 0)} damaged "
                     f"shard read(s)), not in these numbers; the warnings above name the shards")
    if results.get("skipped"):
        notes.append(f"skipped: {'; '.join(results['skipped'])}")
    return notes
