"""Non-finite steps: a NaN/Inf loss or gradient skips the step exactly (weights, optimizer, buffers as they
were), is counted and logged, and --max-nonfinite steps in a row stop the run with a one-line error."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os

import pytest
import torch

from pyprotoclip.losses import ClipLoss, StepContext
from pyprotoclip.train.faults import TrainingError
from pyprotoclip.train.step import train_step

LN_100 = math.log(100.0)


class _Poisoned(torch.nn.Module):
    """Wraps the model of one step: ``mode`` "loss" makes the image features NaN (so the loss is NaN),
    "gradients" leaves the loss finite and makes the gradient reaching the image features NaN."""

    def __init__(self, model: torch.nn.Module, mode: str) -> None:
        super().__init__()
        self.inner, self.mode = model, mode

    def forward(self, image, text):
        out = dict(self.inner(image, text))
        feats = out["image_features"]
        if self.mode == "loss":
            out["image_features"] = feats * float("nan")
        elif feats.requires_grad:
            feats.register_hook(lambda g: torch.full_like(g, float("nan")))
        return out


def _state(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def _assert_equal_state(a, b, *, same_lr=True):
    (wa, oa), (wb, ob) = a, b
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    drop = set() if same_lr else {"lr"}
    assert [{k: v for k, v in g.items() if k not in drop} for g in oa["param_groups"]] == \
        [{k: v for k, v in g.items() if k not in drop} for g in ob["param_groups"]]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]) if isinstance(v, torch.Tensor) else v == ob["state"][i][k], (i, k)


@pytest.fixture
def poison(monkeypatch):
    """poison(steps, mode): the trainer's steps numbered in ``steps`` (0-based) run a poisoned model; records
    the model and optimizer state around each step in ``calls``."""
    from pyprotoclip.train import epoch as epoch_mod

    real = epoch_mod.train_step
    calls = []

    def install(steps, mode="loss"):
        def step(model, loss_fn, batches, optimizer, **kw):
            i = len(calls)
            before = _state(model, optimizer)
            used = _Poisoned(model, mode) if i in steps else model
            result = real(used, loss_fn, batches, optimizer, **kw)
            calls.append((before, _state(model, optimizer), result))
            return result

        monkeypatch.setattr(epoch_mod, "train_step", step)
        return calls

    return install


def _rows(run_dir, kind="train"):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "results.jsonl"))) if r["type"] == kind]


@pytest.mark.parametrize("method,model,mode", [("clip", "tiny-vit", "loss"), ("cyclip", "tiny-vit", "loss"),
                                               ("clip", "tiny-vit", "gradients")])
def test_a_non_finite_step_is_skipped_exactly_and_counted(fake_train, poison, method, model, mode):
    calls = poison({1}, mode)
    s = fake_train(method=method, model=model, epochs=2, train_num_samples=16)  # 2 steps per epoch, 4 in all
    assert s["step"] == 4 and len(calls) == 4
    before, after, result = calls[1]
    assert result.skipped == mode
    _assert_equal_state(before, after)  # weights (BatchNorm statistics too), optimizer moments and step counts
    assert not torch.isfinite(result.terms["loss"]) if mode == "loss" else torch.isfinite(result.terms["loss"])
    # the other steps update (the comparison above can fail) and training goes on after the skip
    for i in (0, 2, 3):
        b, a, r = calls[i]
        assert r.skipped is None
        assert not torch.equal(b[0]["text_projection"], a[0]["text_projection"]), i
    assert s["skipped_steps"] == 1
    rows = _rows(s["run_dir"])
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    assert all(r["loss_avg"] is not None and math.isfinite(r["loss_avg"]) for r in rows)  # the skip stays out of the means
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert f"step 2: non-finite {mode}" in log and "skipped 1 non-finite step(s)" in log
    assert 0 <= float(s["model"].logit_scale.detach()) <= LN_100


def test_max_nonfinite_steps_in_a_row_stop_the_run_with_a_one_line_error(fake_train, poison):
    poison(set(range(100)))
    with pytest.raises(TrainingError) as info:
        fake_train(max_nonfinite=3, epochs=1, train_num_samples=48)  # 6 steps; the 3rd skipped one in a row stops
    msg = str(info.value)
    assert "\n" not in msg and "--max-nonfinite 3" in msg and "3 steps in a row" in msg and "steps 1-3" in msg, msg


def test_a_finite_step_resets_the_count_in_a_row(fake_train, poison):
    poison({0, 1, 3, 4})  # never 3 in a row
    s = fake_train(max_nonfinite=3, epochs=1, train_num_samples=48)
    assert s["step"] == 6 and s["skipped_steps"] == 4


def test_max_nonfinite_0_never_stops_and_the_scales_stay_clamped(fake_train, poison):
    calls = poison(set(range(100)))
    s = fake_train(max_nonfinite=0, epochs=2, train_num_samples=16, lr=10.0)
    assert s["step"] == 4 and s["skipped_steps"] == 4
    _assert_equal_state(calls[0][0], calls[-1][1], same_lr=False)  # nothing moved (the schedule did)
    assert 0 <= float(s["model"].logit_scale.detach()) <= LN_100


def test_max_nonfinite_must_not_be_negative(fake_train):
    with pytest.raises(ValueError, match="max-nonfinite: expected an integer >= 0"):
        fake_train(max_nonfinite=-1)


class _Toy(torch.nn.Module):
    """A two-tower toy with BatchNorm: enough for the step's contract, fast."""

    def __init__(self) -> None:
        super().__init__()
        self.img = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8))
        self.txt = torch.nn.Embedding(50, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, image, text):
        return {"image_features": torch.nn.functional.normalize(self.img(image), dim=-1),
                "text_features": torch.nn.functional.normalize(self.txt(text).mean(1), dim=-1),
                "logit_scale": self.logit_scale.exp()}


