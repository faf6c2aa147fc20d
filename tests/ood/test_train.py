"""ood train: the official schedule and model, a short run that lowers the loss, exact resume, CE, bad input."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from pyprotoclip.checkpoint import load_checkpoint
from pyprotoclip.ood import train as T
from pyprotoclip.ood.models import build_model, resolve_model_cfg


def test_palm_lr_follows_the_official_schedule():
    spe, epochs, base = 4, 20, 0.5

    def official(step):  # util/train_utils.py adjust_learning_rate, called after step `step`
        max_steps, warm = epochs * spe, 10 * spe
        if step < warm:
            return base * step / warm
        q = 0.5 * (1 + math.cos(math.pi * (step - warm) / (max_steps - warm)))
        return base * q + base * 0.001 * (1 - q)

    lrs = [T.palm_lr(t, base_lr=base, steps_per_epoch=spe, epochs=epochs) for t in range(epochs * spe)]
    assert lrs[0] == base  # the first step runs at the optimizer's initial lr
    assert lrs[1] == 0.0
    assert all(lrs[t] == pytest.approx(official(t - 1), abs=1e-15) for t in range(1, epochs * spe))
    end = T.palm_lr(epochs * spe + 1, base_lr=base, steps_per_epoch=spe, epochs=epochs)
    assert end == pytest.approx(1e-3 * base, abs=1e-15)  # cosine ends at 1e-3 x lr


class _OfficialBlock(torch.nn.Module):  # models/resnet.py BasicBlock (the parameter layout)
    def __init__(self, i, o, s):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(i, o, 3, s, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(o)
        self.conv2 = torch.nn.Conv2d(o, o, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(o)
        self.shortcut = torch.nn.Sequential()
        if s != 1 or i != o:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(i, o, 1, s, bias=False), torch.nn.BatchNorm2d(o))


def _official_resnet_shapes(blocks):
    mods = [torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(64)]
    i = 64
    for planes, n, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
        for j in range(n):
            mods.append(_OfficialBlock(i, planes, stride if j == 0 else 1))
            i = planes
    return sorted(tuple(p.shape) for m in mods for p in m.parameters())


@pytest.mark.parametrize("name,blocks", [("resnet18", (2, 2, 2, 2)), ("resnet34", (3, 4, 6, 3))])
def test_cifar_stem_resnet_is_the_official_architecture(name, blocks):
    net = build_model(resolve_model_cfg(name))
    assert sorted(tuple(p.shape) for p in net.encoder.parameters()) == _official_resnet_shapes(blocks)
    head = [tuple(p.shape) for p in net.head.parameters()]
    assert head == [(512, 512), (512,), (128, 512), (128,)]  # Linear-ReLU-Linear to 128
    if name == "resnet18":
        with torch.no_grad():
            out = net.eval()(torch.randn(2, 3, 32, 32))
            assert net.encode(torch.randn(2, 3, 32, 32)).shape == (2, 512)
        assert out.shape == (2, 128) and torch.allclose(out.norm(dim=1), torch.ones(2))


def test_two_step_run_lowers_the_loss_and_writes_a_checkpoint(train_params):
    summary = T.run(train_params(epochs=2))  # one step per epoch: the same 8 samples twice
    rows = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "results.jsonl"))]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert train_rows[1]["mle"] < train_rows[0]["mle"]
    state = load_checkpoint(os.path.join(summary["run_dir"], "checkpoints", "epoch_2.pt"))
    assert state["format"] == T.FORMAT and state["step"] == 2 and state["num_classes"] == 20
    assert torch.equal(state["method_state"]["prototypes"], summary["loss_fn"].prototypes)
    assert state["method_state"]["prototypes"].shape == (40, 128)


def test_done_line_says_unknown_speed_without_a_timed_step_and_counts_this_process(train_params):
    s = T.run(train_params(name="one"))  # one step: an epoch's first step (start-up) is never timed
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert s["samples_per_s"] is None and "done: step 1 (1 in this process) in " in log and "n/a samples/s" in log
    rows = [json.loads(line) for line in open(os.path.join(s["run_dir"], "results.jsonl"))]
    assert [r for r in rows if r["type"] == "summary"][-1]["samples_per_s"] is None
    common = dict(epochs=2, train_num_samples=24)
    T.run(train_params(name="cut", stop_after_steps=4, **common))
    s = T.run(train_params(name="cut", resume="latest", **common))
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert s["steps_this_process"] == 2 and "done: step 6 (2 in this process)" in log and s["samples_per_s"] > 0


def test_interrupted_and_resumed_run_is_exact(train_params):
    common = dict(epochs=2, train_num_samples=24, lr=0.1, warmup_epochs=1)  # 3 steps per epoch
    full = T.run(train_params(name="full", **common))
    T.run(train_params(name="cut", stop_after_steps=4, **common))  # stops inside epoch 2, saves epoch_latest.pt
    resumed = T.run(train_params(name="cut", resume="latest", **common))
    assert resumed["step"] == full["step"] == 6
    a, b = full["net"].state_dict(), resumed["net"].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert torch.equal(full["loss_fn"].prototypes, resumed["loss_fn"].prototypes)


def test_without_a_terminal_a_progress_line_comes_on_the_time_trigger(train_params, monkeypatch):
    from pyprotoclip import progress as progress_module

    t = [0.0]

    def fake_now():  # every reading of the clock is 10 s later than the one before
        t[0] += 10.0
        return t[0]

    monkeypatch.setattr(progress_module, "_now", fake_now)
    summary = T.run(train_params(epochs=1, train_num_samples=48, log_every_n_steps=1000))  # 6 steps, one Train line
    lines = open(os.path.join(summary["run_dir"], "out.log")).read().splitlines()
    progress = [ln.split("| INFO | ", 1)[1] for ln in lines if "Progress:" in ln]
    # the clock starts at 10; steps 1, 2, 3 ask at 20, 30, 40: due at step 3, marked at 50; steps 4, 5 ask at 60, 70;
    # step 6 is the epoch's end (its Train Epoch line)
    assert [ln.split(" step ", 1)[1].split(" ", 1)[0] for ln in progress] == ["3/6"], progress
    assert all(" | ETA " in ln and "samples/s" in ln for ln in progress), progress


def test_cross_entropy_baseline_has_a_classifier(train_params):
    summary = T.run(train_params(loss="ce"))
    net = summary["net"]
    assert net.head is None and net.fc is not None and summary["loss_fn"] is None
    assert net.logits(torch.randn(2, 3, 64, 64)).shape == (2, 20)


def test_unlabelled_variant_trains(train_params):
    summary = T.run(train_params(unlabelled=True, num_classes=4))
    assert summary["loss_fn"].class_masks is False and summary["loss_fn"].prototypes.shape == (8, 128)


@pytest.mark.parametrize("overrides,match", [
    ({"num_classes": 3}, r"class labels must lie in \[0, 3\)"),
    ({"backbone": "no-such-net"}, "model: unknown architecture"),
    ({"loss": "mse"}, "loss"),
    ({"batch_size": 0}, "batch-size"),
    ({"unlabelled": True, "loss": "ce"}, "unlabelled"),
    ({"image_size": 32}, "image-size"),
    ({"augment": "autoaugment"}, "augment"),
    ({"crop_scale": 0.0}, "crop-scale"),
    ({"train_data": None}, "train-data"),
])
def test_bad_input(train_params, overrides, match):
    with pytest.raises(ValueError, match=match):
        T.run(train_params(**overrides))


def test_resume_refuses_another_loss(train_params):
    T.run(train_params(name="a"))
    with pytest.raises(ValueError, match="--loss"):
        T.run(train_params(name="a", resume="latest", loss="ce", epochs=2))


def test_views_follow_the_official_pipelines():
    from torchvision import transforms as TV

    from pyprotoclip.ood.models import MultiView, train_transform

    simclr = [type(t) for t in train_transform(32, (0.5,) * 3, (0.5,) * 3).transforms]
    assert simclr == [TV.RandomResizedCrop, TV.RandomHorizontalFlip, TV.RandomApply, TV.RandomGrayscale, TV.ToTensor,
                      TV.Normalize]
    crop = train_transform(32, (0.5,) * 3, (0.5,) * 3, augment="crop", crop_scale=0.5)
    assert [type(t) for t in crop.transforms] == [TV.RandomResizedCrop, TV.RandomHorizontalFlip, TV.ToTensor, TV.Normalize]
    assert crop.transforms[0].scale == (0.5, 1.0)
    from PIL import Image

    views = MultiView(crop, 2)(Image.new("RGB", (64, 64), (200, 10, 10)))
    assert views.shape == (2, 3, 32, 32)
