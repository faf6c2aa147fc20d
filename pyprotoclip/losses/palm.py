"""PALM (Lu et al., ICLR 2024, "Learning with Mixture of Prototypes for Out-of-Distribution Detection"):
a mixture of prototypes per class, assigned by Sinkhorn-Knopp and updated by EMA, trained with an MLE
loss and a prototype contrastive loss, as the official code (jeff024/PALM, ``util/loss_functions.py``)
computes them.

Per step, for features F (n, d) (n = views x batch, view-major, L2-normalised) with labels y, and
prototypes P (C*M, d) where prototype j belongs to class j mod C:

1. Q = sinkhorn(F P^T / eps)                                        (n, C*M), each row sums to 1
2. W = colnorm_L1(rownorm_L1(T * mask(y) * Q)), T = the top-k entries of mask(y) * Q per row
3. P <- normalise(m P + (1 - m) W^T F)                                the EMA update (F not detached)
4. Q' = sinkhorn(F P^T / eps) with the updated P;  L = rownorm_L1(T' * mask(y) * Q'), T' = top-k of W
   L_mle = -mean_i [ sum_j L_ij F_i.P_j / tau - log sum_j exp(F_i.P_j / tau) ]   (P detached)
5. L_pc = -mean_a [ mean_{b != a, same class} l_ab - log sum_{b != a} exp(l_ab) ],
   l_ab = P_a.P_b / 0.5 - max_b(P_a.P_b / 0.5)                      (P: the updated, not detached, prototypes)
   loss = L_mle + lambda_pcon * L_pc

Where the official code's semantics need a matrix, it is formed: Sinkhorn normalises the (n, C*M)
matrix Q itself (global sums over samples and over prototypes, then per-row scalings), and the class
masking and top-k work on Q, so Q, W and L are materialised, (n, C*M) each (C*M = 600 for CIFAR-100:
small); the EMA sums W^T F are one (C*M, n) x (n, d) product, which keeps their gradient path to the
encoder (``ops.kmeans_update`` sums hard nearest-centroid assignments and is not differentiable, so it
cannot give them); the prototype contrastive loss forms its (C*M, C*M) logits. The MLE loss goes through
the fused ``ops.proto_cross_entropy`` with L as soft target, which never forms the logits or their
softmax (the exact official value, also where the official row normalisation leaves a row summing to
less than 1; see :meth:`PALMLoss._mle_loss`).

Across processes (``group``), every sum over samples is all-reduced: the Sinkhorn totals and per-prototype
sums, W's per-prototype column sums and the EMA sums W^T F (differentiably: the backward all-reduces the
gradient, so after DDP's average each rank's encoder gets the single-process gradient). Every rank then
holds bitwise the same prototypes, and they equal the single-process ones on the concatenated batch up to
rounding. Local batches must have equal sizes (the training loader's are).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pyprotoclip import distributed as pdist
from pyprotoclip.ops import checks, proto_cross_entropy

_EPS = 1e-12  # F.normalize's default eps: the official code's L1 normalisations divide by max(sum, 1e-12)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; the backward sums the ranks' gradients (each rank's loss used every rank's rows)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _all_reduce_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if not pdist.is_distributed(group):
        return tensor
    return _AllReduceSumWithGrad.apply(tensor, group)


def _sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``tensor`` (a fresh partial sum) summed over ranks, no gradient."""
    return pdist.all_reduce_sum(tensor, group)