def _toy_step(model, opt, scaler, *, nan=False, accum=1, clip=None):
    torch.manual_seed(0)
    image = torch.randn(8, 3, 2, 2)
    if nan:
        image[0, 0, 0, 0] = float("nan")
    text = torch.randint(0, 50, (8, 4))
    b = 8 // accum
    batches = [{"image": image[i * b:(i + 1) * b], "text": text[i * b:(i + 1) * b]} for i in range(accum)]
    return train_step(model, ClipLoss(), batches, opt, scaler=scaler, autocast=contextlib.nullcontext,
                      device=torch.device("cpu"), context=StepContext(step=0, epoch=0), grad_clip_norm=clip)


@pytest.mark.parametrize("accum,clip", [(1, None), (2, None), (1, 1.0)])
def test_a_nan_input_leaves_weights_optimizer_and_batchnorm_statistics_unchanged(accum, clip):
    model = _Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert _toy_step(model, opt, None, accum=accum, clip=clip).skipped is None  # optimizer state exists now
    before = _state(model, opt)
    result = _toy_step(model, opt, None, nan=True, accum=accum, clip=clip)
    assert result.skipped == "loss"
    _assert_equal_state(before, _state(model, opt))
    assert torch.isfinite(model.img[2].running_mean).all()
    assert _toy_step(model, opt, None, accum=accum, clip=clip).skipped is None
    assert not torch.equal(before[0]["img.1.weight"], model.img[1].weight)


def test_the_grad_scaler_s_own_skips_are_not_faults_and_a_nan_loss_leaves_its_scale():
    model = _Toy()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # a scale so large the gradients overflow: the scaler skips the update and halves the scale, as it does
    # while it finds its scale; the loss is finite, so the step is not a fault
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    before = _state(model, opt)
    result = _toy_step(model, opt, scaler)
    assert result.skipped is None and scaler.get_scale() == 2.0 ** 126
    assert torch.equal(before[0]["img.1.weight"], model.img[1].weight)  # the scaler did skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    assert _toy_step(model, opt, scaler).skipped is None
    before, scale = _state(model, opt), scaler.get_scale()
    result = _toy_step(model, opt, scaler, nan=True)
    assert result.skipped == "loss" and scaler.get_scale() == scale  # not a scale problem: the scale stays
    _assert_equal_state(before, _state(model, opt))


