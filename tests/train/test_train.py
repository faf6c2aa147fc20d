import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pyprotoclip import checkpoint as ckpt

HERE = os.path.dirname(__file__)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_step_run_writes_logs_and_checkpoints(fake_train):
    s = fake_train(save_most_recent=True, report_to="tensorboard")
    run_dir = s["run_dir"]
    assert s["step"] == 2 and not s["interrupted"]
    for name in ("params.yaml", "out.log", "results.jsonl", "checkpoints/epoch_1.pt", "checkpoints/epoch_latest.pt"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "results.jsonl"))]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(math.isfinite(r["contrastive_loss"]) and r["samples_per_s"] > 0 for r in train_rows)
    log = open(os.path.join(run_dir, "out.log")).read()
    assert "samples/s" in log and "data" in log and "contrastive_loss" in log
    state = ckpt.load_checkpoint(os.path.join(run_dir, "checkpoints", "epoch_1.pt"))  # weights_only=True
    assert state["step"] == 2 and state["model"] == "tiny-vit" and state["model_cfg"]["embed_dim"] == 128
    assert 0.0 <= float(state["state_dict"]["logit_scale"]) <= math.log(100)
    # no stray temp files from the atomic writes
    assert not [f for f in os.listdir(os.path.join(run_dir, "checkpoints")) if ".tmp" in f]


def test_bad_samples_of_an_epoch_reach_out_log(fake_train, monkeypatch):
    import fake_data

    s = fake_train(name="clean")
    assert "bad sample" not in open(os.path.join(s["run_dir"], "out.log")).read()
    bad = {"missing_image": 0, "missing_caption": 0, "bad_caption": 0, "bad_image": 1, "bad_shard": 2}
    monkeypatch.setattr(fake_data.Loader, "stats", lambda self: {"bad": bad, "bad_total": 3})
    s = fake_train(name="dirty")
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert "train-data: epoch 0 skipped 3 bad sample(s)/shard(s) on this process (bad_image 1, bad_shard 2)" in log


def test_logit_scale_is_clamped(fake_train):
    # a huge lr pushes the scale up; it must stay <= ln(100) after every step
    s = fake_train(lr=5.0, warmup=0)
    assert float(s["model"].logit_scale.detach()) <= math.log(100) + 1e-6


def test_existing_run_dir_needs_resume(fake_train):
    fake_train()
    with pytest.raises(ValueError, match="name: the run directory"):
        fake_train()


