"""`--method cyclip` through the trainer: every term logged by name, exact gradient accumulation for the
cyclic and in-modal terms, and with --inmodal a two-view model whose checkpoints evaluate and resume."""

from __future__ import annotations

import contextlib
import json
import os
import types

import numpy as np
import torch
from PIL import Image

import fake_data

from pyprotoclip import checkpoint as ckpt
from pyprotoclip.losses import CyCLIPLoss, StepContext
from pyprotoclip.models import create_model
from pyprotoclip.train.step import train_step


def _rows(run_dir, kind):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "results.jsonl"))) if r["type"] == kind]


def test_cyclip_run_logs_every_term(fake_train):
    s = fake_train(method="cyclip", cylambda2=0.5, val_data="fake")
    rows = _rows(s["run_dir"], "train")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for term in ("contrastive_loss", "inmodal_cyclic_loss", "crossmodal_cyclic_loss", "loss"):
            assert np.isfinite(r[term]), term
        assert r["loss"] > r["contrastive_loss"]
    assert "crossmodal_cyclic_loss" in open(os.path.join(s["run_dir"], "out.log")).read()
    val = _rows(s["run_dir"], "val")[0]
    for key in ("zeroshot_top1", "crossmodal_consistency@1", "inmodal_consistency@1", "crossmodal_consistency@5"):
        assert 0.0 <= val[key] <= 1.0, key


class _SGD0(torch.optim.SGD):
    def __init__(self, params):
        super().__init__(params, lr=0.0)


