"""CyCLIP (Goel et al., NeurIPS 2022, arXiv 2205.14459): the CLIP loss plus two cyclic consistency
regularisers over the global batch, computed through d x d Gram matrices.

For N L2-normalised image and text embeddings I, T (N, d), with the official code's normalisation
(the sum over all pairs of the global batch divided by N; the logit scale does not enter):

    in-modal      L_I = 1/N sum_jk (<I_j, I_k> - <T_j, T_k>)^2
    cross-modal   L_C = 1/N sum_jk (<I_j, T_k> - <I_k, T_j>)^2

With S = I + T and D = I - T, I I^T - T T^T = (S D^T + D S^T)/2 and I T^T - T I^T = (D S^T - S D^T)/2,
so with a = <S^T S, D^T D>_F and b = tr((D^T S)^2):

    L_I = (a + b) / (2N),   L_C = (a - b) / (2N).

The three d x d matrices S^T S, D^T D, D^T S hold the same information as I^T I, T^T T, I^T T (each
set is a fixed linear combination of the other); this basis is used because near-aligned pairs
(I ~ T, the regime the regularisers push towards) make ||I^T I||^2 - 2||I^T T||^2 + ||T^T T||^2 a
difference of large, nearly equal numbers (fp32 loses ~3 digits at a pair distance of 0.01), while
D is small there and nothing cancels. Memory: O(d^2) saved for backward (the inputs themselves are
saved by reference); S and D are formed a chunk of rows at a time in one buffer, so the forward
holds O(min(N, chunk) d) transients and the backward that plus the two (N, d) gradients, never an
N x N matrix. Across ranks, ONE all-reduce of the stacked d x d matrices (plus
the row count) makes the terms exact on every rank; its backward sums the incoming gradients over
ranks, so after DDP averages parameter gradients every rank's rows get exactly the gradient of the
single-process loss on the concatenated batch. The official code instead gathers the features
without gradient: its tower gradients from these terms are 1/W of the single-process ones.

The trainer adds lambda1 L_I + lambda2 L_C = ((lambda1 + lambda2) a + (lambda1 - lambda2) b) / (2N)
(:func:`cyclic_penalty`). The forward needs all three Gram matrices (both terms are logged), but the
backward only the GEMMs of the forms whose coefficient is nonzero, known from the Python floats at
forward time: with the recipe's equal weights b has no gradient and the backward is
dS = S (G_ss + G_ss^T), dD = D (G_dd + G_dd^T), two N d^2 GEMMs instead of four (lambda1 = -lambda2:
a has none, dS = D G_ds, dD = S G_ds^T), in the same buffers.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist

from pyprotoclip import distributed as pdist
from pyprotoclip.losses.base import Method, StepContext
from pyprotoclip.losses.registry import register_method
from pyprotoclip.ops import checks, infonce_loss, similarity_cross_entropy

DEFAULT_CYLAMBDA = 0.25  # the README recipe of the official code (its parser defaults to 0)


_CHUNK_ROWS = 8192  # rows of [S D] formed at a time, in one reused buffer


def _row_chunks(n: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + _CHUNK_ROWS, n)) for lo in range(0, n, _CHUNK_ROWS)]


def _sign(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([[1.0], [-1.0]], dtype=like.dtype, device=like.device)


def _fill_sum_difference(out: torch.Tensor, image: torch.Tensor, text: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """out (r, 2d) <- [I + T, I - T] of these rows in one pass, as I + sign * T with sign = [[1], [-1]]
    in out's dtype: bf16/fp16 rows are summed in that dtype (no rounding to the input dtype) and the
    product with +-1 is exact."""
    r, d = image.shape
    torch.addcmul(image[:, None], text[:, None], sign, out=out.view(r, 2, d))
    return out


# A large tensor can be a fresh mmap (glibc above its mmap threshold; always in the benchmarks, which
# fix that threshold at 128 KiB so that RSS follows live memory), whose page faults and unmapping can
# cost more than the arithmetic on a d x d matrix: the functions below allocate few buffers and
# write into them in place.


class _SumDifferenceGrams(torch.autograd.Function):
    """(I, T) -> (3, d, d) [S^T S, D^T S, D^T D] in ``acc_dtype``, S = I + T, D = I - T.

    ``blocks`` = (a, b): which forms the caller differentiates, decided at forward time. (True, True):
    any incoming gradient. (True, False): the gradient of D^T S is known to be zero (the caller's
    loss depends on S^T S and D^T D only) and is not read; (False, True): those of S^T S and D^T D are.
    The backward then does two N d^2 GEMMs instead of four; (False, False): none.

    With P = [S D] (N, 2d), the first two are P^T S (2d, d), one GEMM into the output, the third
    D^T D: 3 N d^2 multiply-adds. (Computing only the upper blocks of the symmetric S^T S, D^T D in
    smaller GEMMs does fewer multiply-adds but measured slower on a 2-thread CPU.) P is formed a chunk
    of rows at a time in one reused buffer. Saves only the inputs (by reference); the backward forms P
    again (cheaper than keeping 2 N d numbers alive)."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, acc_dtype: torch.dtype,
                blocks: tuple[bool, bool] = (True, True)) -> torch.Tensor:
        n, d = image.shape
        with torch.autocast(image.device.type, enabled=False):  # called under autocast, the GEMMs stay in acc_dtype
            grams = torch.empty(3, d, d, dtype=acc_dtype, device=image.device)
            buf = torch.empty(min(n, _CHUNK_ROWS), 2 * d, dtype=acc_dtype, device=image.device)
            sign = _sign(buf)
            for lo, hi in _row_chunks(n):
                p = _fill_sum_difference(buf[: hi - lo], image[lo:hi], text[lo:hi], sign)
                beta = 1 if lo else 0
                grams[:2].view(2 * d, d).addmm_(p.t(), p[:, :d], beta=beta)
                grams[2].addmm_(p[:, d:].t(), p[:, d:], beta=beta)
        ctx.save_for_backward(image, text)
        ctx.acc_dtype, ctx.blocks = acc_dtype, blocks
        return grams

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        image, text = ctx.saved_tensors
        if ctx.blocks != (True, True):
            return _SumDifferenceGrams._backward_one_form(ctx, grad, image, text)
        n, d = image.shape
        acc = ctx.acc_dtype
        with torch.autocast(image.device.type, enabled=False):
            g_ss, g_ds, g_dd = grad.to(acc).unbind(0)
            # [dS dD] = [S D] @ [[G_ss + G_ss^T, G_ds^T], [G_ds, G_dd + G_dd^T]]; dI = dS + dD and
            # dT = dS - dD are folded into the right factor m = [m_image m_text], so each chunk of rows
            # is two GEMMs straight into the outputs.
            m = torch.empty(2 * d, 2 * d, dtype=acc, device=image.device)
            m_image, m_text = m[:, :d], m[:, d:]
            sym_ss, sym_dd = m_text[:d], m_text[d:]
            torch.add(g_ss, g_ss.t(), out=sym_ss)
            torch.add(sym_ss, g_ds.t(), out=m_image[:d])
            sym_ss.sub_(g_ds.t())
            torch.add(g_dd, g_dd.t(), out=sym_dd)
            torch.add(g_ds, sym_dd, out=m_image[d:])
            torch.sub(g_ds, sym_dd, out=sym_dd)
            grad_image, grad_text = torch.empty(2, n, d, dtype=acc, device=image.device)  # one allocation
            buf = torch.empty(min(n, _CHUNK_ROWS), 2 * d, dtype=acc, device=image.device)
            sign = _sign(buf)
            for lo, hi in _row_chunks(n):
                p = _fill_sum_difference(buf[: hi - lo], image[lo:hi], text[lo:hi], sign)
                torch.mm(p, m_image, out=grad_image[lo:hi])
                torch.mm(p, m_text, out=grad_text[lo:hi])
        return grad_image.to(image.dtype), grad_text.to(text.dtype), None, None

    @staticmethod
    def _backward_one_form(ctx, grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor):
        """The backward when only a's blocks (S^T S, D^T D) or only b's (D^T S) carry gradient:
        dS = X, dD = Y with X = S (G_ss + G_ss^T), Y = D (G_dd + G_dd^T) for a, X = D G_ds,
        Y = S G_ds^T for b; per chunk of rows two N d^2 GEMMs, Y into dT's rows and X into the half
        of the [S D] buffer that Y has read, then dI = X + Y, dT = X - Y in place (no other buffer)."""
        n, d = image.shape
        acc = ctx.acc_dtype
        use_a, use_b = ctx.blocks
        if not (use_a or use_b):
            return torch.zeros_like(image), torch.zeros_like(text), None, None
        with torch.autocast(image.device.type, enabled=False):
            g_ss, g_ds, g_dd = grad.to(acc).unbind(0)
            if use_a:
                m = torch.empty(2, d, d, dtype=acc, device=image.device)
                torch.add(g_ss, g_ss.t(), out=m[0])
                torch.add(g_dd, g_dd.t(), out=m[1])
                m_x, m_y = m[0], m[1]
            else:
                m_x, m_y = g_ds, g_ds.t()
            grad_both = torch.empty(2, n, d, dtype=acc, device=image.device)  # [dI, dT], one allocation
            buf = torch.empty(min(n, _CHUNK_ROWS), 2 * d, dtype=acc, device=image.device)
            sign = _sign(buf)
            for lo, hi in _row_chunks(n):
                p = _fill_sum_difference(buf[: hi - lo], image[lo:hi], text[lo:hi], sign)
                s_rows, d_rows = p[:, :d], p[:, d:]
                # Y first, into dT's rows; its operand's half of [S D] is then dead and takes X
                y_operand, x_operand = (d_rows, s_rows) if use_a else (s_rows, d_rows)
                y = torch.mm(y_operand, m_y, out=grad_both[1, lo:hi])
                x = torch.mm(x_operand, m_x, out=y_operand)
                torch.add(x, y, out=grad_both[0, lo:hi])
                torch.sub(x, y, out=y)
            grad_image, grad_text = grad_both.unbind(0)
        return grad_image.to(image.dtype), grad_text.to(text.dtype), None, None


