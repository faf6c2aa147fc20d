"""CyCLIP's cyclic losses (Gram form) against the direct N x N formulas, across ranks, in memory;
the loss module, the method's two-view model and transforms."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pyprotoclip.losses import CyCLIPLoss, add_cyclic_terms, cyclic_losses, cyclic_weights, get_method
from pyprotoclip.losses.cyclip import cyclic_penalty
from pyprotoclip.ops import skip_value_checks
from tests.utils import assert_close_verbose, low_precision_error_ok


def direct(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official code's N x N forms: 1/N sum_jk (I_j.I_k - T_j.T_k)^2 and 1/N sum_jk (I_j.T_k - I_k.T_j)^2."""
    n = image.shape[0]
    cross = image @ text.t()
    return ((image @ image.t() - text @ text.t()) ** 2).sum() / n, ((cross - cross.t()) ** 2).sum() / n


def features(n: int, d: int, *, noise: float = 1.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    text = F.normalize(image + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return image, text


def grads(fn, image, text, w1=0.7, w2=1.3):
    image, text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    inmodal, crossmodal = fn(image, text)
    (w1 * inmodal + w2 * crossmodal).backward()
    return inmodal.detach(), crossmodal.detach(), image.grad, text.grad


@pytest.mark.parametrize("n,d,noise", [(1, 8, 1.0), (7, 5, 1.0), (33, 64, 0.3), (130, 96, 0.01)])
def test_matches_direct_formulas_fp32(n, d, noise):
    image, text = features(n, d, noise=noise)
    want = grads(direct, image, text)
    got = grads(cyclic_losses, image.float(), text.float())
    for g, w, name in zip(got, want, ("inmodal", "crossmodal", "grad image", "grad text")):
        assert g.dtype == torch.float32
        assert_close_verbose(g, w, atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("n,d", [(37, 1), (37, 3), (40, 7), (16, 64)])
def test_row_chunks(monkeypatch, n, d):
    # several row chunks, the last one partial; d = 1 included
    from pyprotoclip.losses import cyclip

    monkeypatch.setattr(cyclip, "_CHUNK_ROWS", 8)
    image, text = features(n, d, noise=0.3, seed=5)
    want = grads(direct, image, text)
    for dtype, atol, rtol in ((torch.float64, 1e-12, 1e-11), (torch.float32, 1e-6, 1e-5)):
        got = grads(cyclic_losses, image.to(dtype), text.to(dtype))
        for g, w, name in zip(got, want, ("inmodal", "crossmodal", "grad image", "grad text")):
            assert_close_verbose(g, w.to(dtype), atol=atol, rtol=rtol, name=f"{name} {dtype}")


def test_matches_direct_formulas_float64_to_rounding():
    image, text = features(50, 40, noise=0.5)
    for g, w, name in zip(grads(cyclic_losses, image, text), grads(direct, image, text), ("in", "cross", "gi", "gt")):
        assert g.dtype == torch.float64
        assert_close_verbose(g, w, atol=1e-13, rtol=1e-12, name=name)


def test_bf16_accumulates_in_fp32():
    image64, text64 = features(300, 64, noise=0.5, seed=3)
    image, text = image64.bfloat16(), text64.bfloat16()
    # the oracle: float64 on the very bf16 inputs
    want = grads(direct, image.double(), text.double())
    got = grads(cyclic_losses, image, text)
    same_dtype = grads(direct, image, text)  # the N x N forms computed in bf16
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    for g, w, name in zip(got[:2], want[:2], ("inmodal", "crossmodal")):
        assert_close_verbose(g, w, atol=1e-6, rtol=1e-5, name=name)  # fp32 accumulation, not bf16
    for g, r, w, name in zip(got[2:], same_dtype[2:], want[2:], ("grad image", "grad text")):
        low_precision_error_ok(g, r, w, slack=1e-6, name=name)
        assert_close_verbose(g, w, atol=1e-6, rtol=2**-8, name=name)  # only the final rounding to bf16


def test_autocast_does_not_lower_the_accumulation():
    image, text = features(64, 32, noise=0.5, seed=4)
    want = grads(cyclic_losses, image.float(), text.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads(cyclic_losses, image.float(), text.float())
    for g, w, name in zip(got, want, ("inmodal", "crossmodal", "grad image", "grad text")):
        assert g.dtype == torch.float32
        assert_close_verbose(g, w, atol=1e-6, rtol=1e-5, name=name)


def test_hand_computed_two_by_two():
    # I = [e1, (0.6, 0.8)], T = [e2, e1]:
    # I I^T - T T^T = [[0, 0.6], [0.6, 0]]  -> 0.72 / 2 = 0.36
    # I T^T = [[0, 1], [0.8, 0.6]], minus its transpose = [[0, 0.2], [-0.2, 0]] -> 0.08 / 2 = 0.04
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    inmodal, crossmodal = cyclic_losses(image, text)
    assert float(inmodal) == pytest.approx(0.36, abs=1e-6) and float(crossmodal) == pytest.approx(0.04, abs=1e-6)
    # identical towers: both terms vanish exactly
    assert [float(x) for x in cyclic_losses(image, image)] == [0.0, 0.0]


def test_gradcheck_float64():
    image, text = features(6, 4)
    assert torch.autograd.gradcheck(cyclic_losses, (image.requires_grad_(), text.requires_grad_()))


@pytest.mark.parametrize(
    "image,text,match",
    [
        (torch.zeros(4, 3), torch.zeros(4, 5), "text_features"),
        (torch.zeros(4, 3), torch.zeros(5, 3), "text_features"),
        (torch.zeros(4), torch.zeros(4), "image_features"),
        (torch.zeros(0, 3), torch.zeros(0, 3), "image_features"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3), "image_features"),
        (torch.zeros(4, 3), [[0.0] * 3] * 4, "text_features"),
        (torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), "image_features"),
        (torch.ones(1, 2), torch.tensor([[float("inf"), 0.0]]), "text_features"),
    ],
)
def test_bad_input_names_the_argument(image, text, match):
    with pytest.raises(ValueError, match=match):
        cyclic_losses(image, text)


def test_value_checks_skipped_in_training_steps():
    with skip_value_checks():
        inmodal, _ = cyclic_losses(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2))
    assert math.isnan(float(inmodal))


# ---- the fused penalty: lambda1 * inmodal + lambda2 * crossmodal ------------------------------------------

LAMBDAS = [(0.25, 0.25), (0.25, 0.5), (0.3, -0.3), (0.0, 0.7)]


def penalty_grads(fn, image, text, w1, w2):
    """(penalty, inmodal, crossmodal, grad image, grad text) of w1 * inmodal + w2 * crossmodal."""
    image, text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    if fn is cyclic_penalty:
        penalty, inmodal, crossmodal = cyclic_penalty(image, text, w1, w2)
        assert not inmodal.requires_grad and not crossmodal.requires_grad
    else:
        inmodal, crossmodal = fn(image, text)
        penalty = w1 * inmodal + w2 * crossmodal
    penalty.backward()
    return penalty.detach(), inmodal.detach(), crossmodal.detach(), image.grad, text.grad


@pytest.mark.parametrize("w1,w2", LAMBDAS)
@pytest.mark.parametrize("n,d,noise", [(7, 5, 1.0), (33, 64, 0.3), (130, 96, 0.01)])
def test_penalty_matches_direct_formulas_fp32(n, d, noise, w1, w2):
    image, text = features(n, d, noise=noise, seed=11)
    want = penalty_grads(direct, image, text, w1, w2)
    got = penalty_grads(cyclic_penalty, image.float(), text.float(), w1, w2)
    for g, w, name in zip(got, want, ("penalty", "inmodal", "crossmodal", "grad image", "grad text")):
        assert g.dtype == torch.float32
        assert_close_verbose(g, w, atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("w1,w2", LAMBDAS)
def test_penalty_row_chunks_and_float64(monkeypatch, w1, w2):
    from pyprotoclip.losses import cyclip

    monkeypatch.setattr(cyclip, "_CHUNK_ROWS", 8)
    image, text = features(37, 7, noise=0.3, seed=5)
    want = penalty_grads(direct, image, text, w1, w2)
    for dtype, atol, rtol in ((torch.float64, 1e-12, 1e-11), (torch.float32, 1e-6, 1e-5)):
        got = penalty_grads(cyclic_penalty, image.to(dtype), text.to(dtype), w1, w2)
        for g, w, name in zip(got, want, ("penalty", "inmodal", "crossmodal", "grad image", "grad text")):
            assert_close_verbose(g, w.to(dtype), atol=atol, rtol=rtol, name=f"{name} {dtype}")


@pytest.mark.parametrize("w1,w2", LAMBDAS)
def test_penalty_bf16_accumulates_in_fp32(w1, w2):
    image64, text64 = features(300, 64, noise=0.5, seed=3)
    image, text = image64.bfloat16(), text64.bfloat16()
    want = penalty_grads(direct, image.double(), text.double(), w1, w2)
    got = penalty_grads(cyclic_penalty, image, text, w1, w2)
    same_dtype = penalty_grads(direct, image, text, w1, w2)
    assert got[0].dtype == torch.float32 and got[3].dtype == torch.bfloat16
    for g, w, name in zip(got[:3], want[:3], ("penalty", "inmodal", "crossmodal")):
        assert_close_verbose(g, w, atol=1e-6, rtol=1e-5, name=name)
    for g, r, w, name in zip(got[3:], same_dtype[3:], want[3:], ("grad image", "grad text")):
        low_precision_error_ok(g, r, w, slack=1e-6, name=name)
        assert_close_verbose(g, w, atol=1e-6, rtol=2**-8, name=name)


@pytest.mark.parametrize("w1,w2", LAMBDAS + [(0.0, 0.0)])
def test_penalty_gradcheck_float64(w1, w2):
    image, text = features(6, 4, seed=2)
    assert torch.autograd.gradcheck(lambda i, t: cyclic_penalty(i, t, w1, w2)[0],
                                    (image.requires_grad_(), text.requires_grad_()))


def test_penalty_values_are_the_bits_of_cyclic_losses():
    image, text = features(64, 32, noise=0.5, seed=8)
    image, text = image.float(), text.float()
    inmodal, crossmodal = cyclic_losses(image, text)
    for w1, w2 in LAMBDAS:
        penalty, i, c = cyclic_penalty(image, text, w1, w2)
        assert torch.equal(i, inmodal) and torch.equal(c, crossmodal)
        assert torch.equal(penalty, w1 * inmodal + w2 * crossmodal)


@pytest.mark.parametrize("w1,w2,mults", [(0.25, 0.25, 2), (0.3, -0.3, 2), (0.25, 0.5, 4), (0.0, 0.7, 4), (0.0, 0.0, 0)])
def test_penalty_backward_does_only_the_needed_gemms(w1, w2, mults):
    """Backward multiply-adds: 2 N d^2 when one form has weight 0 (equal or opposite weights), 4 N d^2
    otherwise, none with both 0; the forward is 3 N d^2 either way (both terms are logged)."""
    n, d = 40, 16
    image, text = (t.float().requires_grad_() for t in features(n, d, seed=9))
    with _MatmulCount() as forward_count:
        penalty, _, _ = cyclic_penalty(image, text, w1, w2)
    with _MatmulCount() as backward_count:
        penalty.backward()
    assert forward_count.madds == 3 * n * d * d
    assert backward_count.madds == mults * n * d * d


class _MatmulCount(TorchDispatchMode):
    """Multiply-adds of the matrix-matrix products (mm, addmm, bmm, ..., out= and in-place forms included)."""

    def __init__(self):
        super().__init__()
        self.madds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul"):
            a, b = (args[1], args[2]) if name.startswith("add") or name == "baddbmm" else (args[0], args[1])
            self.madds += a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


def test_penalty_bad_input():
    with pytest.raises(ValueError, match="text_features"):
        cyclic_penalty(torch.zeros(4, 3), torch.zeros(5, 3), 0.25, 0.25)
    with pytest.raises(ValueError, match="image_features"):
        cyclic_penalty(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), 0.25, 0.25)
    for bad in (float("nan"), float("inf"), None, "0.25", torch.tensor(0.25)):
        with pytest.raises(ValueError, match="lambda2"):
            cyclic_penalty(torch.ones(2, 2), torch.ones(2, 2), 0.25, bad)
    with skip_value_checks():
        penalty, _, _ = cyclic_penalty(torch.tensor([[1.0, float("nan")]]), torch.ones(1, 2), 0.25, 0.25)
    assert math.isnan(float(penalty))


# ---- memory -----------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from pyprotoclip.losses import cyclic_losses
    torch.set_num_threads(2)

    def direct(i, t):
        c = i @ t.t()
        return ((i @ i.t() - t @ t.t()) ** 2).sum() / len(i), ((c - c.t()) ** 2).sum() / len(i)

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    def extra(fn, n, d):
        i = torch.randn(n, d).requires_grad_()
        t = torch.randn(n, d).requires_grad_()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        before = rss()
        a, b = fn(i, t)
        (a + b).backward()
        return max(0, peak() - before)

    extra(cyclic_losses, 256, 8), extra(direct, 256, 8)  # load BLAS and the thread pool first
    print(json.dumps({form: extra(cyclic_losses if form == "gram" else direct, int(n), int(d))
                      for form, n, d in (a.split(":") for a in sys.argv[1:])}))
    """
)


def _peak_extra_bytes(*runs: str) -> dict[str, int]:
    """Peak RSS growth of forward + backward for each "form:N:d", measured in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *runs], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_gram_form_memory_is_o_d_squared_at_n_65536():
    """Measured peak RSS growth of forward + backward at N = 65536 (an N x N fp32 matrix is 17.2 GB):
    a few N x d work buffers, nothing N x N. The N x N forms at N = 2048 show the measurement sees
    quadratic allocations."""
    n, d, small = 65536, 128, 2048
    got = _peak_extra_bytes(f"gram:{n}:{d}", f"direct:{small}:{d}")
    features_bytes = n * d * 4
    assert got["gram"] < 8 * features_bytes, f"peak extra {got['gram'] / 2**20:.0f} MiB for inputs of {features_bytes / 2**20:.0f} MiB"
    assert got["gram"] < 0.01 * n * n * 4
    assert got["direct"] > 3 * small * small * 4, f"direct form at N={small}: only {got['direct'] / 2**20:.0f} MiB measured"


