"""``pyprotoclip ood train | score | eval``: out-of-distribution detection (PALM) on labelled shards."""

from __future__ import annotations

import json
from typing import Any

import click

from pyprotoclip.cli_helpers import finite, usage_or_data_error

CTX = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CTX)
def ood() -> None:
    """Out-of-distribution detection: train PALM, score any checkpoint, evaluate (FPR95, AUROC, ...)."""


def _floats3(ctx, param, value):
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected three numbers, got {value!r}") from None
    if len(out) != 3:
        raise click.BadParameter(f"expected three numbers (R G B), got {value!r}")
    return out


@ood.command("train", context_settings=CTX)
@click.option("--train-data", required=True, help="Labelled training shards (.cls per sample): brace-expanded spec(s) joined by '::'.")
@click.option("--train-num-samples", type=int, default=None, help="Samples per epoch [default: sizes.json].")
@click.option("--dataset-resampled", is_flag=True, help="Sample shards with replacement.")
@click.option("--workers", type=int, default=2, show_default=True, help="Data-loader workers per process (official: 2).")
@click.option("--shuffle-buffer", type=int, default=1000, show_default=True,
              help="Samples per worker shuffled together; class-sorted shards (from-folder --keep-order) need one per worker's share (docs/ood.md).")
@click.option("--max-bad-fraction", type=float, default=0.1, show_default=True,
              help="Stop with an error naming the worst shards when a data worker finds more than this fraction of its "
                   "samples bad (undecodable, no caption, in a damaged shard) after 1000 (1: never stop).")
@click.option("--num-classes", type=int, default=None, help="Number of classes [default: the lines of classnames.txt beside the shards].")
@click.option("--batch-size", "-b", type=int, default=512, show_default=True, help="Images per step and process (official runs: 512).")
@click.option("--epochs", type=int, default=500, show_default=True, help="Epochs (official runs: 500).")
@click.option("--lr", type=float, default=0.5, show_default=True, help="Base learning rate (official runs: 0.5).")
@click.option("--wd", "--weight-decay", "wd", type=float, default=1e-6, show_default=True, help="SGD weight decay, on every parameter (official runs: 1e-6).")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum (Nesterov).")
@click.option("--warmup-epochs", type=int, default=10, show_default=True, help="Linear warm-up from 0 (hard-coded 10 officially); then cosine to 1e-3 x lr.")
@click.option("--precision", type=click.Choice(["amp", "amp_bf16", "fp32"]), default="amp", show_default=True,
              help="amp: fp16 autocast + GradScaler on CUDA (official), fp32 on CPU.")
@click.option("--backbone", default="resnet34", show_default=True,
              help="resnet18 | resnet34 (torchvision, CIFAR stem) or an open_clip / pyprotoclip architecture (its image tower: tiny-rn, tiny-vit, RN50, ...).")
@click.option("--cifar-stem/--no-cifar-stem", default=None, help="ResNets: 3x3 stride-1 first conv, no max-pool (the official CIFAR model) [default: on].")
@click.option("--image-size", type=int, default=None, help="Training/eval image side [default: 32 for the ResNets, the architecture's own otherwise].")
@click.option("--mean", callback=_floats3, default=None, help="Normalisation mean 'R G B' [default: CIFAR-100's for the ResNets, CLIP's otherwise].")
@click.option("--std", callback=_floats3, default=None, help="Normalisation std 'R G B' (as --mean).")
@click.option("--feat-dim", type=int, default=128, show_default=True, help="Head output (prototype) dimension.")
@click.option("--head", type=click.Choice(["mlp", "linear"]), default="mlp", show_default=True, help="Projection head: Linear-ReLU-Linear (official) or Linear.")
@click.option("--loss", type=click.Choice(["palm", "ce"]), default="palm", show_default=True,
              help="palm, or ce: cross-entropy with a linear classifier (the MSP baseline, same views and schedule).")
