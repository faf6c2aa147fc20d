"""All-gather InfoNCE (the CLIP loss) on top of the fused similarity cross-entropy op.

``similarity_cross_entropy`` is the generic core: per row i of ``scale * q @ k.T``, the log-sum-exp
minus the target logit, never forming the (n, m) matrix. ``infonce_loss`` is the symmetric CLIP loss
built on it, exact under torch.distributed (local rows against the gathered global columns).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pyprotoclip import _library
from pyprotoclip import distributed as pdist
from pyprotoclip.ops import _backend, checks, reference

_OPS_LOADED = bool(_library.compiled_devices())


def _validate_pair(name_a: str, a: object, name_b: str, b: object, *, same_rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    a = checks.float_matrix(name_a, a)
    b = checks.float_matrix(name_b, b)
    checks.same_device([(name_a, a), (name_b, b)])
    if a.dtype != b.dtype:  # e.g. one tower left autocast in fp32: compute in the wider dtype
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    checks.same_width([(name_a, a), (name_b, b)])
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} to match {name_a}, got {tuple(b.shape)}")
    checks.finite_all([(name_a, a), (name_b, b)])
    return a, b


def _float64_name(name_a: str, a: object, name_b: str) -> str:
    # the argument a float64 problem comes from (a mixed pair is promoted to the wider dtype)
    return name_a if getattr(a, "dtype", None) == torch.float64 else name_b


def similarity_cross_entropy(
    q: torch.Tensor, k: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | float, *, backend: str = "auto"
) -> torch.Tensor:
    """Row-wise cross-entropy of ``scale * q @ k.T`` without forming the (n, m) matrix.

    loss_i = logsumexp_j(scale * q_i . k_j) - scale * q_i . k_{targets_i}

    q: (n, d) float32/bfloat16/float16/float64.  k: (m, d), same device (a different float dtype is
    promoted to the wider of the two).
    targets: (n,) int64 in [0, m).  scale: 0-d tensor (may require grad) or float.
    Returns the (n,) float32 per-row loss, differentiable w.r.t. q, k and scale.
    float64 (either side): ``backend="auto"`` computes it exactly with the reference (float64 loss);
    the kernels compute in float32, so ``backend="compiled"`` raises a ValueError naming q or k.
    Extra memory is O(n + tile), never O(n * m): the backward recomputes tiles from the saved
    (n,) row log-sum-exp.
    """
    wide = _float64_name("q", q, "k")
    q, k = _validate_pair("q", q, "k", k, same_rows=False)
    targets = checks.tensor("targets", targets)
    if targets.dim() != 1 or targets.shape[0] != q.shape[0]:
        raise ValueError(f"targets: expected shape ({q.shape[0]},) to match q, got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets: expected dtype int64, got {targets.dtype}")
    if targets.device != q.device:
        raise ValueError(f"targets: expected device {q.device}, got {targets.device}")
    if checks.value_checks_enabled():
        lo, hi = torch.stack(torch.aminmax(targets)).tolist()  # one read-back (n >= 1: q is non-empty)
        if lo < 0 or hi >= k.shape[0]:
            raise ValueError(f"targets: expected values in [0, {k.shape[0]}), got [{lo}, {hi}]")
    scale = checks.scalar("scale", scale, q.device)
    if _backend.choose(backend, q, "similarity_cross_entropy", wide) == "reference":
        return reference.similarity_cross_entropy(q, k, targets, scale)[0]
    return torch.ops.pyprotoclip.similarity_cross_entropy(q, k, targets, scale)[0]


def infonce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Symmetric CLIP loss over the global batch, equal to open_clip's
    ``ClipLoss(local_loss=True, gather_with_grad=True)``:

        L = 1/2 [ CE(s I T_all^T, diag) + CE(s T I_all^T, diag) ]   (mean over this rank's rows)

    image_features, text_features: (B, d) on each rank (normalised by the caller, as in open_clip),
    float32/bfloat16/float16/float64, same device (a different float dtype is promoted to the wider). logit_scale: the already-exponentiated scale s,
    a 0-d tensor that may require grad, or a float. group: process group (default: the default
    group when torch.distributed is initialised). Every rank must pass the same B.

    Returns a 0-d float32 loss (float64 for float64 features, computed exactly by the reference with
    ``backend="auto"``; ``backend="compiled"`` has no float64 kernel and raises a ValueError). Under torch.distributed the other side's features are all-gathered
    with gradient; after DDP averages gradients over ranks, features and logit_scale get exactly the
    gradients of the single-process loss on the concatenated batch. Memory is O(B*W*d), never
    O(B * B*W): single-process it uses a symmetric fused kernel that reads each tile of
    ``s I T^T`` once for both directions.
    """
    wide = _float64_name("image_features", image_features, "text_features")
    image_features, text_features = _validate_pair(
        "image_features", image_features, "text_features", text_features, same_rows=True
    )
    scale = checks.scalar("logit_scale", logit_scale, image_features.device)
    chosen = _backend.choose(backend, image_features, "infonce_loss", wide)
    if not pdist.is_distributed(group):
        if chosen == "reference":
            loss_rows, loss_cols, _, _ = reference.symmetric_similarity_cross_entropy(image_features, text_features, scale)
        elif not torch.compiler.is_compiling():
            return _SymmetricLoss.apply(image_features, text_features, scale)
        else:
            loss_rows, loss_cols, _, _ = torch.ops.pyprotoclip.symmetric_similarity_cross_entropy(
                image_features, text_features, scale
            )
        return 0.5 * (loss_rows.mean() + loss_cols.mean())

    local = image_features.shape[0]
    targets = torch.arange(local, device=image_features.device) + pdist.rank(group) * local
    all_image = pdist.all_gather_with_grad(image_features, group)
    all_text = pdist.all_gather_with_grad(text_features, group)
    if chosen == "reference":
        image_to_text = reference.similarity_cross_entropy(image_features, all_text, targets, scale)[0]
        text_to_image = reference.similarity_cross_entropy(text_features, all_image, targets, scale)[0]
    else:
        image_to_text = torch.ops.pyprotoclip.similarity_cross_entropy(image_features, all_text, targets, scale)[0]
        text_to_image = torch.ops.pyprotoclip.similarity_cross_entropy(text_features, all_image, targets, scale)[0]
    return 0.5 * (image_to_text.mean() + text_to_image.mean())


