"""Episodes over streaming-only shards: the shard-level draw and the local spool it is read from."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from pyprotoclip.data import expand_shards
from pyprotoclip.data import spool as sp
from pyprotoclip.data.episodes import EpisodeLoader, EpisodeSamples
from pyprotoclip.data.pipeline import BadDataError, iter_raw_samples
from pyprotoclip.data.writer import ShardWriter
from tests.data.helpers import jpeg_bytes, preprocess, tokenize, write_good_shards


def _piped(spec: str) -> list[str]:
    return [f"pipe:cat {s}" for s in expand_shards(spec)]


def _first(draws, n: int) -> list[int]:
    return [next(draws) for _ in range(n)]


def test_the_draw_is_uniform_with_replacement_and_split_over_the_ranks():
    whole = _first(sp.shard_draws(5, seed=1, episode=2, rank=0, world_size=1), 3000)
    counts = Counter(whole)
    assert sorted(counts) == [0, 1, 2, 3, 4] and min(counts.values()) > 500  # uniform, each ~600
    assert any(a == b for a, b in zip(whole, whole[1:]))  # with replacement: repeats happen
    parts = [_first(sp.shard_draws(5, seed=1, episode=2, rank=r, world_size=3), 100) for r in range(3)]
    for r in range(3):
        assert parts[r] == whole[r::3][:100]  # rank r streams draws r, r + W, ...
    assert whole != _first(sp.shard_draws(5, seed=1, episode=3, rank=0, world_size=1), 3000)  # a new episode


def test_the_spool_holds_the_first_samples_of_the_ranks_draws_byte_for_byte(tmp_path):
    shards = _piped(write_good_shards(str(tmp_path / "data"), 4, 5))
    spool = sp.spool_episode(shards, cache_dir=str(tmp_path / "cache"), episode=0, rank=1, world_size=2, seed=7,
                             num_samples=12)
    draws = sp.shard_draws(len(shards), seed=7, episode=0, rank=1, world_size=2)
    expected = []
    while len(expected) < 12:
        expected.extend(iter_raw_samples(shards[next(draws)], Counter(), lambda *a: None))
    expected = expected[:12]
    assert len(spool) == 12 and [str(k) for k in spool.keys] == [s["__key__"] for s in expected]
    for j in (0, 5, 11):
        got = spool.read(j)
        assert {k: v for k, v in got.items() if k != "__url__"} == {k: v for k, v in expected[j].items() if k != "__url__"}
    assert [shards[s] for s in spool.source_shards] == [s["__url__"] for s in expected]
    assert os.path.isdir(sp.spool_dir(str(tmp_path / "cache"), 0, 1))


def test_a_shard_drawn_twice_gives_its_samples_twice(tmp_path):
    shards = _piped(write_good_shards(str(tmp_path / "data"), 1, 3))  # one shard: every draw is it
    spool = sp.spool_episode(shards, cache_dir=str(tmp_path / "c"), episode=0, rank=0, world_size=1, seed=0, num_samples=7)
    assert [str(k) for k in spool.keys] == ["000000", "000001", "000002"] * 2 + ["000000"]
    assert spool.read(0)["jpg"] == spool.read(3)["jpg"] == spool.read(6)["jpg"]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    d = tmp_path / "data"
    with ShardWriter(str(d), 6) as w:
        for k in range(6):
            w.write({"__key__": f"{k:06d}", "jpg": b"broken" if k == 1 else jpeg_bytes(k), "txt": "" if k == 4 else f"c {k}"})
    shards = _piped(str(d / "00000.tar"))
    spool = sp.spool_episode(shards, cache_dir=str(tmp_path / "c"), episode=0, rank=0, world_size=1, seed=0, num_samples=4)
    assert [str(k) for k in spool.keys] == ["000000", "000002", "000003", "000005"]
    assert spool.stats["bad"]["bad_image"] == 1 and spool.stats["bad"]["missing_caption"] == 1


def test_a_complete_spool_is_reused_and_a_different_one_rebuilt(tmp_path, monkeypatch):
    shards = _piped(write_good_shards(str(tmp_path / "data"), 3, 4))
    cache = str(tmp_path / "c")
    first = sp.spool_episode(shards, cache_dir=cache, episode=0, rank=0, world_size=1, seed=0, num_samples=6)
    monkeypatch.setattr(sp, "iter_raw_samples", lambda *a, **k: pytest.fail("a matching spool was streamed again"))
    again = sp.spool_episode(shards, cache_dir=cache, episode=0, rank=0, world_size=1, seed=0, num_samples=6)
    assert list(again.keys) == list(first.keys)
    monkeypatch.undo()
    other = sp.spool_episode(shards, cache_dir=cache, episode=0, rank=0, world_size=1, seed=1, num_samples=6)
    assert other.manifest["seed"] == 1


def test_a_new_episode_removes_the_ranks_old_spools_and_dead_writers_leftovers(tmp_path):
    shards = _piped(write_good_shards(str(tmp_path / "data"), 2, 4))
    cache = str(tmp_path / "c")
    for rank in (0, 1):
        sp.spool_episode(shards, cache_dir=cache, episode=0, rank=rank, world_size=2, seed=0, num_samples=3)
    dead = sp.spool_dir(cache, 3, 0) + ".tmp999999"
    os.makedirs(dead)
    sp.spool_episode(shards, cache_dir=cache, episode=1, rank=0, world_size=2, seed=0, num_samples=3)
    assert sorted(os.listdir(cache)) == ["episode-00000-rank001", "episode-00001-rank000"]


def test_an_interrupted_spool_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    shards = _piped(write_good_shards(str(tmp_path / "data"), 2, 4))
    cache = str(tmp_path / "c")
    real = sp.iter_raw_samples

    def dies(*a, **k):
        yield from real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(sp, "iter_raw_samples", dies)
    with pytest.raises(KeyboardInterrupt):
        sp.spool_episode(shards, cache_dir=cache, episode=0, rank=0, world_size=1, seed=0, num_samples=6)
    assert os.listdir(cache) == []


def test_draws_without_any_usable_sample_are_a_one_line_bad_data_error(tmp_path):
    d = tmp_path / "data"
    with ShardWriter(str(d), 3) as w:
        for k in range(6):
            w.write({"__key__": f"{k:06d}", "jpg": b"broken", "txt": f"c {k}"})
    shards = _piped(str(d / "{00000..00001}.tar"))
    with pytest.raises(BadDataError, match=r"train-data: spooling episode 0 .* 0 of 5 samples: 4 shard draws in a row "
                                           r"gave no usable sample; 12 of 12 samples bad \(bad_image 12\)"):
        sp.spool_episode(shards, cache_dir=str(tmp_path / "c"), episode=0, rank=0, world_size=1, seed=0, num_samples=5)
    with pytest.raises(ValueError, match="num_samples: expected a positive int, got 0"):
        sp.spool_episode(shards, cache_dir=str(tmp_path / "c"), episode=0, rank=0, world_size=1, seed=0, num_samples=0)
    with pytest.raises(BadDataError, match="more than --max-bad-fraction 0.5"):
        sp.spool_episode(shards, cache_dir=str(tmp_path / "c"), episode=0, rank=0, world_size=1, seed=0, num_samples=5,
                         max_bad_fraction=0.5)


def test_an_episode_loader_reads_the_spool_in_workers_as_in_process(tmp_path):
    shards = _piped(write_good_shards(str(tmp_path / "data"), 3, 4))
    spool = sp.spool_episode(shards, cache_dir=str(tmp_path / "c"), episode=0, rank=0, world_size=1, seed=0, num_samples=8)
    samples = EpisodeSamples(spool, torch.arange(8), torch.arange(8), preprocess, seed=0, purpose=2, epoch=0)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    a = list(EpisodeLoader(samples, order, batch_size=4, tokenize=tokenize, workers=0))
    b = list(EpisodeLoader(samples, order, batch_size=4, tokenize=tokenize, workers=2))
    assert [x["key"] for x in a] == [x["key"] for x in b] == [[str(spool.keys[i]) for i in order[:4]],
                                                               [str(spool.keys[i]) for i in order[4:]]]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
