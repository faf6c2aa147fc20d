"""The trainer's AdamW: torch's fused kernel, equal to the per-parameter loop (what open_clip steps) to
fp32 rounding, with the trainer's parameter groups (weight decay on some, none on others)."""

import torch

from pyprotoclip.train.setup import _adamw

P = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6}


def _groups(seed):
    g = torch.Generator().manual_seed(seed)
    decay = [torch.randn(33, 7, generator=g).requires_grad_(), torch.randn(5, 3, 3, 2, generator=g).requires_grad_()]
    plain = [torch.randn(7, generator=g).requires_grad_(), torch.tensor(2.5).requires_grad_()]
    return [{"params": decay, "weight_decay": 0.2}, {"params": plain, "weight_decay": 0.0}]


def test_fused_on_cpu_and_equal_to_the_loop_to_rounding():
    fused_groups, loop_groups = _groups(0), _groups(0)
    fused = _adamw(fused_groups, P, torch.device("cpu"))
    loop = torch.optim.AdamW(loop_groups, lr=P["lr"], betas=(P["beta1"], P["beta2"]), eps=P["eps"], foreach=False)
    assert fused.defaults["fused"] is True and not loop.defaults["fused"]
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        for fg, lg in zip(fused_groups, loop_groups):
            for a, b in zip(fg["params"], lg["params"]):
                a.grad = torch.randn(a.shape, generator=g)
                b.grad = a.grad.clone()
        fused.step()
        loop.step()
    moved = 0.0
    for fg, lg, start in zip(fused_groups, loop_groups, _groups(0)):
        for a, b, a0 in zip(fg["params"], lg["params"], start["params"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            moved = max(moved, float((a - a0).detach().abs().max()))
    assert moved > 1e-2  # six steps of lr 1e-2 did move the weights


def test_fused_choice_survives_a_resume():
    groups = _groups(0)
    opt = _adamw(groups, P, torch.device("cpu"))
    for q in (q for grp in groups for q in grp["params"]):
        q.grad = torch.ones_like(q)
    opt.step()
    again = torch.optim.AdamW(_groups(0), lr=P["lr"])  # a fresh, unfused optimizer loading the checkpoint
    again.load_state_dict(opt.state_dict())
    assert all(grp["fused"] for grp in again.param_groups)