class PALMLoss(torch.nn.Module):
    """The PALM objective with its prototype buffer; calling it updates the prototypes (EMA).

    num_classes C, feat_dim d, prototypes_per_class M (``--cache-size``), topk k (``--k``; 0 keeps all; capped
    at M as the official code does), proto_momentum m (``--proto_m``), temperature tau of the MLE logits
    (``--temp``), epsilon of Sinkhorn (``--epsilon``; the official runs always use 0.05, their flag is not
    passed on), sinkhorn_iterations (3, hard-coded officially), lambda_pcon (``--lambda_pcon``; 0 skips L_pc).

    Keyword-only: proto_temperature 0.5 (hard-coded officially) of L_pc; detach_proto_update=True stops
    the gradient that L_pc sends to the encoder through the EMA sums (the official code keeps it);
    class_masks=False is the unlabelled variant: every sample may take any prototype (labels are not needed)
    and L_pc has no positives (each prototype its own group), a pyprotoclip option the official code lacks;
    group: the process group of the data-parallel ranks.

    Buffer ``prototypes`` (C*M, d): ``torch.rand`` (the positive orthant) normalised at construction, as
    officially; saved in ``state_dict()``.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int = 128,
        prototypes_per_class: int = 6,
        topk: int = 5,
        proto_momentum: float = 0.999,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        lambda_pcon: float = 1.0,
        *,
        proto_temperature: float = 0.5,
        detach_proto_update: bool = False,
        class_masks: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        for name, value, lo in (("num_classes", num_classes, 1), ("feat_dim", feat_dim, 1),
                                ("prototypes_per_class", prototypes_per_class, 1), ("topk", topk, 0),
                                ("sinkhorn_iterations", sinkhorn_iterations, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {value!r}")
        if not 0.0 <= float(proto_momentum) <= 1.0:
            raise ValueError(f"proto_momentum: expected a value in [0, 1], got {proto_momentum!r}")
        for name, value in (("temperature", temperature), ("epsilon", epsilon), ("proto_temperature", proto_temperature)):
            if not float(value) > 0:
                raise ValueError(f"{name}: expected a value > 0, got {value!r}")
        if not float(lambda_pcon) >= 0:
            raise ValueError(f"lambda_pcon: expected a value >= 0, got {lambda_pcon!r}")
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.prototypes_per_class = prototypes_per_class
        self.num_prototypes = num_classes * prototypes_per_class
        self.class_masks = bool(class_masks)
        # official: k = min(k, cache_size); without class masks a sample may take any of the C*M prototypes
        self.topk = min(topk, prototypes_per_class if self.class_masks else self.num_prototypes)
        self.proto_momentum = float(proto_momentum)
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.lambda_pcon = float(lambda_pcon)
        self.proto_temperature = float(proto_temperature)
        self.detach_proto_update = bool(detach_proto_update)
        self.group = group
        self.register_buffer("prototypes", F.normalize(torch.rand(self.num_prototypes, feat_dim), dim=-1))
        # prototype j belongs to class j mod C (official: arange(C).repeat(M))
        self.register_buffer("prototype_labels", torch.arange(num_classes).repeat(prototypes_per_class), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, prototypes_per_class={self.prototypes_per_class}, feat_dim={self.feat_dim}, "
                f"topk={self.topk}, proto_momentum={self.proto_momentum}, temperature={self.temperature}, "
                f"epsilon={self.epsilon}, lambda_pcon={self.lambda_pcon}, class_masks={self.class_masks}")

    # ---- inputs -----------------------------------------------------------------------------------

    def _flatten(self, features: object, labels: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = checks.tensor("features", features)
        if features.dim() == 3:  # (B, V, d), the official layout: rows become view-major (all first views first)
            b, v, _ = features.shape
            features = torch.cat(torch.unbind(features, dim=1), dim=0)
            if labels is not None:
                labels = checks.tensor("labels", labels)
                if labels.dim() != 1 or labels.shape[0] != b:
                    raise ValueError(f"labels: expected shape ({b},) for features (B, V, d) = {tuple(features.shape)}, "
                                     f"got {tuple(labels.shape)}")
                labels = labels.repeat(v)
        features = checks.float_matrix("features", features)
        if features.shape[1] != self.feat_dim:
            raise ValueError(f"features: expected feature size {self.feat_dim} (feat_dim), got shape {tuple(features.shape)}")
        if features.device != self.prototypes.device:
            raise ValueError(f"features: expected device {self.prototypes.device} (as the prototypes), got {features.device}")
        if labels is None:
            if self.class_masks:
                raise ValueError("labels: expected (n,) int64 class labels (class_masks=True), got None")
            return features, None
        labels = checks.tensor("labels", labels)
        if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels: expected shape ({features.shape[0]},) to match the feature rows, got {tuple(labels.shape)}")
        if labels.dtype != torch.int64:
            raise ValueError(f"labels: expected dtype int64, got {labels.dtype}")
        if labels.device != features.device:
            raise ValueError(f"labels: expected device {features.device} (as features), got {labels.device}")
        if self.class_masks and checks.value_checks_enabled():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels: expected class indices in [0, {self.num_classes}), got [{lo}, {hi}]")
        return features, labels

    # ---- the pieces -------------------------------------------------------------------------------

    def sinkhorn(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Sinkhorn-Knopp soft assignment (official ``sinkhorn``), (n, P) with rows summing to 1.

        Q = exp(F P^T / eps)^T (P, N) / its total; ``sinkhorn_iterations`` times: each prototype's row to
        1/P, then each sample's column to 1/N; finally times N. N counts the samples of all ranks. No
        gradient (the official code exponentiates detached logits). Materialises (n, P).
        """
        group = self.group
        with torch.no_grad():
            q = torch.exp((features @ prototypes.t()) / self.epsilon).t()  # (P, n)
            k = q.shape[0]
            n_total = q.shape[1] * pdist.world_size(group)
            q = q / _sum(q.sum(), group)
            for _ in range(self.sinkhorn_iterations):
                q = q / _sum(q.sum(dim=1, keepdim=True), group).clamp_min(_EPS)  # per prototype, over all samples
                q = q / k
                q = q / q.sum(dim=0, keepdim=True).clamp_min(_EPS)  # per sample (local)
                q = q / n_total
            q = q * n_total
            return q.t()

    def _mask(self, q: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None or not self.class_masks:
            return q
        return q * (labels[:, None] == self.prototype_labels[None, :]).to(q.dtype)

    def _topk_mask(self, scores: torch.Tensor) -> torch.Tensor:
        idx = torch.topk(scores, self.topk, dim=1).indices
        return torch.zeros_like(scores).scatter(1, idx, 1.0)

    def _update_weights(self, q: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """W (n, P): masked (top-k) Q, each sample's row L1-normalised, then each prototype's column over all
        ranks' samples (a prototype no sample chose keeps a zero column)."""
        u = self._mask(q, labels)
        if self.topk > 0:
            u = self._topk_mask(u) * u
        u = u / u.sum(dim=1, keepdim=True).clamp_min(_EPS)
        return u / _sum(u.sum(dim=0, keepdim=True), self.group).clamp_min(_EPS)

    def _loss_weights(self, q_new: torch.Tensor, w: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """L (n, P): the top-k set of W (the pre-update assignment), weighted by the post-update Q', row L1-normalised."""
        u = self._mask(q_new, labels)
        if self.topk > 0:
            u = self._topk_mask(w) * u
        return u / u.sum(dim=1, keepdim=True).clamp_min(_EPS)

    def _mle_loss(self, features: torch.Tensor, prototypes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """mean_i [ log sum_j exp(F_i.P_j/tau) - sum_j L_ij F_i.P_j/tau ] through the fused op.

        The op computes sum_j q_ij (lse_i - logit_ij) for a distribution q. The official row normalisation
        divides by max(row sum, 1e-12), so a row may sum to s_i < 1 (to 0 when nothing of the class is left),
        and the official value is still lse_i - sum_j L_ij logit_ij: q puts the missing 1 - s_i on one
        prototype t_i and (1 - s_i) logit_{i t_i} is added back, exactly that value and its gradient.
        """
        s = weights.sum(dim=1)
        rows = torch.arange(weights.shape[0], device=weights.device)
        top = weights.argmax(dim=1)
        target = weights.clone()
        target[rows, top] += 1 - s
        ce = proto_cross_entropy(features, prototypes, self.temperature, target=target, reduction="none")
        extra = (1 - s) * (features * prototypes[top]).sum(dim=1) / self.temperature
        return (ce + extra).mean()

    def proto_contrastive_loss(self, prototypes: torch.Tensor) -> torch.Tensor:
        """L_pc (official ``proto_contra``) over all prototypes; forms the (P, P) logits."""
        p = F.normalize(prototypes, dim=1)
        logits = (p @ p.t()) / self.proto_temperature
        logits = logits - logits.max(dim=1, keepdim=True).values.detach()
        n = p.shape[0]
        not_self = 1.0 - torch.eye(n, dtype=p.dtype, device=p.device)
        if self.class_masks:
            lab = self.prototype_labels
            positives = (lab[:, None] == lab[None, :]).to(p.dtype) * not_self
        else:
            positives = torch.zeros_like(not_self)
        pos = (positives / positives.sum(dim=1, keepdim=True).clamp_min(_EPS) * logits).sum(dim=1)
        neg = torch.log((not_self * torch.exp(logits)).sum(dim=1))
        return -(pos - neg).mean()

    # ---- the step ---------------------------------------------------------------------------------

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One PALM step: update the prototypes and return the loss terms.

        features: (B, V, d) (the official layout; flattened view-major, labels (B,) repeated V times) or
        (n, d) with labels (n,) int64 in [0, C) (None for ``class_masks=False``). Computed in the
        prototypes' dtype (float32; float64 after ``.double()``), outside autocast.
        Returns {"mle", "proto_contra" (lambda_pcon * L_pc, as the official code logs it), "loss"}, 0-d.
        """
        features, labels = self._flatten(features, labels)
        dtype = self.prototypes.dtype
        with torch.autocast(features.device.type, enabled=False):
            z = features.to(dtype)
            protos = self.prototypes
            z_const = z.detach()
            w = self._update_weights(self.sinkhorn(z_const, protos), labels)  # (n, P), no grad
            sums = w.t() @ (z_const if self.detach_proto_update else z)  # (P, d): the weighted means W^T F
            sums = _all_reduce_with_grad(sums, self.group)
            new = F.normalize(self.proto_momentum * protos + (1 - self.proto_momentum) * sums, dim=1)
            new_const = new.detach()
            weights = self._loss_weights(self.sinkhorn(z_const, new_const), w, labels)
            mle = self._mle_loss(z, new_const, weights)
            terms: dict[str, Any] = {"mle": mle}
            loss = mle
            if self.lambda_pcon > 0:
                pcon = self.lambda_pcon * self.proto_contrastive_loss(new)
                terms["proto_contra"] = pcon
                loss = loss + pcon
        # the graph of this step keeps `new`; the buffer gets its own copy
        self.prototypes = new_const.clone()
        terms["loss"] = loss
        return terms