class _CyclicForms(torch.autograd.Function):
    """(3, d, d) [S^T S, D^T S, D^T D] -> (a, b) = (<S^T S, D^T D>_F, tr((D^T S)^2)), 0-d each, with a
    hand-written backward into one (3, d, d) buffer (autograd's would allocate per op)."""

    @staticmethod
    def forward(ctx, grams: torch.Tensor):
        g_ss, g_ds, g_dd = grams.unbind(0)
        a = torch.dot(g_ss.reshape(-1), g_dd.reshape(-1))
        b = torch.mul(g_ds, g_ds.t()).sum()
        ctx.save_for_backward(grams)
        return a, b

    @staticmethod
    def backward(ctx, grad_a: torch.Tensor, grad_b: torch.Tensor):
        (grams,) = ctx.saved_tensors
        g_ss, g_ds, g_dd = grams.unbind(0)
        out = torch.empty_like(grams)
        torch.mul(g_dd, grad_a, out=out[0])
        torch.mul(g_ds.t(), 2 * grad_b, out=out[1])
        torch.mul(g_ss, grad_a, out=out[2])
        return out


class _CyclicPenalty(torch.autograd.Function):
    """(3, d, d) grams, N, lambda1, lambda2 -> (lambda1 L_I + lambda2 L_C, L_I, L_C), L_I, L_C not
    differentiable. The values are formed as in :func:`cyclic_losses` (the same bits); the gradient
    into the grams is w_a [G_dd, 0, G_ss] + w_b [0, 2 G_ds^T, 0] with w_a = g (lambda1 + lambda2) / (2N),
    w_b = g (lambda1 - lambda2) / (2N), a block whose weight is zero as a Python float is left zero
    (and not read downstream: see ``_SumDifferenceGrams``'s ``blocks``)."""

    @staticmethod
    def forward(ctx, grams: torch.Tensor, n, lambda1: float, lambda2: float):
        g_ss, g_ds, g_dd = grams.unbind(0)
        a = torch.dot(g_ss.reshape(-1), g_dd.reshape(-1))
        b = torch.mul(g_ds, g_ds.t()).sum()
        inmodal, crossmodal = (a + b) / (2 * n), (a - b) / (2 * n)
        penalty = lambda1 * inmodal + lambda2 * crossmodal
        ctx.save_for_backward(grams)
        ctx.n, ctx.lambdas = n, (lambda1, lambda2)
        ctx.mark_non_differentiable(inmodal, crossmodal)
        return penalty, inmodal, crossmodal

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_inmodal, _grad_crossmodal):
        (grams,) = ctx.saved_tensors
        g_ss, g_ds, g_dd = grams.unbind(0)
        lambda1, lambda2 = ctx.lambdas
        out = torch.zeros_like(grams)
        if lambda1 + lambda2 != 0:
            w_a = grad * ((lambda1 + lambda2) / 2) / ctx.n
            torch.mul(g_dd, w_a, out=out[0])
            torch.mul(g_ss, w_a, out=out[2])
        if lambda1 - lambda2 != 0:
            w_b = grad * (lambda1 - lambda2) / ctx.n
            torch.mul(g_ds.t(), w_b, out=out[1])
        return out, None, None, None


