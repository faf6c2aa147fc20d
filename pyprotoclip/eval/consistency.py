"""Consistency of image-space and text-space reasoning on a labelled set (CyCLIP, arXiv 2205.14459).

The CyCLIP paper measures how often predictions made in the image space and in the text space
agree. Its text could not be consulted when this was written (only the abstract and the start of the
introduction were reachable offline), so the two scores are defined here explicitly:

* **cross-modal consistency@k** - the fraction of labelled test images whose zero-shot prediction
  (image -> class prompts, a cross-modal comparison: argmax_c <u(x), w_c>) equals their image -> image
  k-nearest-neighbour prediction (majority vote over the labels of the k most cosine-similar
  reference images). This is the score of the official analysis code (goel-shashank/CyCLIP,
  ``utils/consistency.py``, deleted in commit f740441; its numbers are the paper's consistency plot:
  Top-1/3/5/10 on CIFAR-10/100 and ImageNet1K), including its tie rule: on a tied vote k is lowered
  by one until one label wins outright.
* **in-modal consistency@k** - pyprotoclip's counterpart for in-modal reasoning, not in the official
  code: the fraction of labelled test samples whose caption's text -> text kNN prediction (the k
  most similar reference captions) equals their image's image -> image kNN prediction, both voting
  over the same reference labels. If image-image similarities equal text-text similarities
  (CyCLIP's in-modal regulariser at 0) the two neighbour sets coincide and the score is 1.

Also reported: ``image_knn_top1@k``, the kNN classifier's accuracy (the official script prints it
too). The reference set is a separate labelled set when given (the official code uses 50k ImageNet
training images); otherwise it is the test set itself, leave-one-out (a sample is never its own
neighbour). Scores are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

DEFAULT_KS = (1, 5)


def _vote(neighbour_labels: torch.Tensor, k: int, num_classes: int) -> torch.Tensor:
    """Majority label of the first k columns of (n, >=k) labels; a tie lowers k until one label wins."""
    n = neighbour_labels.shape[0]
    pred = torch.full((n,), -1, dtype=torch.long, device=neighbour_labels.device)
    undecided = torch.ones(n, dtype=torch.bool, device=neighbour_labels.device)
    for kk in range(k, 0, -1):
        counts = F.one_hot(neighbour_labels[:, :kk], num_classes).sum(dim=1)  # (n, C)
        top = counts.max(dim=1)
        unique = (counts == top.values[:, None]).sum(dim=1) == 1
        take = undecided & unique
        pred[take] = top.indices[take]
        undecided &= ~take
        if not bool(undecided.any()):
            break
    return pred


def knn_predict(
    queries: torch.Tensor,
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    ks: Sequence[int] = (1,),
    *,
    leave_one_out: bool = False,
    batch_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """{k: (n,) int64} kNN predictions of ``queries`` (n, D) among ``reference`` (m, D) by cosine
    similarity, unweighted majority vote over ``reference_labels`` (m,) in [0, C) with the official
    tie rule. ``leave_one_out``: queries are the reference rows themselves, each excluded from its own
    neighbours. k is capped at the number of candidate neighbours. Memory O(batch_size * m)."""
    if queries.ndim != 2 or reference.ndim != 2 or queries.shape[1] != reference.shape[1]:
        raise ValueError(f"reference: expected (m, {queries.shape[-1]}) to match queries {tuple(queries.shape)}, got {tuple(reference.shape)}")
    if reference_labels.shape != (reference.shape[0],):
        raise ValueError(f"reference_labels: expected shape ({reference.shape[0]},), got {tuple(reference_labels.shape)}")
    if leave_one_out and queries.shape[0] != reference.shape[0]:
        raise ValueError("queries: leave_one_out needs the queries to be the reference rows")
    candidates = reference.shape[0] - int(leave_one_out)
    if candidates < 1 or not ks or min(ks) < 1:
        raise ValueError(f"ks: expected k >= 1 and at least one neighbour candidate, got ks={tuple(ks)} with {candidates} candidates")
    kmax = min(max(ks), candidates)
    q = F.normalize(queries.float(), dim=-1)
    r = F.normalize(reference.float(), dim=-1)
    labels = reference_labels.long()
    num_classes = int(labels.max()) + 1
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, q.shape[0], batch_size):
        sims = q[start : start + batch_size] @ r.t()
        if leave_one_out:
            rows = torch.arange(sims.shape[0], device=sims.device)
            sims[rows, rows + start] = float("-inf")
        neighbours = labels[sims.topk(kmax, dim=1).indices]  # (b, kmax), most similar first
        for k in ks:
            out[k].append(_vote(neighbours, min(k, kmax), num_classes))
    return {k: torch.cat(v) for k, v in out.items()}


def consistency_scores(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    labels: torch.Tensor,
    *,
    classifier: torch.Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """In-modal and cross-modal consistency@k (module docstring) over the labelled rows (label >= 0).

    image_features, text_features: (N, D) test embeddings (row i: image i and its caption; normalised
    or not). labels: (N,) int64, -1 = unlabelled (left out). classifier: (D, C) zero-shot class
    embeddings (:func:`pyprotoclip.eval.zeroshot.build_classifier`); without it the cross-modal score
    is not computed. reference: {"image_features", "text_features", "labels"} of a labelled reference
    set; default: the test set, leave-one-out.

    Returns {"crossmodal_consistency@k", "inmodal_consistency@k", "image_knn_top1@k"} for each k.
    """
    keep = labels >= 0
    if int(keep.sum()) < 1:
        raise ValueError("labels: no sample has a class label (all -1); consistency needs labelled data")
    img, txt, y = image_features[keep].float(), text_features[keep].float(), labels[keep].long()
    if reference is None:
        ref_img, ref_txt, ref_y, loo = img, txt, y, True
    else:
        ref_keep = reference["labels"] >= 0
        ref_img = reference["image_features"][ref_keep].float()
        ref_txt = reference["text_features"][ref_keep].float()
        ref_y, loo = reference["labels"][ref_keep].long(), False
    image_knn = knn_predict(img, ref_img, ref_y, ks, leave_one_out=loo)
    text_knn = knn_predict(txt, ref_txt, ref_y, ks, leave_one_out=loo)
    out: dict[str, float] = {}
    zeroshot = None
    if classifier is not None:
        if classifier.ndim != 2 or classifier.shape[0] != img.shape[1]:
            raise ValueError(f"classifier: expected shape ({img.shape[1]}, C), got {tuple(classifier.shape)}")
        zeroshot = (F.normalize(img, dim=-1) @ classifier.float().to(img.device)).argmax(dim=1)
    for k in ks:
        if zeroshot is not None:
            out[f"crossmodal_consistency@{k}"] = float((zeroshot == image_knn[k]).float().mean())
        out[f"inmodal_consistency@{k}"] = float((text_knn[k] == image_knn[k]).float().mean())
        out[f"image_knn_top1@{k}"] = float((image_knn[k] == y).float().mean())
    return out
