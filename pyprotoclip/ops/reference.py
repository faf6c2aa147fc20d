"""Pure-PyTorch versions of every op: the fallback when no kernel is compiled, and the test oracle.

They compute in float32 (float64 when given float64) whatever the input dtype, like the kernels,
and they materialise the full similarity matrices: clear, not memory-efficient.
"""

from __future__ import annotations

import torch


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


# ---- similarity cross-entropy -----------------------------------------------------------


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


def infonce_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Single-process symmetric CLIP loss, written as open_clip's ClipLoss: 0-d float32."""
    logits = _acc(logit_scale) * _acc(image_features) @ _acc(text_features).t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    )


# ---- prototype-assignment softmax -------------------------------------------------------
# BEGIN proto_softmax reference
# END proto_softmax reference

# ---- k-means update ---------------------------------------------------------------------
# BEGIN kmeans reference
# END kmeans reference
