"""Prototype-assignment softmax: ``p_i = softmax_j(F_i . P_j / tau)`` for features F (B, d) and prototypes
P (K, d), its top-k, and the fused cross-entropy ``-sum_j q_ij log p_ij`` against hard, soft or teacher
targets (ProtoCLIP's prototype losses, PALM's MLE loss) without forming the (B, K) matrix.
"""

from __future__ import annotations

import torch

from pyprotoclip import _library
from pyprotoclip.ops import _backend, checks, reference

_OPS_LOADED = _library.load()[0] is not None

REDUCTIONS = ("mean", "sum", "none")


def _number_dtype(features: torch.Tensor) -> torch.dtype | None:
    # the dtype a python-number temperature becomes: float64 for float64 features (fp32 would change
    # 0.1), the default (fp32) otherwise
    return torch.float64 if features.dtype == torch.float64 else None


def _validate_features(features: object, prototypes: object) -> tuple[torch.Tensor, torch.Tensor]:
    features = checks.float_matrix("features", features)
    prototypes = checks.float_matrix("prototypes", prototypes)
    checks.same_device([("features", features), ("prototypes", prototypes)])
    checks.same_dtype([("features", features), ("prototypes", prototypes)])
    checks.same_width([("features", features), ("prototypes", prototypes)])
    checks.finite_all([("features", features), ("prototypes", prototypes)])
    return features, prototypes