def _validate(image_features: object, text_features: object) -> tuple[torch.Tensor, torch.Tensor]:
    image = checks.float_matrix("image_features", image_features)
    text = checks.float_matrix("text_features", text_features)
    checks.same_device([("image_features", image), ("text_features", text)])
    if text.shape != image.shape:
        raise ValueError(f"text_features: expected shape {tuple(image.shape)} to match image_features, got {tuple(text.shape)}")
    checks.finite_all([("image_features", image), ("text_features", text)])
    return image, text


def _global_grams(image_features: object, text_features: object, group: dist.ProcessGroup | None,
                  *needs: tuple[bool, bool]) -> tuple[torch.Tensor, Any]:
    """The validated inputs' (3, d, d) Gram matrices summed over ranks (one all-reduce, with the row count)
    and the global row count N. ``needs``: which forms' gradients the backward computes (default both)."""
    image, text = _validate(image_features, text_features)
    acc = torch.float64 if torch.float64 in (image.dtype, text.dtype) else torch.float32
    d = image.shape[1]
    grams = _SumDifferenceGrams.apply(image, text, acc, *needs)
    if not pdist.is_distributed(group):
        return grams, image.shape[0]
    count = torch.full((1,), float(image.shape[0]), dtype=acc, device=image.device)
    flat = pdist.all_reduce_sum_with_grad(torch.cat([grams.reshape(-1), count]), group)
    return flat[:-1].view(3, d, d), flat[-1].detach()


