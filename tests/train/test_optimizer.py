"""The trainer's AdamW: torch's fused kernel, equal to the per-parameter loop (what open_clip steps) to
fp32 rounding, with the trainer's parameter groups (weight decay on some, none on others)."""

import pytest
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


def test_a_state_saved_by_the_loop_optimizer_loads_into_the_fused_one():
    """An older checkpoint (or open_clip's) holds "fused": None in its groups; loading it must not switch the
    optimizer back to the loop (with a GradScaler that would fail: the scaler hands a fused optimizer its scale)."""
    loop_groups, fused_groups = _groups(0), _groups(0)
    loop = torch.optim.AdamW(loop_groups, lr=P["lr"], betas=(P["beta1"], P["beta2"]), eps=P["eps"])
    g = torch.Generator().manual_seed(2)
    for q in (q for grp in loop_groups for q in grp["params"]):
        q.grad = torch.randn(q.shape, generator=g)
    loop.step()
    fused = _adamw(fused_groups, P, torch.device("cpu"))
    with torch.no_grad():
        for a, b in zip((q for grp in fused_groups for q in grp["params"]), (q for grp in loop_groups for q in grp["params"])):
            a.copy_(b)
            a.grad = b.grad.clone()
    fused.load_state_dict(loop.state_dict())
    assert all(grp["fused"] for grp in fused.param_groups)
    assert [grp["weight_decay"] for grp in fused.param_groups] == [0.2, 0.0]  # the saved hyper-parameters load
    fused.grad_scale, fused.found_inf = torch.ones(()), torch.zeros(())  # as GradScaler.step hands them over
    fused.step()
    del fused.grad_scale, fused.found_inf
    loop.step()
    for a, b in zip((q for grp in fused_groups for q in grp["params"]), (q for grp in loop_groups for q in grp["params"])):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_the_trainer_builds_the_fused_optimizer(fake_train, monkeypatch):
    built = []
    from pyprotoclip.train import setup

    real = setup._adamw
    monkeypatch.setattr(setup, "_adamw", lambda *a: built.append(real(*a)) or built[-1])
    fake_train(name="fused")
    assert len(built) == 1 and all(grp["fused"] for grp in built[0].param_groups)


def test_a_state_with_another_number_of_groups_is_refused():
    three = _groups(0) + [{"params": [torch.zeros(2, requires_grad=True)], "weight_decay": 0.0}]
    saved = torch.optim.AdamW(three, lr=P["lr"]).state_dict()
    with pytest.raises(ValueError, match="different number of parameter groups"):
        _adamw(_groups(0), P, torch.device("cpu")).load_state_dict(saved)


def test_resuming_a_run_saved_by_the_loop_optimizer_steps_fused(fake_train, monkeypatch):
    """The trainer's own resume path (checkpoint.restore_training_state) with a checkpoint whose optimizer
    was the per-parameter loop, as every checkpoint written before the fused kernel was."""
    from pyprotoclip.train import setup

    real = setup._adamw
    monkeypatch.setattr(setup, "_adamw", lambda groups, p, device: torch.optim.AdamW(
        groups, lr=p["lr"], betas=(p["beta1"], p["beta2"]), eps=p["eps"]))
    fake_train(name="resumed", epochs=1)
    built = []
    monkeypatch.setattr(setup, "_adamw", lambda *a: built.append(real(*a)) or built[-1])
    summary = fake_train(name="resumed", epochs=2, resume="latest")
    assert summary["step"] == 4
    assert len(built) == 1 and all(grp["fused"] for grp in built[0].param_groups)