class _SymmetricLoss(torch.autograd.Function):
    """``0.5 * (loss_rows.mean() + loss_cols.mean())`` of the symmetric op as one autograd node, for eager calls.

    The same kernels and the same bits as the op's registered autograd followed by the two means (forward and
    gradients are computed by the same ops in the same order), without its per-call Python work, which is most
    of the cost at small B. torch.compile traces the registered op instead.
    """

    @staticmethod
    def forward(ctx, q, k, scale):
        with torch._C._AutoDispatchBelowAutograd():
            loss_rows, loss_cols, lse_rows, lse_cols = torch.ops.pyprotoclip.symmetric_similarity_cross_entropy(q, k, scale)
        ctx.save_for_backward(q, k, scale, lse_rows, lse_cols)
        return 0.5 * (loss_rows.mean() + loss_cols.mean())

    @staticmethod
    def backward(ctx, grad):
        q, k, scale, lse_rows, lse_cols = ctx.saved_tensors
        n = q.shape[0]
        grad_rows = (grad * 0.5).expand(n) / n  # what the mul, add and mean nodes would pass on, bit for bit
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.pyprotoclip._symmetric_similarity_cross_entropy_backward(
                grad_rows, grad_rows, q, k, scale, lse_rows, lse_cols
            )


# ---- fakes and autograd for the compiled ops ---------------------------------------------------

if _OPS_LOADED:

    @torch.library.register_fake("pyprotoclip::similarity_cross_entropy")
    def _similarity_cross_entropy_fake(q, k, targets, scale):
        torch._check(q.shape[1] == k.shape[1])
        torch._check(targets.shape[0] == q.shape[0])
        n = q.shape[0]
        return q.new_empty((n,), dtype=torch.float32), q.new_empty((n,), dtype=torch.float32)

    @torch.library.register_fake("pyprotoclip::_similarity_cross_entropy_backward")
    def _similarity_cross_entropy_backward_fake(grad_loss, q, k, targets, scale, lse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)

    @torch.library.register_fake("pyprotoclip::symmetric_similarity_cross_entropy")
    def _symmetric_fake(q, k, scale):
        torch._check(q.shape == k.shape)
        n = q.shape[0]
        return tuple(q.new_empty((n,), dtype=torch.float32) for _ in range(4))

    @torch.library.register_fake("pyprotoclip::_symmetric_similarity_cross_entropy_backward")
    def _symmetric_backward_fake(grad_rows, grad_cols, q, k, scale, lse_rows, lse_cols):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)

    def _setup_similarity(ctx, inputs, output):
        q, k, targets, scale = inputs
        ctx.save_for_backward(q, k, targets, scale, output[1])
        ctx.mark_non_differentiable(output[1])

    def _backward_similarity(ctx, grad_loss, _grad_lse):
        # lse is marked non-differentiable: its incoming gradient is always zero / None.
        q, k, targets, scale, lse = ctx.saved_tensors
        grad_q, grad_k, grad_scale = torch.ops.pyprotoclip._similarity_cross_entropy_backward(
            grad_loss.contiguous(), q, k, targets, scale, lse
        )
        return grad_q, grad_k, None, grad_scale

    torch.library.register_autograd(
        "pyprotoclip::similarity_cross_entropy", _backward_similarity, setup_context=_setup_similarity
    )

    def _setup_symmetric(ctx, inputs, output):
        q, k, scale = inputs
        ctx.save_for_backward(q, k, scale, output[2], output[3])
        ctx.mark_non_differentiable(output[2], output[3])

    def _backward_symmetric(ctx, grad_rows, grad_cols, _grad_lse_rows, _grad_lse_cols):
        q, k, scale, lse_rows, lse_cols = ctx.saved_tensors
        if grad_rows is None:
            grad_rows = torch.zeros_like(lse_rows)
        if grad_cols is None:
            grad_cols = torch.zeros_like(lse_cols)
        grad_q, grad_k, grad_scale = torch.ops.pyprotoclip._symmetric_similarity_cross_entropy_backward(
            grad_rows.contiguous(), grad_cols.contiguous(), q, k, scale, lse_rows, lse_cols
        )
        return grad_q, grad_k, grad_scale

    torch.library.register_autograd(
        "pyprotoclip::symmetric_similarity_cross_entropy", _backward_symmetric, setup_context=_setup_symmetric
    )
