"""ProtoCLIP (arXiv 2206.10996): prototype-level discrimination over episodes, Prototypical Back Translation
and an external teacher, on top of the CLIP loss.

Per episode (``--clustering-frequency`` epochs over E samples drawn with replacement): extract the
episode's prototype-space features, k-means them per modality, translate the prototypes (PBT). Per step:

    L = w_clip L_clip + w_proto 1/2 (L_i<-t + L_t<-i) + w_ext 1/2 (L_i<-e + L_t<-e)

where each L_a<-b is a cross-entropy of s_p <h_a, P_k> (s_p = exp(logit_scale_proto)) against the
sample's cluster in modality b: soft targets softmax_k(<C_y, C_k> / --target-temperature) or, at a
temperature <= 0 and always for the external teacher, hard labels. Through ``ops.proto_cross_entropy``:
never an N x K matrix. Each rank takes the mean over its own B rows, so DDP's average is exactly the
single-process gradient (the official code's tower gradients are 1/W of it).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from pyprotoclip.losses import episode as ep
from pyprotoclip.losses.base import EpochContext, LoaderRequest, Method, StepContext
from pyprotoclip.losses.cyclip import add_cyclic_terms, check_cyclic_weights, cyclic_weights
from pyprotoclip.losses.registry import register_method
from pyprotoclip.models.extended import ExtendedModel
from pyprotoclip.models.heads import projection_head
from pyprotoclip.ops import infonce_loss, proto_assign, proto_cross_entropy

LOG_1_OVER_007 = math.log(1 / 0.07)


class ProtoCLIPModel(ExtendedModel):
    """The open_clip model plus ProtoCLIP's projection heads and prototype scale.

    forward(image, text) -> the CLIP outputs (``image_features``, ``text_features`` normalised,
    ``logit_scale``) plus ``image_proto_features``, ``text_proto_features`` (B, d_h) normalised head
    outputs of the *unnormalised* tower embeddings (without heads: the normalised embeddings) and
    ``logit_scale_proto`` = exp(t_p), t_p initialised to ln(1/0.07). The image head starts as an exact
    copy of the text head. Evaluation uses the towers (``encode_image`` / ``encode_text``).
    """

    def __init__(self, base: torch.nn.Module, *, heads: bool, dim: int = 128, hidden: int = 2048, layers: int = 1) -> None:
        super().__init__(base)
        if heads:
            embed = int(base.visual.output_dim)  # both towers' embedding width
            device = next(base.parameters()).device
            self.text_projection_head = projection_head(embed, dim, hidden, layers).to(device)
            self.image_projection_head = projection_head(embed, dim, hidden, layers).to(device)
            self.image_projection_head.load_state_dict(self.text_projection_head.state_dict())
        self.heads = heads
        self.logit_scale_proto = torch.nn.Parameter(torch.tensor(LOG_1_OVER_007, device=self.logit_scale.device))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        z_image = self.encode_image(image)
        z_text = self.encode_text(text)
        out = {"image_features": F.normalize(z_image, dim=-1), "text_features": F.normalize(z_text, dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.heads:
            out["image_proto_features"] = F.normalize(self.image_projection_head(z_image), dim=-1)
            out["text_proto_features"] = F.normalize(self.text_projection_head(z_text), dim=-1)
        else:
            out["image_proto_features"], out["text_proto_features"] = out["image_features"], out["text_features"]
        out["logit_scale_proto"] = self.logit_scale_proto.exp()
        return out


class ProtoLoss(torch.nn.Module):
    """One prototype term: mean over rows i of -sum_k q_ik log softmax_k(s_p <h_i, P_k>).

    features h (B, d), prototypes P (K, d), scale s_p (0-d, exponentiated, may require grad), labels (B,)
    int64 in [0, K). Soft targets q_i = softmax_k(<C_{y_i}, C_k> / target_temperature) from
    ``teacher_centroids`` C (K, d_t) when target_temperature > 0 (computed inside the fused op, never
    B x K); else one-hot(y_i). Only h and s_p get gradients.
    """

    def __init__(self, target_temperature: float = 0.01) -> None:
        super().__init__()
        self.target_temperature = float(target_temperature)

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                teacher_centroids: torch.Tensor | None = None) -> torch.Tensor:
        prototypes = prototypes.detach().to(features.dtype)
        temperature = 1.0 / scale
        if self.target_temperature > 0 and teacher_centroids is not None:
            c = teacher_centroids.detach().float()
            return proto_cross_entropy(features, prototypes, temperature, teacher_features=c[labels],
                                       teacher_prototypes=c, teacher_temperature=self.target_temperature)
        return proto_cross_entropy(features, prototypes, temperature, target=labels)


@torch.no_grad()
def _accuracy(features: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose most similar prototype is their label (top-1 without a B x K matrix)."""
    _, idx = proto_assign(features.detach(), prototypes.detach().to(features.dtype), 1.0, topk=1)
    return (idx[:, 0] == labels).float().mean()