def cyclic_losses(
    image_features: torch.Tensor, text_features: torch.Tensor, *, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """CyCLIP's (in-modal, cross-modal) cyclic losses over the global batch, without an N x N matrix.

        inmodal    = 1/N sum_jk (<I_j, I_k> - <T_j, T_k>)^2
        crossmodal = 1/N sum_jk (<I_j, T_k> - <I_k, T_j>)^2

    image_features, text_features: (B, d) on each rank, L2-normalised by the caller (the terms do
    not normalise), float32/bfloat16/float16/float64, same device and shape (B may differ between
    ranks; N is the sum of all ranks' B). bf16/fp16 inputs are accumulated in fp32. group: the
    process group (default: the default group when torch.distributed is initialised).

    Returns two 0-d float32 tensors (float64 for float64 inputs), the same global values on every
    rank. Gradients reach each rank's own rows; after DDP averages parameter gradients over ranks
    they equal the single-process gradients on the concatenated batch. Cost: O(N d^2) time, O(d^2)
    saved memory, one all-reduce of 3 d^2 + 1 numbers. See the module docstring for the method.
    """
    grams, n = _global_grams(image_features, text_features, group)
    a, b = _CyclicForms.apply(grams)
    return (a + b) / (2 * n), (a - b) / (2 * n)


def cyclic_penalty(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    lambda1: float,
    lambda2: float,
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lambda1 * inmodal + lambda2 * crossmodal`` of :func:`cyclic_losses` as one fused op, with
    gradient, and the two terms (detached, for logging): ``(penalty, inmodal, crossmodal)``.

    Inputs, validation, fp32 accumulation, the one all-reduce across ranks and the gradient
    semantics (exact after DDP's average) are those of :func:`cyclic_losses`; lambda1, lambda2 are
    finite Python numbers. The values are the same bits as ``cyclic_losses``'s. The backward does
    only the GEMMs of the forms whose weight is nonzero, decided from the floats here (no host sync):
    with lambda1 == lambda2 (the recipe, 0.25 each) b = tr((D^T S)^2) has no gradient and the backward
    does 2 N d^2 multiply-adds instead of 4 (lambda1 == -lambda2: likewise for a; both 0: none).
    """
    weights = []
    for name, value in (("lambda1", lambda1), ("lambda2", lambda2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        weights.append(float(value))
    lambda1, lambda2 = weights
    grams, n = _global_grams(image_features, text_features, group, (lambda1 + lambda2 != 0, lambda1 - lambda2 != 0))
    return _CyclicPenalty.apply(grams, n, lambda1, lambda2)


def cyclic_weights(params: Mapping[str, Any], default: float = 0.0) -> tuple[float, float]:
    """(lambda1, lambda2) from ``--cylambda1/--cylambda2``; an unset flag (None) is ``default``
    (CyCLIP: 0.25; a method that only optionally adds the terms, e.g. ProtoCLIP: 0)."""
    out = []
    for key in ("cylambda1", "cylambda2"):
        value = params.get(key)
        out.append(float(default if value is None else value))
    return out[0], out[1]


def check_cyclic_weights(params: Mapping[str, Any]) -> None:
    """ValueError naming the flag unless --cylambda1/--cylambda2 are unset or finite and >= 0."""
    for key in ("cylambda1", "cylambda2"):
        value = params.get(key)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{key}: expected a finite value >= 0, got {value!r}")


def add_cyclic_terms(
    terms: dict[str, torch.Tensor],
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    cylambda1: float,
    cylambda2: float,
    *,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor | float:
    """Add ``inmodal_cyclic_loss`` and ``crossmodal_cyclic_loss`` to ``terms`` and return
    ``cylambda1 * inmodal + cylambda2 * crossmodal`` to add to the method's total, through
    :func:`cyclic_penalty` (the logged terms are detached: the gradient is the penalty's; with equal
    weights its backward skips b's GEMMs).

    With both weights 0 nothing is computed or logged and 0.0 is returned, so a method can call
    this unconditionally (``--method protoclip`` with ``--cylambda1/2``)."""
    if cylambda1 == 0 and cylambda2 == 0:
        return 0.0
    penalty, inmodal, crossmodal = cyclic_penalty(image_features, text_features, cylambda1, cylambda2, group=group)
    terms["inmodal_cyclic_loss"] = inmodal
    terms["crossmodal_cyclic_loss"] = crossmodal
    return penalty


def one_way_infonce(
    queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor, *, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """CE(s q k^T, diag) over the global batch, one direction: this rank's query rows against all
    ranks' keys (gathered with gradient), mean over the local rows, through
    :func:`pyprotoclip.ops.similarity_cross_entropy`. After DDP's average it is exact, like
    :func:`pyprotoclip.ops.infonce_loss`. Returns a 0-d float32 tensor."""
    local = queries.shape[0]
    targets = torch.arange(local, device=queries.device) + pdist.rank(group) * local
    all_keys = pdist.all_gather_with_grad(keys, group)
    return similarity_cross_entropy(queries, all_keys, targets, logit_scale).mean()


class CyCLIPLoss(torch.nn.Module):
    """L = L_contrastive + cylambda1 * L_inmodal_cyclic + cylambda2 * L_crossmodal_cyclic.

    L_contrastive is the CLIP loss (:func:`pyprotoclip.ops.infonce_loss`). With ``inmodal`` (the
    official ``--inmodal``) it is 1/2 (L_clip + 1/2 (CE(s I I_aug^T) + CE(s T T_aug^T))), one direction
    per modality as the official code, where I_aug, T_aug are the model's
    ``augmented_image_features`` / ``augmented_text_features`` (an augmented view of each image and
    caption); the cyclic terms use the original views only.

    outputs: ``image_features``, ``text_features`` (B, d) normalised, ``logit_scale`` 0-d (exp'd),
    and with ``inmodal`` the two augmented (B, d). Returns {"contrastive_loss", "inmodal_cyclic_loss",
    "crossmodal_cyclic_loss", "loss"} (0-d), plus "crossmodal_contrastive_loss" (L_clip) and
    "inmodal_contrastive_loss" with ``inmodal``; the cyclic terms are left out when both weights are 0.
    """

    def __init__(self, cylambda1: float = DEFAULT_CYLAMBDA, cylambda2: float = DEFAULT_CYLAMBDA, *, inmodal: bool = False,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        check_cyclic_weights({"cylambda1": cylambda1, "cylambda2": cylambda2})
        self.cylambda1, self.cylambda2, self.inmodal, self.group = float(cylambda1), float(cylambda2), inmodal, group

    def forward(self, outputs: Mapping[str, Any], *, step_context: StepContext | None = None) -> dict[str, torch.Tensor]:
        image, text, scale = outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
        clip = infonce_loss(image, text, scale, group=self.group)
        terms: dict[str, torch.Tensor] = {}
        if self.inmodal:
            missing = [k for k in ("augmented_image_features", "augmented_text_features") if k not in outputs]
            if missing:
                raise ValueError(
                    f"{missing[0]}: --inmodal needs the augmented views in the model outputs (the model from "
                    "CyCLIPMethod.build_model, fed by the loader of its train_transforms)"
                )
            inmodal = 0.5 * (one_way_infonce(image, outputs["augmented_image_features"], scale, group=self.group)
                             + one_way_infonce(text, outputs["augmented_text_features"], scale, group=self.group))
            contrastive = 0.5 * (clip + inmodal)
            terms.update(contrastive_loss=contrastive, crossmodal_contrastive_loss=clip, inmodal_contrastive_loss=inmodal)
        else:
            contrastive = clip
            terms["contrastive_loss"] = contrastive
        cyclic = add_cyclic_terms(terms, image, text, self.cylambda1, self.cylambda2, group=self.group)
        terms["loss"] = contrastive + cyclic
        return terms


@register_method
class CyCLIPMethod(Method):
    name = "cyclip"
    summary = "CyCLIP: CLIP + in-modal and cross-modal cyclic consistency (--cylambda1/2, --inmodal)"

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__(params)
        self.cylambda1, self.cylambda2 = cyclic_weights(params, DEFAULT_CYLAMBDA)
        self.inmodal = bool(params.get("inmodal"))

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        check_cyclic_weights(params)

    def build_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.inmodal:
            return model
        from pyprotoclip.losses.views import TwoViewModel

        return TwoViewModel(model)

    def build_loss(self) -> torch.nn.Module:
        return CyCLIPLoss(self.cylambda1, self.cylambda2, inmodal=self.inmodal)

    def train_transforms(self, preprocess, tokenize):
        if not self.inmodal:
            return preprocess, tokenize
        from pyprotoclip.losses.views import TwoViewPreprocess, TwoViewTokenizer

        return TwoViewPreprocess(preprocess), TwoViewTokenizer(tokenize, seed=int(self.params.get("seed") or 0))
