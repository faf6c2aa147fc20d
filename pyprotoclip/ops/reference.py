"""Pure-PyTorch versions of every op: the fallback when no kernel is compiled, and the test oracle.

They compute in float32 (float64 when given float64) whatever the input dtype, like the kernels,
and they materialise the full similarity matrices: clear, not memory-efficient.
"""

from __future__ import annotations

import functools

import torch


def _exact(fn):
    """Run ``fn`` with autocast off on every device: under ``torch.autocast`` (how a trainer calls the ops)
    the matmuls would otherwise run in the autocast dtype, and the reference must stay fp32 like the kernels."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


# ---- similarity cross-entropy -----------------------------------------------------------


@_exact
def similarity_cross_entropy(
    q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``logsumexp_j(s q_i.k_j) - s q_i.k_{t_i}`` and the row log-sum-exp, both (n,).

    q: (n, d), k: (m, d), targets: (n,) int64 in [0, m), scale: 0-d. Differentiable.
    """
    logits = _acc(scale) * (_acc(q) @ _acc(k).t())  # (n, m)
    lse = torch.logsumexp(logits, dim=1)
    target_logit = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    return lse - target_logit, lse


@_exact
def symmetric_similarity_cross_entropy(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions of a square problem with diagonal targets: rows of ``s q k^T`` and of its
    transpose. q, k: (n, d). Returns loss_rows, loss_cols, lse_rows, lse_cols, each (n,)."""
    logits = _acc(scale) * (_acc(q) @ _acc(k).t())  # (n, n)
    diag = logits.diagonal()
    lse_rows = torch.logsumexp(logits, dim=1)
    lse_cols = torch.logsumexp(logits, dim=0)
    return lse_rows - diag, lse_cols - diag, lse_rows, lse_cols


@_exact
def infonce_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Single-process symmetric CLIP loss, written as open_clip's ClipLoss: 0-d float32."""
    logits = _acc(logit_scale) * _acc(image_features) @ _acc(text_features).t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    )


# ---- prototype-assignment softmax -------------------------------------------------------
# BEGIN proto_softmax reference


@_exact
def proto_assign(features: torch.Tensor, prototypes: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``softmax_j(F_i . P_j / tau)``: (n, k) probabilities in ``features.dtype``. Differentiable."""
    logits = (_acc(features) @ _acc(prototypes).t()) / _acc(temperature)
    return torch.softmax(logits, dim=1).to(features.dtype)


@_exact
def proto_assign_topk(
    features: torch.Tensor, prototypes: torch.Tensor, temperature: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest probabilities of each row of ``proto_assign`` (sorted, not renormalised) and
    their int64 indices, each (n, k)."""
    logits = (_acc(features) @ _acc(prototypes).t()) / _acc(temperature)
    values, indices = torch.softmax(logits, dim=1).topk(k, dim=1)
    return values.to(features.dtype), indices


@_exact
def proto_softmax_loss(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: torch.Tensor,
    target_index: torch.Tensor | None = None,
    target_probs: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    teacher_prototypes: torch.Tensor | None = None,
    teacher_temperature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``-sum_j q_ij log p_ij`` with ``p_i = softmax(F_i P^T / tau)``; q is one-hot(target_index),
    target_probs, or ``softmax(T_i C^T / tau_t)``. Returns loss (n,), lse (n,) and teacher_lse ((n,) in
    teacher mode, else (0,)). Differentiable w.r.t. features, prototypes and temperature only: targets and
    the teacher side are constants."""
    logits = (_acc(features) @ _acc(prototypes).t()) / _acc(temperature)  # (n, k)
    lse = torch.logsumexp(logits, dim=1)
    log_p = logits - lse[:, None]
    teacher_lse = logits.new_empty((0,))
    if target_index is not None:
        loss = -log_p.gather(1, target_index.view(-1, 1)).squeeze(1)
    else:
        if target_probs is not None:
            # in the dtype of the logits: a float64 target must not turn a float32 problem's loss float64
            q = target_probs.detach().to(log_p.dtype)
        else:
            t_logits = (_acc(teacher_features.detach()) @ _acc(teacher_prototypes.detach()).t()) / _acc(
                teacher_temperature.detach()
            )
            teacher_lse = torch.logsumexp(t_logits, dim=1)
            q = torch.softmax(t_logits, dim=1).to(log_p.dtype)
        loss = -(q * log_p).sum(dim=1)
    return loss, lse, teacher_lse


# END proto_softmax reference

# ---- k-means update ---------------------------------------------------------------------
# BEGIN kmeans reference


@_exact
def kmeans_update(
    x: torch.Tensor, centroids: torch.Tensor, weights: torch.Tensor | None, metric: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One k-means pass: (assign (n,) int64, score (n,), sums (k, d), counts (k,)).

    l2: assign_i = argmin_j |x_i - c_j|^2 and score_i is that squared distance (clamped at 0).
    cosine: x and c are L2-normalised, assign_i = argmax_j <x^_i, c^_j>, score_i that similarity,
    and sums add the *normalised* points. sums_j = sum_{i: assign_i = j} w_i x_i, counts_j = sum w_i
    (w = 1 without weights). Ties go to the lowest index. Float32 (float64 for float64 x).
    """
    xf, cf = _acc(x), centroids.to(_acc(x).dtype)
    if metric == "cosine":
        xf = torch.nn.functional.normalize(xf, dim=1, eps=1e-12)
        cf = torch.nn.functional.normalize(cf, dim=1, eps=1e-12)
        score, assign = (xf @ cf.t()).max(dim=1)  # (n, k) similarities
    elif metric == "l2":
        d2 = (xf * xf).sum(1, keepdim=True) - 2.0 * (xf @ cf.t()) + (cf * cf).sum(1)  # (n, k)
        score, assign = d2.min(dim=1)
        score = score.clamp_min(0.0)
    else:
        raise ValueError(f"metric: expected 'l2' or 'cosine', got {metric!r}")
    w = torch.ones_like(score) if weights is None else weights.to(score.dtype)
    k, d = centroids.shape
    sums = torch.zeros((k, d), dtype=xf.dtype, device=xf.device).index_add_(0, assign, xf * w[:, None])
    counts = torch.zeros((k,), dtype=xf.dtype, device=xf.device).index_add_(0, assign, w)
    return assign, score, sums, counts


# END kmeans reference