class ProtoCLIPLoss(torch.nn.Module):
    """The total ProtoCLIP loss; reads the current episode's prototypes and labels from ``method.state``.

    Terms: contrastive_loss; with prototypes, proto_loss_image (L_i<-t), proto_loss_text (L_t<-i), proto_loss,
    proto_accuracy_image, proto_accuracy_text; with the external teacher proto_loss_external_image,
    proto_loss_external_text, proto_loss_external; with --cylambda1/2 > 0 CyCLIP's inmodal_cyclic_loss and
    crossmodal_cyclic_loss; and "loss". Which terms are on depends on the epoch
    (--infonce-warmup-epoch, --lit-start-epoch): ``ProtoCLIPMethod.loss_weights``.
    """

    def __init__(self, method: "ProtoCLIPMethod") -> None:
        super().__init__()
        self.method = method
        self.proto = ProtoLoss(method.params["target_temperature"])
        self.external = ProtoLoss(0.0)
        self.cylambda = cyclic_weights(method.params, 0.0)  # --cylambda1/2: CyCLIP's terms on top, off by default

    def forward(self, outputs: Mapping[str, Any], *, step_context: StepContext) -> dict[str, torch.Tensor]:
        w_clip, w_proto, w_ext = self.method.loss_weights(step_context.epoch)
        clip = infonce_loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"],
                            group=step_context.group)
        terms: dict[str, torch.Tensor] = {"contrastive_loss": clip}
        total = w_clip * clip
        st = self.method.state
        if (w_proto or w_ext) and st.has_prototypes:
            local = step_context.batch["episode_pos"].to(clip.device) - self.method.block_start
            h_i, h_t, s_p = outputs["image_proto_features"], outputs["text_proto_features"], outputs["logit_scale_proto"]
            if w_proto:
                y_t, y_i = st.text_labels[local], st.image_labels[local]
                l_it = self.proto(h_i, st.image_prototypes, s_p, y_t, st.text_centroids)
                l_ti = self.proto(h_t, st.text_prototypes, s_p, y_i, st.image_centroids)
                terms.update(proto_loss_image=l_it, proto_loss_text=l_ti, proto_loss=0.5 * (l_it + l_ti),
                             proto_accuracy_image=_accuracy(h_i, st.image_prototypes, y_t),
                             proto_accuracy_text=_accuracy(h_t, st.text_prototypes, y_i))
                total = total + w_proto * terms["proto_loss"]
            if w_ext and st.external_labels is not None:
                y_e = st.external_labels[local]
                l_ie = self.external(h_i, st.image_external_prototypes, s_p, y_e)
                l_te = self.external(h_t, st.text_external_prototypes, s_p, y_e)
                terms.update(proto_loss_external_image=l_ie, proto_loss_external_text=l_te,
                             proto_loss_external=0.5 * (l_ie + l_te))
                total = total + w_ext * terms["proto_loss_external"]
        total = total + add_cyclic_terms(terms, outputs["image_features"], outputs["text_features"], *self.cylambda,
                                         group=step_context.group)
        terms["loss"] = total
        return terms


def _is_visual(name: str) -> bool:
    return "visual" in name


def _streams(shards: list[str]) -> bool:
    from pyprotoclip.data.pipeline import _is_url  # the data layer's one rule of what streams

    return any(_is_url(s) for s in shards)