@pytest.mark.slow
def test_every_rank_skips_the_step_one_rank_found_non_finite(tmp_path):
    """Only rank 1's loss is NaN (its gradients, and so the all-reduced ones, are finite): both ranks skip,
    so the replicas stay identical."""
    from _two_ranks import run_two_forked_ranks

    w0, w1 = run_two_forked_ranks(tmp_path, "nonfinite")
    assert w0["skipped"] == w1["skipped"] == 1
    for k, v in w0["weights"].items():
        assert torch.equal(v, w1["weights"][k]), k
    assert "step 2: non-finite loss" in open(tmp_path / "logs" / "ddp" / "out.log").read()


def test_help_documents_max_nonfinite():
    from click.testing import CliRunner

    from pyprotoclip.ood.cli import ood
    from pyprotoclip.train.cli import train

    for cmd, args in ((train, ["--help"]), (ood, ["train", "--help"])):
        text = " ".join(CliRunner().invoke(cmd, args).output.split())
        assert "--max-nonfinite" in text and "0: never stop" in text and "[default: 20]" in text, text


@pytest.mark.slow
def test_a_non_finite_protoclip_step_is_skipped_exactly(poison, tmp_path):
    """ProtoCLIP on real shards (its episodes read by random access): the same exact skip, with prototypes."""
    from pyprotoclip.data import write_synthetic_dataset
    from pyprotoclip.train import params as P
    from pyprotoclip.train import trainer

    shards = write_synthetic_dataset(str(tmp_path / "data"), 48, num_val=0, num_ood=0, samples_per_shard=48,
                                     progress=False, processes=1)
    calls = poison({1})
    p = P.defaults()
    p.update(train_data=shards["train_shards"], model="tiny-vit", method="protoclip", batch_size=16, epochs=1, workers=0,
             warmup=1, logs=str(tmp_path / "logs"), precision="fp32", log_every_n_steps=1, lr=1e-3, episode_size=48,
             num_prototypes=4, kmeans_max_iter=2, add_projection_head=True, projection_dim=16, projection_hidden_dim=32,
             device="cpu", name="run")
    s = trainer.run(p)
    assert s["step"] == 3 and s["skipped_steps"] == 1
    assert [c[2].skipped for c in calls] == [None, "loss", None]
    assert "proto_loss" in calls[1][2].terms  # the prototype terms were on in the skipped step
    _assert_equal_state(calls[1][0], calls[1][1])
    assert not torch.equal(calls[2][0][0]["text_projection"], calls[2][1][0]["text_projection"])
    for name in ("logit_scale", "logit_scale_proto"):
        assert 0 <= float(getattr(s["model"], name).detach()) <= LN_100


def test_the_stop_message_says_when_the_weights_themselves_are_non_finite():
    from pyprotoclip.train.faults import NonFiniteGuard

    model = _Toy()
    guard = NonFiniteGuard(2)
    guard.record("loss", 5, model, {"loss": torch.tensor(float("nan"))})
    with torch.no_grad():
        model.img[1].weight[0, 0] = float("inf")
    with pytest.raises(TrainingError, match=r"steps 5-6, --max-nonfinite 2\) and the weights themselves are non-finite"):
        guard.record("gradients", 6, model, {"loss": torch.tensor(1.0)})
    assert guard.total == 2


def test_the_count_in_a_row_survives_a_resume(fake_train, poison):
    poison({1, 2, 3})  # steps 2-4 (the calls count over both runs)
    fake_train(name="streak", max_nonfinite=3, epochs=1, train_num_samples=48, stop_after_steps=3)  # 2 in a row
    with pytest.raises(TrainingError, match=r"3 steps in a row .*\(steps 2-4, --max-nonfinite 3\)"):
        fake_train(name="streak", max_nonfinite=3, epochs=1, train_num_samples=48, resume="latest")