@click.option("--nviews", type=int, default=2, show_default=True, help="Augmented views per image.")
@click.option("--augment", type=click.Choice(["simclr", "crop"]), default="simclr", show_default=True,
              help="simclr: the official views (crop, flip, colour jitter, grayscale); crop: crop and flip only (classes defined by colour).")
@click.option("--crop-scale", type=float, default=0.2, show_default=True, help="Smallest area fraction of RandomResizedCrop (official 0.2).")
@click.option("--cache-size", type=int, default=6, show_default=True, help="Prototypes per class (1: a single-prototype baseline).")
@click.option("--k", type=int, default=5, show_default=True, help="Top-k prototypes kept per sample (0: all; capped at --cache-size).")
@click.option("--proto_m", "--proto-m", "proto_m", type=float, default=0.999, show_default=True, help="EMA momentum of the prototypes.")
@click.option("--temp", type=float, default=0.1, show_default=True, help="Temperature of the MLE loss.")
@click.option("--epsilon", type=float, default=0.05, show_default=True,
              help="Sinkhorn epsilon. The official runs always use 0.05 (their --epsilon is parsed but not passed on).")
@click.option("--sinkhorn-iterations", type=int, default=3, show_default=True, help="Sinkhorn iterations (hard-coded 3 officially).")
@click.option("--lambda_pcon", "--lambda-pcon", "lambda_pcon", type=float, default=1.0, show_default=True, help="Weight of the prototype contrastive loss.")
@click.option("--proto-temp", type=float, default=0.5, show_default=True, help="Temperature of the prototype contrastive loss (hard-coded 0.5 officially).")
@click.option("--detach-proto-update", is_flag=True, help="Stop the gradient the prototype loss sends through the EMA update (kept officially).")
@click.option("--unlabelled", is_flag=True, help="No class masks: any sample may take any prototype (not in the official code).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed (official: 1).")
@click.option("--logs", "--logs-dir", "logs", default="./logs", show_default=True, help="Runs go to <logs>/<name>/.")
@click.option("--name", default=None, help="Run name [default: date-ood-loss-backbone-lr-b].")
@click.option("--resume", default=None, help="'latest' (the newest checkpoint of --name) or a checkpoint path.")
@click.option("--save-frequency", type=int, default=50, show_default=True, help="Write checkpoints/epoch_<N>.pt every N epochs (and after the last).")
@click.option("--save-most-recent/--no-save-most-recent", default=True, show_default=True, help="Keep checkpoints/epoch_latest.pt after every epoch.")
@click.option("--save-every-n-steps", type=int, default=0, show_default=True, help="Also update epoch_latest.pt every N steps.")
@click.option("--stop-after-steps", type=int, default=None, help="End the run (resumably) after this global step.")
@click.option("--log-every-n-steps", type=int, default=50, show_default=True)
@click.option("--max-nonfinite", type=int, default=20, show_default=True,
              help="A step whose loss (or, without the fp16 GradScaler, gradient norm) is NaN/Inf is skipped: no update, "
                   "while the step number and LR schedule move on. Stop after this many skipped steps in a row (0: never stop).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--dist-backend", default=None, help="torch.distributed backend under torchrun [default: nccl on CUDA, gloo otherwise].")
def train_cmd(**p: Any) -> None:
    """Train a network for OOD detection with PALM (mixture of prototypes) on labelled shards.

    The defaults are the official CIFAR-100 recipe (ResNet-34, 500 epochs, batch 512, SGD lr 0.5, wd 1e-6,
    6 prototypes per class, top-5, EMA 0.999); see docs/ood.md. Under torchrun: one process per device.
    """
    from pyprotoclip.ood.train import run
    from pyprotoclip.train.faults import TrainingError

    try:
        run(p)
    except (ValueError, FileNotFoundError) as exc:
        raise usage_or_data_error(exc) from None
    except TrainingError as exc:  # a fault during the run: the flags were fine, so no usage text
        raise click.ClickException(str(exc)) from None


