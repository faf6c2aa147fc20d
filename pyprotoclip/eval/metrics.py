"""The one metrics function: a model and a loader in, every evaluation metric out.

Both ``pyprotoclip eval`` and the validation during training call :func:`evaluate_model`, so a
number means the same thing wherever it is printed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from pyprotoclip.eval.clustering import clustering_scores, modality_gap
from pyprotoclip.eval.consistency import DEFAULT_KS as CONSISTENCY_KS
from pyprotoclip.eval.consistency import consistency_scores
from pyprotoclip.eval.features import extract_features, unwrap
from pyprotoclip.eval.linear_probe import linear_probe as fit_linear_probe
from pyprotoclip.eval.linear_probe import linear_probe_train_test
from pyprotoclip.eval.retrieval import retrieval_recall
from pyprotoclip.eval.zeroshot import build_classifier, zeroshot_classify


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor, batch_size: int) -> float:
    """Mean CLIP loss over consecutive batches of ``batch_size`` pairs (as a validation loss is usually
    reported: in-batch negatives only). Features (N, d), normalised here; scale: exp(logit_scale)."""
    from pyprotoclip.ops import infonce_loss

    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    total = 0.0
    for i in range(0, len(img), batch_size):
        total += float(infonce_loss(img[i : i + batch_size], txt[i : i + batch_size], scale)) * len(img[i : i + batch_size])
    return total / len(img)


def evaluate_model(
    model: torch.nn.Module,
    loader,
    *,
    tokenizer: Callable[[list[str]], torch.Tensor],
    device: str | torch.device = "cpu",
    autocast: Callable[[], Any] | None = None,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    linear_probe: bool = False,
    probe_test_fraction: float = 0.5,
    probe_c: float | None = None,
    probe_train: dict[str, Any] | None = None,
    probe_relabel: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    loss_batch_size: int | None = None,
    seed: int = 0,
    consistency_ks: Sequence[int] = CONSISTENCY_KS,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Extract features over ``loader`` and compute the metrics the data allows.

    Always: retrieval recall@1/5/10 both ways and their mean, and the modality gap. With labels: k-means
    of the image embeddings with K = the number of classes (ARI, AMI). With ``loss_batch_size``: the CLIP loss
    over batches of that size (``val_loss``). With class names and templates and labelled samples:
    zero-shot top-1/top-5 (prompt ensembling). With ``linear_probe``: logistic regression on frozen
    image features: fitted on ``probe_train`` ({"image_features", "labels"} of a training split, C chosen
    on a held-out part of it unless ``probe_c``) and tested on the loader's samples, or without it on a
    stratified split of the loader's samples (``probe_test_fraction`` held out, C = ``probe_c`` or 1).
    Retrieval counts any caption with the same text as correct when the batches carry captions. With labelled samples:
    CyCLIP's in-modal and (with zero-shot) cross-modal consistency@k for k in ``consistency_ks``
    (:mod:`pyprotoclip.eval.consistency`; kNN leave-one-out within the evaluated set).
    Returns (metrics: name -> number, details: {"features", "zeroshot" (pred/target) when run,
    "skipped": one line per metric the data did not allow, with the reason}).
    """
    net = unwrap(model)
    feats = extract_features(net, loader, device=device, autocast=autocast, progress=progress)
    metrics: dict[str, Any] = {"num_samples": int(feats["image_features"].shape[0])}
    stats = loader.stats() if hasattr(loader, "stats") else None
    if stats and "bad_samples" in stats:  # skipped samples are part of the answer: say how many
        metrics["bad_samples"] = int(stats["bad_samples"])
        metrics["damaged_shards"] = int(stats.get("bad", {}).get("bad_shard", 0))
    details: dict[str, Any] = {"features": feats}
    if loss_batch_size:
        scale = net.logit_scale.exp().detach().float().cpu()
        metrics["val_loss"] = contrastive_loss(feats["image_features"], feats["text_features"], scale, loss_batch_size)
    n = metrics["num_samples"]
    captions = feats["captions"] if len(feats.get("captions") or ()) == n else None
    metrics.update(retrieval_recall(feats["image_features"], feats["text_features"], captions=captions))
    metrics["modality_gap"] = modality_gap(feats["image_features"], feats["text_features"])
    labels = feats["labels"]
    labelled = bool((labels >= 0).any())
    skipped: list[str] = []
    details["skipped"] = skipped
    if not labelled:
        skipped.append("zero-shot and linear probe (no sample has a class label)")
    elif classnames is None or templates is None:
        skipped.append("zero-shot (no class names / templates)")
    if int(torch.unique(labels[labels >= 0]).numel()) >= 2 and int((labels >= 0).sum()) > int(torch.unique(labels).numel()):
        metrics.update(clustering_scores(feats["image_features"], labels, seed=seed))
    if classnames is not None and templates is not None and labelled:
        if int(labels.max()) >= len(classnames):
            raise ValueError(f"classnames: the data has label {int(labels.max())} but only {len(classnames)} class names were given")
        with torch.no_grad(), (autocast or contextlib.nullcontext)():
            w = build_classifier(lambda t: net.encode_text(t), tokenizer, classnames, templates, device=device)
        zs = zeroshot_classify(feats["image_features"].to(w.device), labels.to(w.device), w)
        metrics.update(zeroshot_top1=zs["top1"], zeroshot_top5=zs["top5"], num_classes=len(classnames),
                       num_templates=len(templates))
        details["zeroshot"] = zs
    if consistency_ks and int((labels >= 0).sum()) >= 2:
        metrics.update(consistency_scores(feats["image_features"], feats["text_features"], labels, ks=consistency_ks,
                                          classifier=w if "zeroshot" in details else None))
    if linear_probe and labelled:
        if probe_train is not None:
            # probe_relabel(evaluation labels): the training labels in the evaluation set's numbering, or None if they agree
            train_labels = probe_relabel(labels) if probe_relabel is not None else None
            probe = linear_probe_train_test(probe_train["image_features"],
                                            probe_train["labels"] if train_labels is None else train_labels,
                                            feats["image_features"], labels, C=probe_c, seed=seed)
        elif len(torch.unique(labels[labels >= 0])) < 2:
            probe = None
            skipped.append("linear probe (the evaluation data has a single class; give a training split)")
        else:
            probe = fit_linear_probe(feats["image_features"], labels, test_fraction=probe_test_fraction, seed=seed,
                                     C=1.0 if probe_c is None else probe_c)
        if probe is not None:
            metrics.update(linear_probe_top1=probe["top1"], linear_probe_train_top1=probe["train_top1"],
                           linear_probe_num_train=probe["num_train"], linear_probe_num_test=probe["num_test"],
                           linear_probe_c=probe["C"], linear_probe_protocol=probe["protocol"])
            if probe_train is not None:
                metrics.update(linear_probe_train_classes=probe["num_classes"],
                               linear_probe_missing_classes=probe["missing_classes"],
                               linear_probe_num_test_missing=probe["num_test_missing"])
            if "c_sweep" in probe:
                metrics["linear_probe_c_sweep"] = {f"{c:g}": acc for c, acc in probe["c_sweep"].items()}
    return metrics, details