def proto_assign(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    topk: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Assignment probabilities ``p_ij = softmax_j(F_i . P_j / tau)``.

    features: (B, d) float32/bfloat16/float16/float64.  prototypes: (K, d), same dtype and device.
    temperature: tau > 0, a float or a 0-d tensor (may require grad).
    float64: ``backend="auto"`` computes it exactly with the reference; the kernels compute in float32,
    so ``backend="compiled"`` raises a ValueError naming features.
    Returns the (B, K) probabilities in ``features.dtype`` (computed in fp32), differentiable w.r.t.
    features, prototypes and temperature. With ``topk=k`` (1 <= k <= K) returns ``(values, indices)``,
    each (B, k): the k largest probabilities of each row, sorted, exact (not renormalised), in
    ``features.dtype``, and their int64 prototype indices; not differentiable. The top-k path never
    forms the (B, K) matrix: extra memory is O(B k + block).
    """
    features, prototypes = _validate_features(features, prototypes)
    temperature = checks.scalar(
        "temperature", temperature, features.device, positive=True, dtype=_number_dtype(features)
    )
    chosen = _backend.choose(backend, features, "proto_assign", "features")
    if topk is not None:
        num = prototypes.shape[0]
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num:
            raise ValueError(f"topk: expected an int in [1, {num}] (the number of prototypes), got {topk!r}")
        features, prototypes, temperature = features.detach(), prototypes.detach(), temperature.detach()
        if chosen == "reference":
            return reference.proto_assign_topk(features, prototypes, temperature, topk)
        return torch.ops.pyprotoclip.proto_assign_topk(features, prototypes, temperature, topk)
    if chosen == "reference":
        return reference.proto_assign(features, prototypes, temperature)
    return torch.ops.pyprotoclip.proto_assign(features, prototypes, temperature)


def _validate_target(target: object, features: torch.Tensor, num: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(target_index, target_probs): exactly one is set."""
    target = checks.tensor("target", target)
    batch = features.shape[0]
    if target.device != features.device:
        raise ValueError(f"target: expected device {features.device} (as features), got {target.device}")
    if target.dtype == torch.int64:
        if target.dim() != 1 or target.shape[0] != batch:
            raise ValueError(f"target: expected int64 indices of shape ({batch},), got {tuple(target.shape)}")
        if checks.value_checks_enabled() and batch > 0:
            lo, hi = torch.stack(torch.aminmax(target)).tolist()  # one read-back, not two
            if lo < 0 or hi >= num:
                raise ValueError(f"target: expected indices in [0, {num}) (the number of prototypes), got [{lo}, {hi}]")
        return target, None
    if target.dtype in checks.FLOAT_DTYPES:
        if target.dim() != 2 or tuple(target.shape) != (batch, num):
            raise ValueError(
                f"target: expected probabilities of shape ({batch}, {num}) (features rows, prototypes rows), "
                f"got {tuple(target.shape)}"
            )
        if checks.value_checks_enabled() and batch > 0:
            # O(B) extra memory, not O(B K) (sum(dtype=float64) would copy the whole target first):
            # a row sum is non-finite iff the row has a NaN/Inf entry
            sums = target.sum(dim=1).double()
            if not bool(torch.isfinite(sums).all()):
                raise ValueError("target: expected finite values, found NaN/Inf entries")
            if float(target.min()) < 0:
                raise ValueError("target: expected each row to be a distribution, found negative entries")
            # loose enough for a distribution rounded to bf16/fp16 entry by entry (the kernels use
            # sum_j q_ij exactly, so a near-distribution is handled consistently), tight enough to
            # catch counts or logits passed by mistake
            tol = 1e-2
            dev = float((sums - 1).abs().max())
            if dev > tol:
                raise ValueError(f"target: expected each row to sum to 1 (within {tol}), found a row off by {dev:.3g}")
        return None, target
    raise ValueError(f"target: expected int64 indices (B,) or float probabilities (B, K), got dtype {target.dtype}")


def proto_cross_entropy(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    temperature: torch.Tensor | float,
    *,
    target: torch.Tensor | None = None,
    teacher_features: torch.Tensor | None = None,
    teacher_prototypes: torch.Tensor | None = None,
    teacher_temperature: torch.Tensor | float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of the assignment distribution against a target, fused:

        loss_i = -sum_j q_ij log p_ij,   p_i = softmax_j(F_i . P_j / tau)

    features: (B, d) float32/bfloat16/float16/float64.  prototypes: (K, d), same dtype and device.
    temperature: tau > 0, a float or a 0-d tensor (may require grad).
    float64 features: ``backend="auto"`` computes exactly with the reference (float64 loss); the kernels
    compute in float32, so ``backend="compiled"`` raises a ValueError naming features.
    The target q is one of
      * hard: ``target`` (B,) int64 in [0, K), q_i = one-hot(target_i);
      * soft: ``target`` (B, K) float, each row a distribution;
      * teacher: ``teacher_features`` T (B, dt) and ``teacher_prototypes`` C (K, dt) (float, same dtype)
        with ``teacher_temperature`` tau_t > 0: q_i = softmax_j(T_i . C_j / tau_t), computed in the kernel.
    reduction: "mean" (0-d, mean over rows), "sum" (0-d) or "none" ((B,) per row). float32 result.
    Gradients flow to features, prototypes and temperature; never to the target or the teacher side.
    Memory: O((B + K) d + block), never O(B K) (soft targets are themselves (B, K)). On CPU, when a gradient
    is needed, the forward pass computes it too (two GEMMs in all, the backward only scales it); otherwise,
    and on CUDA, the backward recomputes the logits block by block from the saved per-row log-sum-exps.
    """
    features, prototypes = _validate_features(features, prototypes)
    temperature = checks.scalar(
        "temperature", temperature, features.device, positive=True, dtype=_number_dtype(features)
    )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    num = prototypes.shape[0]
    teacher_given = teacher_features is not None or teacher_prototypes is not None or teacher_temperature is not None
    target_index = target_probs = t_feat = t_proto = t_temp = None
    if target is not None and teacher_given:
        raise ValueError("target: expected either target or teacher_features/teacher_prototypes/teacher_temperature, got both")
    if target is not None:
        target_index, target_probs = _validate_target(target, features, num)
    elif teacher_given:
        if teacher_features is None:
            raise ValueError("teacher_features: expected a (B, dt) tensor with teacher_prototypes, got None")
        if teacher_prototypes is None:
            raise ValueError("teacher_prototypes: expected a (K, dt) tensor with teacher_features, got None")
        if teacher_temperature is None:
            raise ValueError("teacher_temperature: expected a value > 0 with teacher_features, got None")
        t_feat = checks.float_matrix("teacher_features", teacher_features).detach()
        t_proto = checks.float_matrix("teacher_prototypes", teacher_prototypes).detach()
        named = [("features", features), ("teacher_features", t_feat), ("teacher_prototypes", t_proto)]
        checks.same_device(named)
        checks.same_dtype(named[1:])
        checks.same_width(named[1:])
        if t_feat.shape[0] != features.shape[0]:
            raise ValueError(
                f"teacher_features: expected {features.shape[0]} rows (as features), got shape {tuple(t_feat.shape)}"
            )
        if t_proto.shape[0] != num:
            raise ValueError(
                f"teacher_prototypes: expected {num} rows (as prototypes), got shape {tuple(t_proto.shape)}"
            )
        checks.finite_all([("teacher_features", t_feat), ("teacher_prototypes", t_proto)])
        t_temp = checks.scalar(
            "teacher_temperature", teacher_temperature, features.device, positive=True, dtype=_number_dtype(features)
        ).detach()
    else:
        raise ValueError("target: expected target (B,) int64 or (B, K) probabilities, or teacher_features, got neither")

    args = (features, prototypes, temperature, target_index, target_probs, t_feat, t_proto, t_temp)
    if _backend.choose(backend, features, "proto_cross_entropy", "features") == "reference":
        loss = reference.proto_softmax_loss(*args)[0]
    elif not torch.compiler.is_compiling():
        return _ProtoLoss.apply(reduction, *args)
    else:
        loss = torch.ops.pyprotoclip.proto_softmax_loss(*args)[0]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


class _ProtoLoss(torch.autograd.Function):
    """The compiled loss and its reduction as one autograd node, for eager calls, without the registered op's
    per-call Python work (most of the cost at small B and K). torch.compile traces the registered op instead.

    On CPU, when a gradient is needed, the forward pass also computes each row's own gradient
    (``_proto_softmax_loss_and_grad``) and the backward pass only scales it: two GEMMs per block instead of
    three (the recomputing backward forms the logits again). That needs equal weights per row for the
    prototypes' gradient, so ``reduction="none"`` with trainable prototypes, and CUDA, take the recomputing
    backward, which gives the registered op's bits exactly. The scaled gradients match it to fp32 rounding
    (the upstream weight is applied after the products rather than before); the loss is the same bits."""

    @staticmethod
    def forward(ctx, reduction, *args):
        features, prototypes, temperature = args[:3]
        needs = list(ctx.needs_input_grad[1:4])
        ctx.fused = any(needs) and features.device.type == "cpu" and not (needs[1] and reduction == "none")
        with torch._C._AutoDispatchBelowAutograd():
            if ctx.fused:
                loss, _, _, grad_f, grad_p, grad_t = torch.ops.pyprotoclip._proto_softmax_loss_and_grad(*args, needs)
                ctx.save_for_backward(grad_f, grad_p, grad_t)
                ctx.dtypes = (features.dtype, prototypes.dtype, temperature.dtype)
            else:
                loss, lse, teacher_lse = torch.ops.pyprotoclip.proto_softmax_loss(*args)
                ctx.save_for_backward(*args, lse, teacher_lse)
        ctx.reduction = reduction
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss

    @staticmethod
    def backward(ctx, grad):
        needs = list(ctx.needs_input_grad[1:4])
        if ctx.fused:
            grads = _ProtoLoss._scaled(ctx, grad)
        else:
            *args, lse, teacher_lse = ctx.saved_tensors
            n = lse.shape[0]
            # what the mean / sum node would pass on, bit for bit
            if ctx.reduction == "mean":
                grad = grad.expand(n) / n
            elif ctx.reduction == "sum":
                grad = grad.expand(n)
            with torch._C._AutoDispatchBelowAutograd():
                grads = torch.ops.pyprotoclip._proto_softmax_loss_backward(
                    grad.contiguous(), None, *args, lse, teacher_lse, needs
                )
        return (None, *[g if need else None for g, need in zip(grads, needs)], None, None, None, None, None)

    @staticmethod
    def _scaled(ctx, grad: torch.Tensor) -> list[torch.Tensor | None]:
        """The gradients from the rows' own ones (saved by the forward): grad_f (B, d) scaled row by row,
        grad_p (K, d) by the common weight, grad_t the weighted sum of the rows' terms."""
        grad_f, grad_p, grad_t = ctx.saved_tensors
        f_dtype, p_dtype, t_dtype = ctx.dtypes
        grad = grad.float()
        if ctx.reduction == "none":
            return [(grad_f * grad[:, None]).to(f_dtype), None, (grad_t @ grad).to(t_dtype)]
        weight = grad / grad_t.shape[0] if ctx.reduction == "mean" else grad
        return [(grad_f * weight).to(f_dtype), (grad_p * weight).to(p_dtype), (grad_t.sum() * weight).to(t_dtype)]


# ---- fakes and autograd for the compiled ops ---------------------------------------------------

if _OPS_LOADED:

    @torch.library.register_fake("pyprotoclip::proto_softmax_loss")
    def _proto_softmax_loss_fake(
        features, prototypes, temperature, target_index, target_probs, teacher_features, teacher_prototypes,
        teacher_temperature,
    ):
        torch._check(features.shape[1] == prototypes.shape[1])
        n = features.shape[0]
        f32 = torch.float32
        teacher_n = n if teacher_features is not None else 0
        return features.new_empty((n,), dtype=f32), features.new_empty((n,), dtype=f32), features.new_empty(
            (teacher_n,), dtype=f32
        )

    @torch.library.register_fake("pyprotoclip::_proto_softmax_loss_backward")
    def _proto_softmax_loss_backward_fake(
        grad_loss, grad_lse, features, prototypes, temperature, target_index, target_probs, teacher_features,
        teacher_prototypes, teacher_temperature, lse, teacher_lse, output_mask,
    ):
        return features.new_empty(features.shape), prototypes.new_empty(prototypes.shape), temperature.new_empty(())

    @torch.library.register_fake("pyprotoclip::_proto_softmax_loss_and_grad")
    def _proto_softmax_loss_and_grad_fake(
        features, prototypes, temperature, target_index, target_probs, teacher_features, teacher_prototypes,
        teacher_temperature, output_mask,
    ):
        loss, lse, teacher_lse = _proto_softmax_loss_fake(
            features, prototypes, temperature, target_index, target_probs, teacher_features, teacher_prototypes,
            teacher_temperature,
        )
        f32 = torch.float32
        n, d = features.shape
        k = prototypes.shape[0] if output_mask[1] else 0
        return (loss, lse, teacher_lse, features.new_empty((n, d), dtype=f32), features.new_empty((k, d), dtype=f32),
                features.new_empty((n,), dtype=f32))

    def _setup_loss(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output[1], output[2])
        ctx.mark_non_differentiable(output[2])  # the teacher side is a constant

    def _backward_loss(ctx, grad_loss, grad_lse, _grad_teacher_lse):
        (features, prototypes, temperature, target_index, target_probs, t_feat, t_proto, t_temp, lse,
         teacher_lse) = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        grad_f, grad_p, grad_t = torch.ops.pyprotoclip._proto_softmax_loss_backward(
            grad_loss.contiguous(), None if grad_lse is None else grad_lse.contiguous(), features, prototypes,
            temperature, target_index, target_probs, t_feat, t_proto, t_temp, lse, teacher_lse,
            list(ctx.needs_input_grad[:3]),
        )
        grads = [g if need else None for g, need in zip((grad_f, grad_p, grad_t), ctx.needs_input_grad[:3])]
        return (*grads, None, None, None, None, None)

    torch.library.register_autograd("pyprotoclip::proto_softmax_loss", _backward_loss, setup_context=_setup_loss)

    @torch.library.register_fake("pyprotoclip::proto_assign")
    def _proto_assign_fake(features, prototypes, temperature):
        torch._check(features.shape[1] == prototypes.shape[1])
        return features.new_empty((features.shape[0], prototypes.shape[0]))

    @torch.library.register_fake("pyprotoclip::proto_assign_topk")
    def _proto_assign_topk_fake(features, prototypes, temperature, k):
        torch._check(features.shape[1] == prototypes.shape[1])
        torch._check(1 <= k)
        torch._check(k <= prototypes.shape[0])
        n = features.shape[0]
        return features.new_empty((n, k)), features.new_empty((n, k), dtype=torch.int64)

    @torch.library.register_fake("pyprotoclip::_proto_assign_backward")
    def _proto_assign_backward_fake(grad_probs, features, prototypes, temperature, output_mask):
        return features.new_empty(features.shape), prototypes.new_empty(prototypes.shape), temperature.new_empty(())

    def _setup_assign(ctx, inputs, output):
        features, prototypes, temperature = inputs
        # the probabilities are recomputed in fp32 by the backward: the output may be rounded to bf16/fp16
        ctx.save_for_backward(features, prototypes, temperature)

    def _backward_assign(ctx, grad_probs):
        features, prototypes, temperature = ctx.saved_tensors
        grads = torch.ops.pyprotoclip._proto_assign_backward(
            grad_probs.contiguous(), features, prototypes, temperature, list(ctx.needs_input_grad[:3])
        )
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3]))

    torch.library.register_autograd("pyprotoclip::proto_assign", _backward_assign, setup_context=_setup_assign)