@pytest.mark.parametrize("stop", [1, 2])
def test_resume_is_exact(fake_train, stop):
    full = _state(fake_train(name="full", epochs=2)["model"])
    # interrupted mid-epoch 0 (after step 1 of 2) or at the epoch boundary, resumed, and run to the end
    s = fake_train(name="cut", epochs=2, stop_after_steps=stop)
    assert s["interrupted"] and s["step"] == stop
    resumed = fake_train(name="cut", epochs=2, resume="latest")
    assert resumed["step"] == 4
    got = _state(resumed["model"])
    assert got.keys() == full.keys()
    diff = [k for k in full if not torch.equal(full[k], got[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"


def test_resume_latest_without_checkpoint_starts_fresh(fake_train):
    s = fake_train(name="fresh", resume="latest")
    assert s["step"] == 2


class _SGD0(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.0)


def _step_grads(model, loss_fn, images, texts, accum):
    import contextlib

    from pyprotoclip.losses import StepContext
    from pyprotoclip.train.step import train_step

    opt = _SGD0(model.parameters())
    b = images.shape[0] // accum
    batches = [{"image": images[i * b : (i + 1) * b], "text": texts[i * b : (i + 1) * b]} for i in range(accum)]
    train_step(model, loss_fn, batches, opt, scaler=None, autocast=contextlib.nullcontext, device=torch.device("cpu"),
               context=StepContext(step=0, epoch=0), grad_clip_norm=None)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accum_freq_gives_full_batch_gradient():
    """accum_freq=2 and 4 on micro-batches of a batch of 16 give the gradient of the one batch, logit scale included."""
    from pyprotoclip.losses import ClipLoss
    from pyprotoclip.models import create_model

    model = create_model("tiny-vit")[0]
    torch.manual_seed(0)
    images, texts = torch.randn(16, 3, 64, 64), torch.randint(1, 1000, (16, 32))
    full = _step_grads(model, ClipLoss(), images, texts, 1)
    assert full["logit_scale"].abs() > 1e-4  # the test can fail: the scale has a real gradient
    for accum in (2, 4):
        got = _step_grads(model, ClipLoss(), images, texts, accum)
        assert got.keys() == full.keys()
        for n in full:
            torch.testing.assert_close(got[n], full[n], atol=2e-6, rtol=1e-4, msg=lambda m, n=n: f"accum {accum}, {n}: {m}")


class _TwoScaleModel(torch.nn.Module):
    """A toy model with two learnable scales and a per-sample output besides the features."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Linear(6, 4)
        self.text = torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.temperature = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, image, text):
        i, t = self.image(image), self.text(text)
        return {"image_features": torch.nn.functional.normalize(i, dim=-1),
                "text_features": torch.nn.functional.normalize(t, dim=-1),
                "raw": i, "logit_scale": self.logit_scale.exp(), "temperature": self.temperature}


class _TwoScaleLoss(torch.nn.Module):
    """CLIP plus a term that couples every sample with the second scale (not linear in the batch)."""

    def forward(self, out, *, step_context):
        from pyprotoclip.ops import infonce_loss

        clip = infonce_loss(out["image_features"], out["text_features"], out["logit_scale"])
        coupled = torch.logsumexp(out["raw"].sum(1) / out["temperature"], dim=0) * out["temperature"] ** 2
        return {"clip": clip, "coupled": coupled, "loss": clip + coupled}


def test_accum_freq_is_exact_for_every_scale_of_a_toy_method():
    torch.manual_seed(0)
    model = _TwoScaleModel()
    images, texts = torch.randn(12, 6), torch.randn(12, 5)
    full = _step_grads(model, _TwoScaleLoss(), images, texts, 1)
    assert full["temperature"].abs() > 1e-3 and full["logit_scale"].abs() > 1e-4
    for accum in (2, 3):
        got = _step_grads(model, _TwoScaleLoss(), images, texts, accum)
        for n in full:
            torch.testing.assert_close(got[n], full[n], atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"accum {accum}, {n}: {m}")


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, 8 per rank) ends with the weights of one process with batch 16.

    The worker uses AdamW with eps=1, which makes the update nearly linear in the gradient, so weights
    compare the gradients (a tiny eps turns float noise on near-zero gradients into +-lr jumps)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.getcwd(), HERE])}
    outs = {}
    for nproc, batch in ((2, 8), (1, 16)):
        out = tmp_path / f"w{nproc}.pt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               os.path.join(HERE, "_ddp_worker.py"), str(out), str(tmp_path / f"logs{nproc}"), str(batch)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        outs[nproc] = torch.load(out, weights_only=True)
    assert "on 2 process(es)" in open(tmp_path / "logs2" / "ddp" / "out.log").read()
    from pyprotoclip.models import create_model

    init = create_model("tiny-vit", seed=0)[0].state_dict()
    moved = max(float((outs[1][k] - init[k]).abs().max()) for k in init if init[k].is_floating_point())
    assert moved > 1e-3  # the runs did train
    for k, v in outs[1].items():
        torch.testing.assert_close(outs[2][k], v, atol=2e-6, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_log_warns_about_a_long_warmup_oversubscription_and_says_checkpoint_sizes(fake_train, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    s = fake_train(warmup=1000, workers=1, threads=1)
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert "--warmup 1000 is longer than the whole run (2 optimizer steps)" in log
    assert "oversubscribed" in log and "pass --threads" in log
    assert "saved " in log and "epoch_1.pt (" in log and " MB)" in log


def test_done_line_says_unknown_speed_for_one_step_and_counts_this_process(fake_train):
    """A one-step run has no timed step (an epoch's first is start-up): speed n/a / null, not 0.0. A resumed run
    says its global step and how many steps this process ran."""
    s = fake_train(name="one", train_num_samples=8)
    assert s["step"] == 1 and s["samples_per_s"] is None and s["samples_per_s_per_device"] is None
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert "done: step 1 (1 in this process) in " in log and "n/a samples/s" in log and "0.0 samples/s" not in log
    rows = [json.loads(line) for line in open(os.path.join(s["run_dir"], "results.jsonl"))]
    summary = [r for r in rows if r["type"] == "summary"][-1]
    assert summary["samples_per_s"] is None and summary["data_fraction"] is None
    fake_train(name="res", epochs=2, stop_after_steps=3, train_num_samples=24)
    s = fake_train(name="res", epochs=2, train_num_samples=24, resume="latest")
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert s["step"] == 6 and s["steps_this_process"] == 3 and "done: step 6 (3 in this process)" in log
    assert isinstance(s["samples_per_s"], float) and s["samples_per_s"] > 0


@pytest.mark.parametrize("warmup, warns", [(2, False), (3, True)])
def test_the_warmup_warning_matches_the_schedule(fake_train, warmup, warns):
    """A 2-step run: --warmup 2 reaches --lr at its last step (no warning), --warmup 3 never does."""
    from pyprotoclip.train.scheduler import lr_at

    s = fake_train(warmup=warmup)
    assert s["step"] == 2
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert ("is longer than the whole run" in log) == warns
    lrs = [lr_at(step, base_lr=1.0, warmup=warmup, total_steps=2) for step in range(2)]
    assert (max(lrs) < 1.0) == warns


@pytest.mark.parametrize("batch_size, warns", [(6, False), (8, True)])
def test_a_batch_larger_than_the_epoch_warns(tmp_path, batch_size, warns):
    from click.testing import CliRunner

    from pyprotoclip.cli import main
    from tests.data.helpers import write_good_shards

    spec = write_good_shards(str(tmp_path / "d"), 1, 6)  # 6 samples
    r = CliRunner().invoke(main, ["train", "--train-data", spec, "--model", "tiny-vit", "--batch-size", str(batch_size),
                                  "--epochs", "1", "--workers", "0", "--precision", "fp32", "--warmup", "1", "--threads", "1",
                                  "--logs", str(tmp_path / "logs"), "--name", "b", "--save-frequency", "0"])
    assert r.exit_code == 0, r.output
    log = open(tmp_path / "logs" / "b" / "out.log").read()
    assert (f"a batch of {batch_size} (--batch-size {batch_size} x 1 process(es)) is larger than the 6 samples" in log) == warns


def test_resume_removes_the_rows_written_after_its_checkpoint(fake_train):
    """A run killed after its last checkpoint wrote rows the resumed run writes again (and maybe half a line):
    they go; eval rows stay; results.jsonl then reads as one run's."""
    s = fake_train(name="cut", epochs=2, stop_after_steps=3)  # epoch_1.pt at step 2, epoch_latest.pt at step 3
    ckpt_dir = os.path.join(s["run_dir"], "checkpoints")
    os.remove(os.path.join(ckpt_dir, "epoch_latest.pt"))  # as if killed before it was written
    results = os.path.join(s["run_dir"], "results.jsonl")
    with open(results, "a") as f:
        f.write(json.dumps({"type": "eval", "step": 2, "checkpoint": "epoch_1.pt"}) + "\n")
        f.write('{"type": "train", "step": 4, "lo')  # cut short by the kill
    resumed = fake_train(name="cut", epochs=2, resume="latest")
    assert resumed["step"] == 4
    rows = [json.loads(line) for line in open(results)]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4]
    assert [r["type"] for r in rows if r["type"] != "train"] == ["eval", "summary"]
    log = open(os.path.join(s["run_dir"], "out.log")).read()
    assert "results.jsonl: removed 3 row(s) written after that checkpoint" in log


def test_resume_latest_without_checkpoint_removes_the_rows_of_the_earlier_start(fake_train):
    s = fake_train(name="nockpt", save_frequency=0)  # trains, writes rows, leaves no checkpoint
    assert not [f for f in os.listdir(os.path.join(s["run_dir"], "checkpoints")) if f.endswith(".pt")]
    again = fake_train(name="nockpt", save_frequency=0, resume="latest")
    assert again["step"] == 2
    rows = [json.loads(line) for line in open(os.path.join(s["run_dir"], "results.jsonl"))]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2]
    assert "removed 3 row(s) of an earlier start that left no checkpoint" in open(os.path.join(s["run_dir"], "out.log")).read()