@register_method
class ProtoCLIPMethod(Method):
    name = "protoclip"
    summary = "ProtoCLIP: episodes of k-means prototypes, PBT, external teacher"
    scales = ("logit_scale", "logit_scale_proto")

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__(params)
        self.state = ep.EpisodeState()
        self.block_start = 0
        self.steps_per_epoch = 0
        self._index = None
        self._shards: list[str] | None = None
        self._streaming: bool | None = None
        self._spool: tuple[int, Any] | None = None  # (episode, SpooledEpisode) with streaming shards
        self._slow_group = None  # gloo, long timeout: agreeing after work whose length differs between ranks
        self._teacher: torch.Tensor | None = None
        self._teacher_episode: int | None = None  # streaming shards: the episode whose spool _teacher covers
        self._last_episode_end: float | None = None

    # ---- flags -------------------------------------------------------------------------------------------

    @classmethod
    def check_params(cls, p: Mapping[str, Any]) -> None:
        for key, low in (("num_prototypes", 1), ("kmeans_max_iter", 1), ("kmeans_nredo", 1), ("clustering_frequency", 1),
                         ("episode_size", 0), ("projection_dim", 1), ("projection_hidden_dim", 1),
                         ("projection_n_layers", 0), ("text_start_epoch", 0), ("infonce_warmup_epoch", 0),
                         ("external_teacher_dim", 0)):
            if not isinstance(p[key], int) or p[key] < low:
                raise ValueError(f"{key.replace('_', '-')}: expected an integer >= {low}, got {p[key]!r}")
        for key in ("w_clip", "w_proto", "w_proto_external"):
            if p[key] < 0:
                raise ValueError(f"{key.replace('_', '-')}: expected a weight >= 0, got {p[key]}")
        if p["episode_size"] and p["num_prototypes"] > p["episode_size"]:
            raise ValueError(f"num-prototypes: {p['num_prototypes']} clusters need at least as many samples per episode, "
                             f"--episode-size is {p['episode_size']}")
        if p["external_teacher"]:
            from pyprotoclip.models.teacher import resolve_teacher

            resolve_teacher(p["external_teacher"])
        if p.get("train_data") and not p["episode_size"] and not p.get("train_num_samples"):
            from pyprotoclip.data import expand_shards

            if _streams(expand_shards(p["train_data"], "train-data")):
                raise ValueError("episode-size: streaming shards (pipe:, URLs) have no sample count to size an "
                                 "episode from; give --episode-size or --train-num-samples")
        check_cyclic_weights(p)

    # ---- model, loss, optimiser --------------------------------------------------------------------------

    def build_model(self, model: torch.nn.Module) -> torch.nn.Module:
        p = self.params
        return ProtoCLIPModel(model, heads=p["add_projection_head"], dim=p["projection_dim"],
                              hidden=p["projection_hidden_dim"], layers=p["projection_n_layers"])

    def build_loss(self) -> torch.nn.Module:
        return ProtoCLIPLoss(self)

    def param_groups(self, model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """The official four groups: image tower / everything else, each with and without weight decay
        (none on gains, biases, norm layers, the scales and the projection heads)."""

        def exclude(n: str, p: torch.nn.Parameter) -> bool:
            return p.ndim < 2 or any(s in n for s in ("bn", "ln", "bias", "logit_scale", "projection_head"))

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = []
        for tower in ("visual", "text"):
            mine = [(n, p) for n, p in named if _is_visual(n) == (tower == "visual")]
            groups.append({"name": f"{tower}_no_decay", "params": [p for n, p in mine if exclude(n, p)], "weight_decay": 0.0})
            groups.append({"name": f"{tower}_decay", "params": [p for n, p in mine if not exclude(n, p)],
                           "weight_decay": weight_decay})
        return [g for g in groups if g["params"]]

    def group_lr(self, group: Mapping[str, Any], step: int, epoch: int, schedule) -> float:
        """Image tower: the run's schedule, annealed to 0 by the locked-image stage (--lit-start-epoch) and 0
        in it. Everything else: peak --lr-text, 0 for --text-start-epoch epochs, then its own warm-up."""
        p, spe = self.params, self.steps_per_epoch
        if group["name"].startswith("visual"):
            lit = p["lit_start_epoch"]
            if lit > 0:
                end = spe * (lit - 1)
                return schedule(step, total_steps=end) if step < end else 0.0
            return schedule(step)
        base = p["lr_text"] if p["lr_text"] > 0 else None
        return schedule(step, base_lr=base, start_step=spe * p["text_start_epoch"])

    def loss_weights(self, epoch: int) -> tuple[float, float, float]:
        """(w_clip, w_proto, w_ext) of an epoch: CLIP only in the warm-up and locked-image epochs."""
        p = self.params
        lit = p["lit_start_epoch"]
        if epoch < p["infonce_warmup_epoch"] or (lit > 0 and epoch >= lit - 1):
            return 1.0, 0.0, 0.0
        return p["w_clip"], p["w_proto"], (p["w_proto_external"] if p["external_teacher"] else 0.0)

    # ---- episodes -----------------------------------------------------------------------------------------

    def _shard_list(self) -> list[str]:
        if self._shards is None:
            from pyprotoclip.data import expand_shards

            self._shards = expand_shards(self.params["train_data"], "train-data")
        return self._shards

    @property
    def streaming(self) -> bool:
        """Whether the shards stream only (pipe:, URLs): episodes are then shard-level draws, spooled locally."""
        if self._streaming is None:
            self._streaming = _streams(self._shard_list())
        return self._streaming

    def _agreed(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on every rank, then an agreement on whether any failed (a rank's own error is re-raised, the
        others name it), so that no rank waits in a collective for one that stopped. The agreement runs on a
        gloo group with a long timeout: how long streaming takes differs between ranks."""
        from pyprotoclip import distributed as pdist

        if pdist.is_distributed() and self._slow_group is None:
            import datetime

            import torch.distributed as dist

            self._slow_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
        error: Exception | None = None
        result = None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, once every rank knows
            error = exc
        failed = [r for r, e in enumerate(pdist.gather_object(error is not None, self._slow_group)) if e]
        if error is not None:
            raise error
        if failed:
            from pyprotoclip.data.pipeline import BadDataError

            raise BadDataError(f"train-data: process {failed[0]} stopped: {what} failed there (its log says why)")
        return result

    def _dataset(self):
        """The index of every sample of the (local) shards: episodes draw from it by sample number."""
        if self._index is None:
            from pyprotoclip.data.index import ShardIndex

            self._index = ShardIndex(self._shard_list(), flag="train-data")
        return self._index

    def episode_size(self) -> int:
        p = self.params
        return p["episode_size"] or p["train_num_samples"] or len(self._dataset())

    def _spooled(self, episode: int, rank: int, world: int):
        """This rank's spool of ``episode`` (streaming shards), built once per episode, agreed over the ranks.

        A spool streamed again for an episode whose labels came from the checkpoint must hold the same samples
        (its digest): if the shards changed since, the labels would silently belong to other samples."""
        if self._spool is None or self._spool[0] != episode:
            from pyprotoclip.data.episodes import rank_block
            from pyprotoclip.data.spool import spool_episode

            p = self.params
            start, stop = rank_block(self.episode_size(), rank, world)
            # a run of its own under --episode-cache-dir: spools of other runs there are never touched
            cache = (os.path.join(p["episode_cache_dir"], p["name"]) if p["episode_cache_dir"]
                     else os.path.join(p["logs"], p["name"], "episode-cache"))

            def build():
                spool = spool_episode(self._shard_list(), cache_dir=cache, episode=episode, rank=rank, world_size=world,
                                      seed=p["seed"], num_samples=stop - start, max_bad_fraction=p["max_bad_fraction"])
                st = self.state
                if st.episode == episode and st.spool_digest is not None and st.spool_digest != spool.digest:
                    from pyprotoclip.data.pipeline import BadDataError

                    raise BadDataError(f"train-data: the shards changed since episode {episode} was clustered: streamed "
                                       f"again, this process's share holds other samples, so the checkpoint's cluster "
                                       "labels no longer belong to them; resume from a checkpoint of an earlier "
                                       "episode, or restore the shards")
                return spool

            self._spool = (episode, self._agreed(build, f"spooling episode {episode}"))
        return self._spool[1]

    def _episode_samples(self, episode: int, rank: int, world: int, preprocess, *, purpose: int, epoch: int):
        """(the draw (E,) or None for a shard-level draw, the rank's first position, its EpisodeSamples)."""
        from pyprotoclip.data.episodes import EpisodeSamples, draw_episode, rank_block

        E = self.episode_size()
        start, stop = rank_block(E, rank, world)
        if self.streaming:  # the spool is streamed when the samples are first read, not when a loader is sized
            ids, mine = None, torch.arange(stop - start)
            index = lambda: self._spooled(episode, rank, world)  # noqa: E731
        else:
            index = self._dataset()
            ids = draw_episode(len(index), E, seed=self.params["seed"], episode=episode)
            mine = ids[start:stop]
        return ids, start, EpisodeSamples(index, mine, torch.arange(start, stop), preprocess,
                                          seed=self.params["seed"], purpose=purpose, epoch=epoch)

    def train_loader(self, request: LoaderRequest) -> Any:
        from pyprotoclip.data.episodes import PURPOSE_TRAIN, EpisodeLoader, epoch_order

        p = self.params
        E, W, B = self.episode_size(), request.world_size, p["batch_size"]
        if E // W < B * p["accum_freq"]:
            raise ValueError(f"episode-size: {E} samples over {W} process(es) is fewer than one step of "
                             f"--batch-size {B} x --accum-freq {p['accum_freq']} per process")
        if p["num_prototypes"] > (E // W) * W:
            raise ValueError(f"num-prototypes: {p['num_prototypes']} clusters need at least as many samples per episode "
                             f"(the episode has {(E // W) * W})")
        episode = request.epoch // p["clustering_frequency"]
        _, _, samples = self._episode_samples(episode, request.rank, W, request.preprocess, purpose=PURPOSE_TRAIN,
                                              epoch=request.epoch)
        order = epoch_order(len(samples), seed=p["seed"], epoch=request.epoch, rank=request.rank)
        loader = EpisodeLoader(samples, order, batch_size=B, tokenize=request.tokenize, workers=p["workers"],
                               start_batch=request.start_batch)
        self.steps_per_epoch = loader.num_batches // p["accum_freq"]
        return loader

    def _needs_prototypes(self, episode: int) -> bool:
        f = self.params["clustering_frequency"]
        return any(self.loss_weights(e)[1] or self.loss_weights(e)[2] for e in range(episode * f, (episode + 1) * f))

    def before_epoch(self, ctx: EpochContext) -> None:
        """At the first epoch of an episode: draw it; then, if its epochs use prototypes, extract, cluster, PBT."""
        from pyprotoclip.data.episodes import rank_block

        episode = ctx.epoch // self.params["clustering_frequency"]
        self.block_start = rank_block(self.episode_size(), ctx.rank, ctx.world_size)[0]
        if self.state.episode == episode:
            self.state.to(ctx.device)
            return  # a later epoch of the episode, or resumed inside it: the checkpoint holds its state
        self.state = ep.EpisodeState(episode=episode)
        if self._needs_prototypes(episode):
            self._build_prototypes(ctx, episode)

    def _build_prototypes(self, ctx: EpochContext, episode: int) -> None:
        from pyprotoclip.data.episodes import PURPOSE_EXTRACT, EpisodeLoader

        p, t0 = self.params, time.time()
        K, seed = p["num_prototypes"], p["seed"] * 1_000_003 + episode * 7
        ids, _, samples = self._episode_samples(episode, ctx.rank, ctx.world_size, ctx.preprocess,
                                                purpose=PURPOSE_EXTRACT, epoch=episode)
        row: dict[str, Any] = {}
        spool_digest = None
        if self.streaming:  # this process's share of the shard-level draw, streamed into its spool
            spool = samples.index
            spool_digest = spool.digest
            row.update(spool_s=spool.seconds, spool_draws=len(spool.manifest["draws"]),
                       spool_bad_samples=spool.stats.get("bad_samples", 0))
            ctx.log.info("episode %d: spooled %d samples from %d shard draw(s) in %.1fs (%d bad skipped)", episode,
                         len(samples), row["spool_draws"], row["spool_s"], row["spool_bad_samples"])
        t_start_extract = time.time()
        loader = EpisodeLoader(samples, torch.arange(len(samples)), batch_size=p["batch_size"], tokenize=ctx.tokenize,
                               workers=p["workers"], drop_last=False)
        ctx.log.info("episode %d: extracting the features of %d samples (%d on this process)", episode,
                     self.episode_size(), len(samples))
        feats = ep.extract(ctx.model, loader, device=ctx.device, autocast=ctx.autocast, log=ctx.log)
        t_extract = time.time() - t_start_extract
        image = ep.cluster(feats["image"], K, iters=p["kmeans_max_iter"], redo=p["kmeans_nredo"], seed=seed)
        text = ep.cluster(feats["text"], K, iters=p["kmeans_max_iter"], redo=p["kmeans_nredo"], seed=seed + 1)
        t_pbt = time.time()
        st = ep.EpisodeState(episode=episode, ids=ids, image_labels=image.labels, text_labels=text.labels,
                             image_centroids=image.centroids, text_centroids=text.centroids, spool_digest=spool_digest)
        image_counts = torch.bincount(image.labels, minlength=K).float()
        text_counts = torch.bincount(text.labels, minlength=K).float()
        if p["PBT"]:
            st.image_prototypes, text_counts = ep.translate(feats["image"], text.labels, K)
            st.text_prototypes, image_counts = ep.translate(feats["text"], image.labels, K)
        else:
            st.image_prototypes, st.text_prototypes = text.centroids, image.centroids
            from pyprotoclip import distributed as pdist

            pdist.all_reduce_sum(image_counts)
            pdist.all_reduce_sum(text_counts)
        if p["external_teacher"]:
            external = self._external_clusters(ctx, episode, feats["index"], K, seed + 2)
            st.external_labels = external.labels
            st.image_external_prototypes, ext_counts = ep.translate(feats["image"], external.labels, K)
            st.text_external_prototypes, _ = ep.translate(feats["text"], external.labels, K)
            row.update(kmeans_external_s=external.seconds, objective_external=external.history,
                       **{f"{k}_external": v for k, v in ep.usage(ext_counts).items()})
        self.state = st
        t_end = time.time()
        gap = ep.modality_gap(feats["image_emb_sum"], feats["text_emb_sum"], self.episode_size())
        row.update(type="episode", episode=episode, epoch=ctx.epoch, step=ctx.step, extract_s=t_extract,
                   kmeans_image_s=image.seconds, kmeans_text_s=text.seconds, pbt_s=t_end - t_pbt, total_s=t_end - t0,
                   objective_image=image.history, objective_text=text.history, modality_gap=gap,
                   **{f"{k}_image": v for k, v in ep.usage(image_counts).items()},
                   **{f"{k}_text": v for k, v in ep.usage(text_counts).items()},
                   bad_samples=loader.stats()["bad_total"])
        if self._last_episode_end is not None:
            # the share of wall time since the previous episode's prototypes that building these took
            row["overhead_fraction"] = (t_end - t0) / max(t_end - self._last_episode_end, 1e-9)
        self._last_episode_end = t_end
        ctx.write_result(row)
        ctx.log.info(
            "episode %d: features %.1fs, k-means %.1fs + %.1fs (objective %.4g -> %.4g image, %.4g -> %.4g text), "
            "PBT %.2fs | empty clusters %d image, %d text | modality gap %.3f", episode, t_extract, image.seconds,
            text.seconds, image.history[0], image.history[-1], text.history[0], text.history[-1], t_end - t_pbt,
            row["empty_clusters_image"], row["empty_clusters_text"], gap)

    def _external_clusters(self, ctx: EpochContext, episode: int, index: torch.Tensor, k: int, seed: int) -> ep.Clusters:
        """k-means of the teacher's features of this rank's episode samples (``index``: their sample numbers).
        Local shards: the whole dataset's features, computed once. Streaming shards: the spool's, per episode,
        projected on rank 0's PCA basis so every rank clusters in the same space."""
        if self._teacher is None or (self.streaming and self._teacher_episode != episode):
            from pyprotoclip.models.teacher import teacher_features

            t0, p = time.time(), self.params
            if self.streaming:  # each rank embeds its own spool; one PCA basis (rank 0's) for all
                from pyprotoclip.models.teacher import pca

                spool = self._spooled(episode, ctx.rank, ctx.world_size)
                raw = self._agreed(lambda: teacher_features(spool, p["external_teacher"], dim=0, own_index=True),
                                   "the external teacher")
                self._teacher = pca(raw, p["external_teacher_dim"], seed=p["seed"], shared=True)
            else:
                self._teacher = teacher_features(self._dataset(), p["external_teacher"], dim=p["external_teacher_dim"],
                                                 rank=ctx.rank, world_size=ctx.world_size, seed=p["seed"])
            self._teacher_episode = episode
            ctx.log.info("external teacher: %d x %d features ready in %.1fs", *self._teacher.shape, time.time() - t0)
        feats = self._teacher[index.cpu()].to(ctx.device)
        p = self.params
        return ep.cluster(feats, k, iters=p["kmeans_max_iter"], redo=p["kmeans_nredo"], seed=seed)

    # ---- checkpoint -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:  # on the CPU until before_epoch moves it to the training device
            self.state.load_state_dict(state)