def _step_grads(model, loss_fn, images, texts, accum):
    b = images.shape[0] // accum
    batches = [{"image": images[i * b : (i + 1) * b], "text": texts[i * b : (i + 1) * b]} for i in range(accum)]
    train_step(model, loss_fn, batches, _SGD0(model.parameters()), scaler=None, autocast=contextlib.nullcontext,
               device=torch.device("cpu"), context=StepContext(step=0, epoch=0), grad_clip_norm=None)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_accum_exact(model, loss_fn, images, texts, *, without=None):
    """accum 2 == accum 1; ``without`` (a loss without the terms under test) must give a clearly
    different gradient, so that the comparison can fail."""
    full = _step_grads(model, loss_fn, images, texts, 1)
    assert full["logit_scale"].abs() > 1e-5
    got = _step_grads(model, loss_fn, images, texts, 2)
    assert got.keys() == full.keys()
    for n in full:
        scale = float(full[n].abs().max())  # float noise of summing the towers' backward in two halves
        torch.testing.assert_close(got[n], full[n], atol=1e-5 * scale + 1e-8, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    if without is not None:
        other = _step_grads(model, without, images, texts, 1)
        moved = max(float((full[n] - other[n]).abs().max()) / max(float(full[n].abs().max()), 1e-12) for n in full)
        assert moved > 0.1


def test_accum_freq_gives_full_batch_gradient_with_cyclic_terms():
    """--accum-freq 2 on a batch of 12 gives the one-batch gradient of CLIP + heavily weighted cyclic terms
    (weights large enough that the cyclic part dominates the gradient)."""
    model = create_model("tiny-vit", seed=0)[0]
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(12, 3, 64, 64, generator=g), torch.randint(1, 1000, (12, 32), generator=g)
    _assert_accum_exact(model, CyCLIPLoss(5.0, 5.0), images, texts, without=CyCLIPLoss(0.0, 0.0))


def test_accum_freq_is_exact_with_inmodal_views():
    from pyprotoclip.losses.views import TwoViewModel

    model = TwoViewModel(create_model("tiny-vit", seed=0)[0])
    g = torch.Generator().manual_seed(1)
    images, texts = torch.randn(8, 2, 3, 64, 64, generator=g), torch.randint(1, 1000, (8, 2, 32), generator=g)
    _assert_accum_exact(model, CyCLIPLoss(1.0, 1.0, inmodal=True), images, texts)


class _TransformingLoader(fake_data.Loader):
    """fake_data's batches rebuilt through the loader's preprocess / tokenizer (as the shard pipeline
    does), with torch's RNG seeded per sample from its place, so augmentations survive a resume."""

    def __init__(self, cfg, *, preprocess, tokenize, **kw):
        super().__init__(cfg, **kw)
        self.preprocess, self.tokenize = preprocess, tokenize

    def __iter__(self):
        for b, batch in enumerate(super().__iter__(), start=self.start_batch):
            images = []
            for j, img in enumerate(batch["image"]):
                pil = Image.fromarray(((img.clamp(-1, 2) + 1) / 3 * 255).byte().permute(1, 2, 0).numpy())
                state = torch.get_rng_state()
                torch.manual_seed(self.epoch * 100003 + b * 101 + j)
                images.append(self.preprocess(pil))
                torch.set_rng_state(state)
            captions = [f"a photo of the class number {c.split()[-1]} shape" for c in batch["caption"]]
            yield {**batch, "image": torch.stack(images), "text": self.tokenize(captions), "caption": captions}


def _build_loader(cfg, *, preprocess, tokenize, is_train, epoch=0, rank=0, world_size=1, start_batch=0):
    return _TransformingLoader(cfg, preprocess=preprocess, tokenize=tokenize, is_train=is_train, epoch=epoch, rank=rank,
                               world_size=world_size, start_batch=start_batch)


TRANSFORMING = types.SimpleNamespace(DataConfig=fake_data.DataConfig, build_loader=_build_loader,
                                     read_zeroshot_files=fake_data.read_zeroshot_files)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_inmodal_run_checkpoints_evaluate_and_resume_exactly(fake_train, monkeypatch):
    from pyprotoclip.eval.evaluate import load_model_from_checkpoint

    monkeypatch.setattr(fake_data, "module", TRANSFORMING)  # the fixture's trainer.run reads fake_data.module
    kw = dict(method="cyclip", inmodal=True, model="tiny-rn", epochs=1, batch_size=4, train_num_samples=12)
    full = fake_train(name="full", **kw)
    rows = _rows(full["run_dir"], "train")
    for term in ("contrastive_loss", "crossmodal_contrastive_loss", "inmodal_contrastive_loss", "inmodal_cyclic_loss",
                 "crossmodal_cyclic_loss", "loss"):
        assert all(np.isfinite(r[term]) for r in rows), term
    state = ckpt.load_checkpoint(os.path.join(full["run_dir"], "checkpoints", "epoch_1.pt"))
    assert state["method_keys"] == [] and list(state["state_dict"]) == list(create_model("tiny-rn")[0].state_dict())
    model, *_ = load_model_from_checkpoint(os.path.join(full["run_dir"], "checkpoints", "epoch_1.pt"))
    assert torch.equal(model.logit_scale, full["model"].logit_scale)

    cut = fake_train(name="cut", stop_after_steps=1, **kw)
    assert cut["interrupted"] and cut["step"] == 1
    resumed = fake_train(name="cut", resume="latest", **kw)
    assert resumed["step"] == 3
    want, got = _state(full["model"]), _state(resumed["model"])
    diff = [k for k in want if not torch.equal(want[k], got[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"


def test_cli_flags(monkeypatch):
    from click.testing import CliRunner

    from pyprotoclip.cli import main
    from pyprotoclip.train import params as P
    from pyprotoclip.train import trainer

    seen = {}

    def fake_run(p, **kw):
        P.validate(p)
        seen.update(p)
        return {}

    monkeypatch.setattr(trainer, "run", fake_run)
    r = CliRunner().invoke(main, ["train", "--help"])
    assert all(flag in r.output for flag in ("--cylambda1", "--cylambda2", "--inmodal", "cyclip"))
    r = CliRunner().invoke(main, ["train", "--train-data", "x", "--method", "cyclip", "--cylambda1", "0.5", "--inmodal"])
    assert r.exit_code == 0, r.output
    assert seen["cylambda1"] == 0.5 and seen["cylambda2"] is None and seen["inmodal"] is True
    r = CliRunner().invoke(main, ["train", "--train-data", "x", "--method", "cyclip", "--cylambda2", "-1"])
    assert r.exit_code == 2 and "Error: cylambda2:" in r.output and "Traceback" not in r.output, r.output