def _scoring_options(fn):
    options = [
        click.option("--checkpoint", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="An `ood train` checkpoint, a `pyprotoclip train` checkpoint (CLIP, ProtoCLIP, ...) or an open_clip state dict (with --model)."),
        click.option("--model", "model_name", default=None, help="Architecture of a plain state dict (image-text checkpoints)."),
        click.option("--train-data", default=None, help="In-distribution training shards (fits mahalanobis, knn, and msp without a trained classifier)."),
        click.option("--train-num-samples", type=click.IntRange(min=1), default=None, help="Use only the first N training samples for fitting."),
        click.option("--mahalanobis-form", type=click.Choice(["official", "corrected"]), default="official", show_default=True,
                     help="official: the PALM code's formula (subtracts the mean a second time); corrected: the plain distance."),
        click.option("--knn-k", type=click.IntRange(min=1), default=50, show_default=True, help="k of the KNN score."),
        click.option("--knn-backend", type=click.Choice(["auto", "faiss", "torch"]), default="auto", show_default=True),
        click.option("--mcm-temperature", type=click.FloatRange(min=0, min_open=True), callback=finite, default=1.0, show_default=True, help="Softmax temperature of MCM."),
        click.option("--classnames", "classnames_file", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="MCM class names, one a line [default: classnames.txt beside the ID shards]."),
        click.option("--templates", "templates_file", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="MCM prompt templates with '{}' [default: templates.txt beside the ID shards]."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True),
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


_SCORE_CHOICE = click.Choice(["mahalanobis", "knn", "msp", "mcm"])


@ood.command("score", context_settings=CTX)
@_scoring_options
@click.option("--data", required=True, help="Shards to score.")
@click.option("--score", "score_name", type=_SCORE_CHOICE, default="mahalanobis", show_default=True)
@click.option("--out", "out_path", default=None, help="Write scores, labels and keys to this .npz [default: print a summary only].")
def score_cmd(checkpoint, model_name, train_data, train_num_samples, mahalanobis_form, knn_k, knn_backend, mcm_temperature,
              classnames_file, templates_file, batch_size, workers, device, data, score_name, out_path) -> None:
    """Per-sample OOD scores (higher = more in-distribution) of a checkpoint's L2-normalised features."""
    import numpy as np

    from pyprotoclip.ood import score as S

    device = _device(device)
    try:
        sm = S.load_scoring_model(checkpoint, model_name=model_name, device=device)
        kw = dict(batch_size=batch_size, workers=workers, device=device)
        needs_train = score_name in ("mahalanobis", "knn") or (score_name == "msp" and sm.logits is None)
        train = S.extract(sm, train_data, num_samples=train_num_samples, flag="train-data", **kw) if (train_data and needs_train) else None
        classnames, templates = S.zeroshot_files(train_data, classnames_file, templates_file) if score_name == "mcm" else (None, None)
        scorer, desc = S.build_scorer(score_name, sm, train, mahalanobis_form=mahalanobis_form, knn_k=knn_k,
                                      knn_backend=knn_backend, mcm_temperature=mcm_temperature, classnames=classnames,
                                      templates=templates, device=device)
        feats = S.extract(sm, data, **kw)
        scores = scorer(feats)
    except (ValueError, FileNotFoundError) as exc:
        raise usage_or_data_error(exc) from None
    if out_path:
        np.savez(out_path, scores=scores, labels=feats["labels"].numpy(), keys=np.array(feats["keys"]), score=score_name)
    q = np.percentile(scores, [5, 50, 95])
    click.echo(json.dumps({"score": score_name, **desc, "n": int(scores.size), "mean": float(scores.mean()),
                           "p5": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "out": out_path}))


@ood.command("eval", context_settings=CTX)
@click.option("--checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Score this checkpoint (else give --id-scores and --ood-scores).")
@click.option("--model", "model_name", default=None, help="Architecture of a plain state dict (image-text checkpoints).")
@click.option("--train-data", default=None, help="In-distribution training shards (fits mahalanobis, knn, msp).")
@click.option("--train-num-samples", type=click.IntRange(min=1), default=None, help="Use only the first N training samples for fitting.")
@click.option("--id-data", default=None, help="In-distribution test shards.")
@click.option("--ood-data", multiple=True, help="OOD shards; repeat for several sets (the average is reported too).")
@click.option("--ood-name", multiple=True, help="A name per --ood-data / --ood-scores [default: the shards' directory name].")
@click.option("--score", "scores", type=_SCORE_CHOICE, multiple=True, help="Scores to compute (repeatable) [default: mahalanobis].")
@click.option("--mahalanobis-form", type=click.Choice(["official", "corrected"]), default="official", show_default=True)
@click.option("--knn-k", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--knn-backend", type=click.Choice(["auto", "faiss", "torch"]), default="auto", show_default=True)
@click.option("--mcm-temperature", type=click.FloatRange(min=0, min_open=True), callback=finite, default=1.0, show_default=True)
@click.option("--classnames", "classnames_file", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--templates", "templates_file", default=None, type=click.Path(exists=True, dir_okay=False))
@click.option("--id-scores", default=None, type=click.Path(exists=True, dir_okay=False), help="Precomputed ID scores (.npz from `ood score`, .npy or text).")
@click.option("--ood-scores", multiple=True, type=click.Path(exists=True, dir_okay=False), help="Precomputed OOD scores (repeatable).")
@click.option("--aupr", type=click.Choice(["average_precision", "trapezoid"]), default="average_precision", show_default=True,
              help="AUPR definition: average precision, or the official code's trapezoid curve.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--out", "out_dir", default=None, help="Where results.jsonl and ood-<ckpt>.png go [default: the run directory].")
@click.option("--no-plot", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(checkpoint, model_name, train_data, train_num_samples, id_data, ood_data, ood_name, scores, mahalanobis_form,
             knn_k, knn_backend, mcm_temperature, classnames_file, templates_file, id_scores, ood_scores, aupr, batch_size,
             workers, device, out_dir, no_plot, as_json) -> None:
    """FPR95, AUROC, AUPR-in/out and detection error of ID vs OOD sets; writes results.jsonl and a PNG
    (score histograms and ROC curves)."""
    from pyprotoclip.ood import score as S

    try:
        if checkpoint:
            if not id_data or not ood_data:
                raise ValueError("id-data/ood-data: scoring a checkpoint needs --id-data and at least one --ood-data")
            out = S.run_eval(checkpoint, id_data=id_data, ood_data=list(ood_data), train_data=train_data,
                             scores=list(scores) or ["mahalanobis"], ood_names=list(ood_name) or None, model_name=model_name,
                             train_num_samples=train_num_samples, batch_size=batch_size, workers=workers,
                             device=_device(device), aupr=aupr, out_dir=out_dir, plot=not no_plot,
                             classnames_file=classnames_file, templates_file=templates_file,
                             mahalanobis_form=mahalanobis_form, knn_k=knn_k, knn_backend=knn_backend,
                             mcm_temperature=mcm_temperature)
        elif id_scores and ood_scores:
            out = S.eval_score_files(id_scores, list(ood_scores), ood_names=list(ood_name) or None, aupr=aupr,
                                     out_dir=out_dir or ".", plot=not no_plot)
        else:
            raise ValueError("checkpoint: give --checkpoint (with --id-data, --ood-data) or --id-scores and --ood-scores")
    except (ValueError, FileNotFoundError) as exc:
        raise usage_or_data_error(exc) from None
    if as_json:
        click.echo(json.dumps(out["metrics"], indent=1))
    else:
        click.echo(S.format_table(out["metrics"]))
        click.echo(f"results: {out['results']}" + (f"  plot: {out['plot']}" if out.get("plot") else ""))
