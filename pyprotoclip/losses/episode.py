"""ProtoCLIP's episode: extract the episode's features, cluster them, translate the prototypes (PBT).

Every rank holds the features of its own block of episode positions only. k-means runs sharded (each rank
assigns its points; sums, counts and objective are all-reduced), Prototypical Back Translation is one
scatter-add per modality with all-reduced sums and counts, so every rank ends with identical prototypes
and the labels of its own samples. Nothing goes through files.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping

import torch

from pyprotoclip import distributed as pdist
from pyprotoclip.cluster import KMeans


@dataclasses.dataclass
class Clusters:
    """k-means of one modality over the episode: centroids (K, d) on every rank, this rank's labels (E_r,)."""

    centroids: torch.Tensor
    labels: torch.Tensor
    history: list[float]
    seconds: float


def cluster(features: torch.Tensor, k: int, *, iters: int, redo: int, seed: int) -> Clusters:
    """k-means as the official code runs faiss: L2, random init from the data, exactly ``iters`` iterations
    (no early stop), ``redo`` restarts keeping the lowest objective, then every point labelled.
    ``features``: this rank's (E_r, d) rows; the fit is over all ranks' rows."""
    t0 = time.perf_counter()
    km = KMeans(k, n_iter=iters, metric="l2", init="random", n_redo=redo, seed=seed, tol=None).fit(features)
    return Clusters(km.centroids_.float(), km.labels_, list(km.history_), time.perf_counter() - t0)


def translate(features: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypical Back Translation: (means (K, d), counts (K,)) of ``features`` (E_r, d) over the clusters
    ``labels`` (E_r,) of the other modality, summed over all ranks; an empty cluster is a zero row.
    Not renormalised (the spec). One scatter-add and one all-reduce."""
    d = features.shape[1]
    packed = torch.zeros((k, d + 1), dtype=torch.float32, device=features.device)
    packed[:, :d].index_add_(0, labels, features.float())
    packed[:, d].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float32))
    pdist.all_reduce_sum(packed)
    counts = packed[:, d]
    means = packed[:, :d] / counts.clamp_min(1.0)[:, None]
    return means, counts


def usage(counts: torch.Tensor) -> dict[str, float]:
    """Prototype usage from cluster sizes (K,): empty clusters, entropy of the size distribution (nats) and
    its exponential (the number of equally used clusters it corresponds to)."""
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"empty_clusters": int((counts == 0).sum()), "cluster_entropy": entropy, "effective_clusters": math.exp(entropy)}


@torch.no_grad()
def extract(model: torch.nn.Module, loader, *, device: torch.device, autocast: Callable[[], Any], log=None,
            every_s: float = 30.0) -> dict[str, torch.Tensor]:
    """Run the model (eval mode, no grad) over ``loader`` (this rank's episode block, in position order).

    Returns {"image", "text"}: the prototype-space features (E_r, d_h) fp32, {"image_emb_sum", "text_emb_sum"}:
    sums of the towers' normalised embeddings (for the modality gap), and "index" (E_r,): the sample numbers read.
    """
    was_training = model.training
    model.eval()
    out: dict[str, list[torch.Tensor]] = {"image": [], "text": [], "index": []}
    sums = {"image_emb_sum": 0.0, "text_emb_sum": 0.0}
    t0 = last = time.time()
    done = 0
    try:
        for batch in loader:
            with autocast():
                o = model(batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True))
            out["image"].append(o["image_proto_features"].float())
            out["text"].append(o["text_proto_features"].float())
            out["index"].append(batch["index"].to(device))
            sums["image_emb_sum"] = sums["image_emb_sum"] + o["image_features"].float().sum(0)
            sums["text_emb_sum"] = sums["text_emb_sum"] + o["text_features"].float().sum(0)
            done += batch["index"].numel()
            if log is not None and time.time() - last > every_s:
                last = time.time()
                rate = done / max(last - t0, 1e-9)
                log.info("episode: extracting features %d/%d samples on this process (%.0f samples/s, ETA %.0f s)",
                         done, loader.num_samples, rate, (loader.num_samples - done) / max(rate, 1e-9))
    finally:
        model.train(was_training)
    result = {k: torch.cat(v) for k, v in out.items()}
    result.update({k: torch.as_tensor(v, device=device) for k, v in sums.items()})
    return result


def modality_gap(image_emb_sum: torch.Tensor, text_emb_sum: torch.Tensor, count: int) -> float:
    """|mean(z^I) - mean(z^T)| of normalised embeddings over all ranks' ``count`` samples."""
    packed = torch.stack([image_emb_sum, text_emb_sum]).float()
    pdist.all_reduce_sum(packed)
    return float((packed[0] - packed[1]).norm() / max(count, 1))


STATE_KEYS = ("episode", "ids", "image_labels", "text_labels", "external_labels", "image_centroids", "text_centroids",
              "image_prototypes", "text_prototypes", "image_external_prototypes", "text_external_prototypes",
              "spool_digest")


@dataclasses.dataclass
class EpisodeState:
    """The prototypes and labels of the current episode (what the loss reads), saved in the checkpoint.

    ids: (E,) sample numbers of the draw (None for streaming shards' shard-level draw, whose samples this rank's
    spool holds: ``spool_digest`` identifies them). *_labels: (E_r,) int64 cluster of each of this rank's positions.
    *_centroids: (K, d_h) the k-means centroids (the soft targets' teacher side). *_prototypes: the student
    prototypes, ``image_prototypes`` = image-space means over the text clusters (PBT; the text centroids
    without PBT), ``text_prototypes`` the other way; *_external_prototypes: both spaces' means over the
    external teacher's clusters (labels ``external_labels``). ``episode`` = -1 before the first.
    """

    episode: int = -1
    ids: torch.Tensor | None = None
    image_labels: torch.Tensor | None = None
    text_labels: torch.Tensor | None = None
    external_labels: torch.Tensor | None = None
    image_centroids: torch.Tensor | None = None
    text_centroids: torch.Tensor | None = None
    image_prototypes: torch.Tensor | None = None
    text_prototypes: torch.Tensor | None = None
    image_external_prototypes: torch.Tensor | None = None
    text_external_prototypes: torch.Tensor | None = None
    spool_digest: str | None = None

    @property
    def has_prototypes(self) -> bool:
        return self.image_prototypes is not None

    def state_dict(self) -> dict[str, Any]:
        return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in ((k, getattr(self, k)) for k in STATE_KEYS)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in STATE_KEYS:
            setattr(self, k, state.get(k))

    def to(self, device: torch.device) -> "EpisodeState":
        for k in STATE_KEYS:
            v = getattr(self, k)
            if isinstance(v, torch.Tensor):
                setattr(self, k, v.to(device))
        return self
