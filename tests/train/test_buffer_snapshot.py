"""BufferSnapshot.of: the BatchNorm buffers' copies live in storage made once per model, and restore is exact."""

from __future__ import annotations

import gc
import weakref

import torch

from pyprotoclip.train.faults import BufferSnapshot


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.BatchNorm2d(4, track_running_stats=False), torch.nn.BatchNorm1d(2))


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def _forward(net, scale=1.0):
    net.train()
    net[:4](torch.randn(2, 3, 6, 6) * scale)


def test_storage_is_reused_across_steps_and_restore_is_exact():
    net = _net()
    _forward(net)
    snap = BufferSnapshot.of(net)
    assert len(snap.buffers) == 6  # two modules with running statistics, three buffers each
    ptrs = [s.data_ptr() for s in snap.saved]
    for _ in range(3):
        _forward(net)  # a good step moves the statistics on
        before = _state(net)
        again = BufferSnapshot.of(net)
        assert again is snap and [s.data_ptr() for s in again.saved] == ptrs  # no new storage
        _forward(net, float("nan"))  # a non-finite forward: NaN in the running statistics
        assert not torch.isfinite(net[1].running_mean).all()
        again.restore()
        after = _state(net)
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_replaced_buffer_makes_a_new_snapshot():
    net = _net()
    snap = BufferSnapshot.of(net)
    net.double()  # replaces every buffer tensor
    fresh = BufferSnapshot.of(net)
    assert fresh is not snap and fresh.saved[0].dtype == torch.float64
    before = _state(net)
    net.train()
    net[:2](torch.full((2, 3, 6, 6), float("inf"), dtype=torch.float64))
    fresh.restore()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_the_kept_snapshot_does_not_keep_the_model_alive():
    net = _net()
    BufferSnapshot.of(net)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None
