"""CLIP training gives the same weights, bit for bit, as the trainer before the method layer existed.

The digests in pins/clip_weights.json were taken from a short fake-data run of that trainer (one thread,
fp32); a refactor of the training loop must not change what CLIP computes. Floating-point results
depend on the CPU's vector width and the torch build, so the pins apply where they were taken. The pinned
run stepped torch's per-parameter AdamW loop; the trainer now uses the fused kernel (equal to rounding,
tests/train/test_optimizer.py), so here the loop is put back to compare the rest bit for bit.
"""

import hashlib
import json
import os

import pytest
import torch

PINS = json.load(open(os.path.join(os.path.dirname(__file__), "pins", "clip_weights.json")))


def _digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _loop_adamw(param_groups, p, device):
    return torch.optim.AdamW(param_groups, lr=p["lr"], betas=(p["beta1"], p["beta2"]), eps=p["eps"])


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case,overrides", [("accum1", {}), ("accum2", {"accum_freq": 2, "batch_size": 4})])
def test_clip_weights_are_bit_identical_to_the_pinned_run(fake_train, one_thread, monkeypatch, case, overrides):
    here = (torch.backends.cpu.get_cpu_capability(), torch.__version__)
    if here != (PINS["cpu_capability"], PINS["torch"]):
        pytest.skip(f"pins were taken with {PINS['cpu_capability']} / torch {PINS['torch']}, this is {here[0]} / {here[1]}")
    monkeypatch.setattr("pyprotoclip.train.setup._adamw", _loop_adamw)
    summary = fake_train(name=case, epochs=2, seed=0, **overrides)
    assert summary["step"] == 4
    assert _digest(summary["model"]) == PINS[case]