# ---- across ranks -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SIZES = (3, 6)  # unequal per-rank batches for the cyclic terms
PER_RANK = 5  # the loss module (its contrastive part) needs equal batches


def _global_inputs():
    g = torch.Generator().manual_seed(7)
    n = max(sum(SIZES), 2 * PER_RANK)
    return [F.normalize(torch.randn(n, 12, generator=g), dim=1) for _ in range(4)]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        image, text, aug_image, aug_text = _global_inputs()
        out = {}
        # cyclic_losses alone, unequal batches
        lo = sum(SIZES[:rank])
        sl = slice(lo, lo + SIZES[rank])
        i, t = image[sl].clone().requires_grad_(), text[sl].clone().requires_grad_()
        inmodal, crossmodal = cyclic_losses(i, t)
        (0.7 * inmodal + 1.3 * crossmodal).backward()
        out.update(inmodal=inmodal.detach(), crossmodal=crossmodal.detach(), grad_image=i.grad, grad_text=t.grad)
        # the fused penalty with equal weights (b's backward skipped), same unequal batches
        i, t = image[sl].clone().requires_grad_(), text[sl].clone().requires_grad_()
        penalty, p_in, p_cross = cyclic_penalty(i, t, 0.25, 0.25)
        penalty.backward()
        out.update(penalty=penalty.detach(), penalty_terms=torch.stack([p_in, p_cross]),
                   penalty_grad_image=i.grad, penalty_grad_text=t.grad)
        # the whole loss module with the in-modal contrastive term
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        local = {k: v[sl].clone().requires_grad_() for k, v in
                 zip(("image_features", "text_features", "augmented_image_features", "augmented_text_features"),
                     (image, text, aug_image, aug_text))}
        log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
        terms = CyCLIPLoss(0.25, 0.5, inmodal=True)({**local, "logit_scale": log_scale.exp()})
        terms["loss"].backward()
        scale_grad = log_scale.grad.clone()
        dist.all_reduce(scale_grad)  # DDP averages a shared parameter's gradient
        out.update(terms={k: v.detach() for k, v in terms.items()}, scale_grad=scale_grad / world,
                   module_grads={k: v.grad for k, v in local.items()})
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_gloo_match_single_process(tmp_path):
    world = 2
    mp.spawn(_rank_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    image, text, aug_image, aug_text = _global_inputs()

    # cyclic terms: the same global value on every rank; gradients after DDP's average (/W) are the
    # single-process ones on the concatenated batch
    n = sum(SIZES)
    want = grads(direct, image[:n].double(), text[:n].double())
    for r in res:
        assert_close_verbose(r["inmodal"], want[0], atol=1e-6, rtol=1e-5, name="inmodal")
        assert_close_verbose(r["crossmodal"], want[1], atol=1e-6, rtol=1e-5, name="crossmodal")
    assert_close_verbose(torch.cat([r["grad_image"] for r in res]) / world, want[2], atol=1e-6, name="grad image")
    assert_close_verbose(torch.cat([r["grad_text"] for r in res]) / world, want[3], atol=1e-6, name="grad text")
    want_p = penalty_grads(direct, image[:n].double(), text[:n].double(), 0.25, 0.25)
    for r in res:
        assert_close_verbose(r["penalty"], want_p[0], atol=1e-6, rtol=1e-5, name="penalty")
        assert torch.equal(r["penalty_terms"], torch.stack([r["inmodal"], r["crossmodal"]]))
    assert_close_verbose(torch.cat([r["penalty_grad_image"] for r in res]) / world, want_p[3], atol=1e-6, name="penalty grad image")
    assert_close_verbose(torch.cat([r["penalty_grad_text"] for r in res]) / world, want_p[4], atol=1e-6, name="penalty grad text")

    # the loss module: cyclic terms global, contrastive terms the mean of the rank-local ones
    names = ("image_features", "text_features", "augmented_image_features", "augmented_text_features")
    full = {k: v[: world * PER_RANK].clone().requires_grad_() for k, v in zip(names, (image, text, aug_image, aug_text))}
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    terms = CyCLIPLoss(0.25, 0.5, inmodal=True)({**full, "logit_scale": log_scale.exp()})
    terms["loss"].backward()
    for key, value in terms.items():
        got = [r["terms"][key] for r in res]
        if "cyclic" in key:
            for g in got:
                assert_close_verbose(g, value, atol=1e-6, rtol=1e-5, name=key)
    for key in ("contrastive_loss", "inmodal_contrastive_loss", "crossmodal_contrastive_loss"):
        assert_close_verbose(torch.stack([r["terms"][key] for r in res]).mean(), terms[key], atol=1e-6, rtol=1e-5, name=key)
    for key in names:
        got = torch.cat([r["module_grads"][key] for r in res]) / world
        assert_close_verbose(got, full[key].grad, atol=1e-6, rtol=1e-5, name=f"grad {key}")
    for r in res:
        assert_close_verbose(r["scale_grad"], log_scale.grad, atol=1e-6, rtol=1e-5, name="grad logit scale")


# ---- the loss module and the method -----------------------------------------------------------------------

def _outputs(n=12, d=16, inmodal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {"image_features": F.normalize(torch.randn(n, d, generator=g), dim=1),
           "text_features": F.normalize(torch.randn(n, d, generator=g), dim=1),
           "logit_scale": torch.tensor(1 / 0.07)}
    if inmodal:
        out["augmented_image_features"] = F.normalize(torch.randn(n, d, generator=g), dim=1)
        out["augmented_text_features"] = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return out


def test_loss_terms_and_total():
    from pyprotoclip.ops import infonce_loss

    out = _outputs()
    terms = CyCLIPLoss(0.25, 0.5)(out)
    assert list(terms) == ["contrastive_loss", "inmodal_cyclic_loss", "crossmodal_cyclic_loss", "loss"]
    inmodal, crossmodal = direct(out["image_features"].double(), out["text_features"].double())
    clip = infonce_loss(out["image_features"], out["text_features"], out["logit_scale"])
    assert float(terms["contrastive_loss"]) == pytest.approx(float(clip), abs=1e-6)
    assert float(terms["inmodal_cyclic_loss"]) == pytest.approx(float(inmodal), rel=1e-5)
    assert float(terms["crossmodal_cyclic_loss"]) == pytest.approx(float(crossmodal), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(clip + 0.25 * inmodal + 0.5 * crossmodal), rel=1e-5)
    # the logit scale does not enter the cyclic terms
    other = CyCLIPLoss(0.25, 0.5)({**out, "logit_scale": torch.tensor(3.0)})
    assert float(other["inmodal_cyclic_loss"]) == float(terms["inmodal_cyclic_loss"])


def test_inmodal_contrastive_term_is_the_official_one_way_form():
    out = _outputs(inmodal=True)
    terms = CyCLIPLoss(0.0, 0.0, inmodal=True)(out)
    assert set(terms) == {"contrastive_loss", "crossmodal_contrastive_loss", "inmodal_contrastive_loss", "loss"}
    s = float(out["logit_scale"])
    target = torch.arange(12)
    i, t = out["image_features"].double(), out["text_features"].double()
    ia, ta = out["augmented_image_features"].double(), out["augmented_text_features"].double()
    cross = 0.5 * (F.cross_entropy(s * i @ t.t(), target) + F.cross_entropy(s * t @ i.t(), target))
    inm = 0.5 * (F.cross_entropy(s * i @ ia.t(), target) + F.cross_entropy(s * t @ ta.t(), target))
    assert float(terms["crossmodal_contrastive_loss"]) == pytest.approx(float(cross), rel=1e-5)
    assert float(terms["inmodal_contrastive_loss"]) == pytest.approx(float(inm), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(0.5 * (cross + inm)), rel=1e-5)
    with pytest.raises(ValueError, match="augmented_image_features"):
        CyCLIPLoss(inmodal=True)(_outputs())


def test_add_cyclic_terms_for_other_methods():
    out = _outputs()
    terms = {}
    assert add_cyclic_terms(terms, out["image_features"], out["text_features"], 0.0, 0.0) == 0.0 and terms == {}
    total = add_cyclic_terms(terms, out["image_features"], out["text_features"], 0.0, 2.0)
    assert set(terms) == {"inmodal_cyclic_loss", "crossmodal_cyclic_loss"}
    assert float(total) == pytest.approx(2 * float(terms["crossmodal_cyclic_loss"]))
    assert cyclic_weights({"cylambda1": None, "cylambda2": 0.5}) == (0.0, 0.5)
    assert cyclic_weights({"cylambda1": None, "cylambda2": None}, 0.25) == (0.25, 0.25)


def test_method_flags():
    from pyprotoclip.train import params as P

    p = P.defaults()
    assert p["cylambda1"] is None and p["cylambda2"] is None and p["inmodal"] is False
    method = get_method("cyclip")({**p, "method": "cyclip"})
    assert (method.cylambda1, method.cylambda2) == (0.25, 0.25)
    loss = method.build_loss()
    assert (loss.cylambda1, loss.cylambda2, loss.inmodal) == (0.25, 0.25, False)
    model = torch.nn.Linear(2, 2)
    assert method.build_model(model) is model  # without --inmodal the model is left alone
    pre, tok = object(), object()
    assert method.train_transforms(pre, tok) == (pre, tok)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="cylambda2"):
            P.validate({**p, "train_data": "x", "method": "cyclip", "cylambda2": bad})


# ---- --inmodal: two views ---------------------------------------------------------------------------------

def test_two_view_model_keeps_the_state_dict_keys_and_forward():
    from pyprotoclip.losses.views import TwoViewModel
    from pyprotoclip.models import create_model

    base = create_model("tiny-vit", seed=0)[0]
    keys = list(base.state_dict())
    model = TwoViewModel(base)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in base.named_parameters()]
    assert model.logit_scale is base.logit_scale
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 2, 3, 64, 64, generator=g), torch.randint(1, 400, (3, 2, 32), generator=g)
    model.eval()
    with torch.no_grad():
        out = model(image, text)
        plain = base(image[:, 1], text[:, 1])
        single = model(image[:, 0], text[:, 0])
    assert out["image_features"].shape == (3, 128) and out["augmented_text_features"].shape == (3, 128)
    torch.testing.assert_close(out["augmented_image_features"], plain["image_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["augmented_text_features"], plain["text_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single["image_features"], out["image_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_image(image[:, 0]), base.encode_image(image[:, 0]))
    with pytest.raises(ValueError, match="image"):
        model(torch.zeros(2, 3, 3, 64, 64), torch.zeros(2, 3, 32, dtype=torch.long))


def test_eda_is_deterministic_and_lexicon_free():
    from pyprotoclip.losses.views import clean_caption, eda

    caption = "A red-and-blue Circle, on the LEFT of 2 small squares!"
    assert clean_caption(caption) == "a red and blue circle on the left of small squares"
    words = clean_caption(caption).split()
    outs = {eda(caption, seed) for seed in range(40)}
    assert eda(caption, 3) == eda(caption, 3)
    assert len(outs) > 5
    for out in outs:
        got = out.split()
        assert set(got) <= set(words)  # swap, deletion and insertion reuse the caption's own words
        assert sorted(got) == sorted(words) or len(got) in (len(words) - 1, len(words) + 1) or len(got) < len(words)
    assert eda("x", 0) == "x" and eda("!!!", 0) == "!!!"


def test_two_view_transforms():
    from PIL import Image

    from pyprotoclip.losses.views import TwoViewPreprocess, TwoViewTokenizer, eda
    from pyprotoclip.models import create_model

    _, preprocess, _, tokenizer = create_model("tiny-vit")
    method = get_method("cyclip")({"inmodal": True, "seed": 5})
    pre, tok = method.train_transforms(preprocess, tokenizer)
    assert isinstance(pre, TwoViewPreprocess) and isinstance(tok, TwoViewTokenizer)
    image = Image.fromarray((torch.rand(80, 80, 3) * 255).to(torch.uint8).numpy())
    torch.manual_seed(1)
    a = pre(image)
    torch.manual_seed(1)
    b = pre(image)
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)  # seeded per sample by the pipeline: reproducible
    tokens = tok(["a big red circle on the left", "two small squares"])
    assert tokens.shape == (2, 2, 32)
    assert torch.equal(tokens[:, 0], tokenizer(["a big red circle on the left", "two small squares"]))
    assert torch.equal(tokens[1, 1], tokenizer([eda("two small squares", 5)])[0])
