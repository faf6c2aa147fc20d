"""Zero-shot classification with prompt ensembling (CLIP paper, section 3.1.4)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def build_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings W (D, C): for class c, the renormalised mean of the normalised text
    embeddings of every template with "{}" replaced by the class name.

    encode_text: token ids (n, L) -> features (n, D), normalised or not.
    """
    if not classnames:
        raise ValueError("classnames: expected at least one class name, got none")
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("templates: expected at least one template, each containing '{}'")
    prompts = [t.replace("{}", c) for c in classnames for t in templates]
    feats = []
    for i in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[i : i + batch_size]).to(device)
        feats.append(F.normalize(encode_text(tokens).float(), dim=-1))
    emb = torch.cat(feats).view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(emb, dim=-1).t().contiguous()


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Logits 100 * normalise(image_features) @ W: image_features (N, D), classifier (D, C) -> (N, C)."""
    if image_features.ndim != 2 or classifier.ndim != 2 or image_features.shape[1] != classifier.shape[0]:
        raise ValueError(
            f"classifier: expected shape (D, C) with D = image_features.shape[1] = "
            f"{image_features.shape[-1]}, got {tuple(classifier.shape)}"
        )
    return 100.0 * F.normalize(image_features.float(), dim=-1) @ classifier.float()


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits, for each k (k capped at C).

    logits: (N, C). labels: (N,) int64 in [0, C). Ties are broken by torch.topk's order.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"labels: expected shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits: expected at least one row")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels: expected values in [0, {logits.shape[1]}), got [{int(labels.min())}, {int(labels.max())}]")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (N, kmax)
    hit = top == labels[:, None]
    n = hit.shape[0]
    return {f"top{k}": int(hit[:, : min(k, kmax)].any(dim=1).sum()) / n for k in ks}


def zeroshot_classify(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict:
    """Top-1/top-5 accuracy and predictions for labelled rows (label >= 0).

    Returns {"top1", "top5", "num_samples", "pred" (n,), "target" (n,)}.
    """
    keep = labels >= 0
    if not bool(keep.any()):
        raise ValueError("labels: no sample has a class label (all -1); zero-shot needs labelled data")
    logits = zeroshot_logits(image_features[keep], classifier)
    target = labels[keep]
    out = topk_accuracy(logits, target, (1, 5))
    out.update(num_samples=int(keep.sum()), pred=logits.argmax(dim=1), target=target)
    return out
