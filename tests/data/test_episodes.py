"""Random access into shards (ShardIndex) and ProtoCLIP's episodes."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from pyprotoclip.data import expand_shards
from pyprotoclip.data.episodes import EpisodeLoader, EpisodeSamples, draw_episode, epoch_order, rank_block
from pyprotoclip.data.index import ShardIndex
from pyprotoclip.data.pipeline import iter_raw_samples
from tests.data.helpers import preprocess, tokenize, write_good_shards


def test_random_access_reads_exactly_what_streaming_reads(synth):
    shards = expand_shards(synth["train_shards"])
    index = ShardIndex(shards)
    streamed = [s for shard in shards for s in iter_raw_samples(shard, Counter(), lambda *a: None)]
    assert len(index) == len(streamed) == 240
    for i in (0, 1, 39, 40, 123, 239):
        assert index.read(i) == streamed[i]
    assert [str(k) for k in index.keys[:3]] == [s["__key__"] for s in streamed[:3]]
    assert all(os.path.isfile(s + ".index.npz") for s in shards)  # cached beside the shards


def test_the_cached_index_is_rebuilt_when_a_shard_changes(tmp_path):
    spec = write_good_shards(str(tmp_path / "a"), 1, 5)
    shard = expand_shards(spec)[0]
    assert len(ShardIndex([shard])) == 5
    write_good_shards(str(tmp_path / "a"), 1, 7)  # same file name, new content
    os.utime(shard, ns=(1, 1))
    assert len(ShardIndex([shard])) == 7


def test_an_unwritable_directory_keeps_the_index_in_memory(tmp_path, monkeypatch):
    spec = write_good_shards(str(tmp_path / "b"), 1, 4)
    import numpy as np

    def refuse(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(np, "savez", refuse)
    index = ShardIndex(expand_shards(spec))
    assert len(index) == 4 and not os.path.exists(expand_shards(spec)[0] + ".index.npz")


def test_the_draw_is_uniform_with_replacement_and_the_same_everywhere():
    a = draw_episode(100, 5000, seed=1, episode=3)
    assert torch.equal(a, draw_episode(100, 5000, seed=1, episode=3))
    assert not torch.equal(a, draw_episode(100, 5000, seed=1, episode=4))
    counts = torch.bincount(a, minlength=100).float()
    assert counts.min() > 20 and counts.max() < 80 and len(torch.unique(a)) < 5000  # repeats: with replacement
    assert [rank_block(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 9)]


def test_an_episode_loader_yields_its_samples_with_positions_and_skips_on_resume(synth):
    index = ShardIndex(expand_shards(synth["train_shards"]))
    ids = draw_episode(len(index), 40, seed=0, episode=0)
    samples = EpisodeSamples(index, ids[10:30], torch.arange(10, 30), preprocess, seed=0, purpose=2, epoch=0)
    order = epoch_order(20, seed=0, epoch=0, rank=0)
    full = list(EpisodeLoader(samples, order, batch_size=6, tokenize=tokenize, workers=0))
    assert len(full) == 3  # 20 // 6, the last partial batch dropped
    assert full[0]["episode_pos"].tolist() == (order[:6] + 10).tolist()
    assert full[0]["index"].tolist() == ids[10:30][order[:6]].tolist()
    again = list(EpisodeLoader(samples, order, batch_size=6, tokenize=tokenize, workers=2, start_batch=1))
    assert len(again) == 2
    for a, b in zip(full[1:], again):
        assert torch.equal(a["image"], b["image"]) and a["key"] == b["key"]  # same views in workers and in-process


def test_an_unreadable_sample_is_replaced_by_the_next_readable_one(tmp_path):
    spec = write_good_shards(str(tmp_path / "c"), 1, 6)
    index = ShardIndex(expand_shards(spec))
    real = index.read

    def read(i):
        sample = real(i)
        if i == 2:
            sample["jpg"] = b"not an image"
        return sample

    index.read = read
    samples = EpisodeSamples(index, torch.tensor([2, 3]), torch.arange(2), preprocess, seed=0, purpose=1, epoch=0)
    loader = EpisodeLoader(samples, torch.arange(2), batch_size=2, tokenize=tokenize, workers=0)
    batch = next(iter(loader))
    assert batch["index"].tolist() == [3, 3] and loader.stats()["bad_total"] == 1


def test_unreadable_data_in_a_worker_is_a_one_line_bad_data_error(tmp_path):
    from pyprotoclip.data.pipeline import BadDataError

    spec = write_good_shards(str(tmp_path / "d"), 1, 4)
    index = ShardIndex(expand_shards(spec))
    real = index.read

    def read(i):
        sample = real(i)
        sample["jpg"] = b"not an image"
        return sample

    index.read = read  # the worker is forked: it reads through this too
    samples = EpisodeSamples(index, torch.tensor([1, 2]), torch.arange(2), preprocess, seed=0, purpose=1, epoch=0)
    for workers in (0, 1):
        loader = EpisodeLoader(samples, torch.arange(2), batch_size=2, tokenize=tokenize, workers=workers)
        with pytest.raises(BadDataError) as err:
            next(iter(loader))
        msg = str(err.value)
        assert "\n" not in msg and "worker" not in msg and "Traceback" not in msg
        assert msg.startswith("train-data: 16 consecutive unreadable samples from sample 1 ")
