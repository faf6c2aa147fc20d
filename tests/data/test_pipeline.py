"""The webdataset loader: shard specs, sizes, bad samples, determinism, start_batch resume, rank/worker splits."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile

import pytest
import torch

from pyprotoclip.data import DataConfig, build_loader, expand_shards, read_zeroshot_files
from pyprotoclip.data.pipeline import BadDataError, TarDamaged, iter_tar_members
from pyprotoclip.data.writer import ShardWriter
from tests.data.helpers import jpeg_bytes, preprocess, tokenize, write_good_shards


def load(cfg: DataConfig, **kw):
    return build_loader(cfg, preprocess=preprocess, tokenize=tokenize, **kw)


def keys_of(loader) -> list[list[str]]:
    return [b["key"] for b in loader]


# ------------------------------------------------------------------------------------------ specs and sizes


def test_expand_shards_braces_and_double_colon(tmp_path):
    a = write_good_shards(str(tmp_path / "a"), 3, 2)
    b = write_good_shards(str(tmp_path / "b"), 1, 2, start_key=100)
    shards = expand_shards(f"{a}::{b}")
    assert [os.path.relpath(s, tmp_path) for s in shards] == ["a/00000.tar", "a/00001.tar", "a/00002.tar", "b/00000.tar"]


def test_expand_shards_missing_file_names_it(tmp_path):
    write_good_shards(str(tmp_path), 2, 2)
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shard\(s\) not found: .*00002\.tar"):
        expand_shards(str(tmp_path / "{00000..00002}.tar"))


def test_expand_shards_globs_and_a_directory_hint(tmp_path):
    write_good_shards(str(tmp_path / "a"), 3, 2)
    shards = expand_shards(str(tmp_path / "a" / "*.tar"))
    assert [os.path.basename(s) for s in shards] == ["00000.tar", "00001.tar", "00002.tar"]  # sorted matches
    with pytest.raises(FileNotFoundError, match=r"not found: .*nothing\*\.tar"):
        expand_shards(str(tmp_path / "a" / "nothing*.tar"))
    with pytest.raises(FileNotFoundError, match=r"is a directory: name its shards, e\.g\. '.*a/\*\.tar'") as info:
        expand_shards(str(tmp_path / "a"), "val-data")
    assert str(info.value).startswith("val-data: 1 of 1 shard(s) not found: ") and "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["", "  ", "a.tar::"])
def test_expand_shards_empty_spec(spec):
    with pytest.raises(ValueError, match="shards"):
        expand_shards(spec)


def test_num_samples_from_sizes_json_and_override(tmp_path):
    spec = write_good_shards(str(tmp_path), 3, 5)
    loader = load(DataConfig(spec, batch_size=4, workers=0), is_train=True)
    assert loader.num_samples == 16 and loader.num_batches == 4  # 15 samples -> ceil(15 / 4) full batches
    loader = load(DataConfig(spec, batch_size=4, workers=0, num_samples=40), is_train=True)
    assert loader.num_batches == 10 and len(list(loader)) == 10  # more than the data: passes repeat
    # two ranks: batches per rank = ceil(15 / (4 * 2))
    loader = load(DataConfig(spec, batch_size=4, workers=0), is_train=True, rank=1, world_size=2)
    assert loader.num_batches == 2 and loader.num_samples == 16


def test_num_samples_missing_is_a_clear_error(tmp_path):
    spec = write_good_shards(str(tmp_path), 2, 3, sizes=False)
    with pytest.raises(ValueError, match=r"num_samples: not given and no sizes\.json"):
        load(DataConfig(spec, batch_size=2, workers=0), is_train=True)
    # sizes.json that does not list a shard counts as missing too
    with open(tmp_path / "sizes.json", "w") as f:
        json.dump({"00000.tar": 3}, f)
    with pytest.raises(ValueError, match="num_samples"):
        load(DataConfig(spec, batch_size=2, workers=0), is_train=True)
    assert load(DataConfig(spec, batch_size=2, workers=0, num_samples=6), is_train=True).num_batches == 3


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_shards_fewer_than_workers_times_ranks_is_an_error(tmp_path):
    spec = write_good_shards(str(tmp_path), 3, 2)
    with pytest.raises(ValueError, match=r"3 shard\(s\) for 2 rank\(s\) x 2 worker\(s\).*--dataset-resampled"):
        load(DataConfig(spec, batch_size=2, workers=2), is_train=True, world_size=2)
    # enough shards for 1 rank x 2 workers / 3 ranks x 1 worker, and resampled never needs that many
    load(DataConfig(spec, batch_size=2, workers=2), is_train=True)
    load(DataConfig(spec, batch_size=2, workers=1), is_train=True, rank=2, world_size=3)
    load(DataConfig(spec, batch_size=2, workers=2, resampled=True), is_train=True, world_size=2)
    # evaluation uses fewer workers instead of failing
    loader = load(DataConfig(spec, batch_size=2, workers=4, drop_last=False), is_train=False)
    assert loader.dataloader.num_workers == 3


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(workers=-1), "workers"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_bad_config_values(tmp_path, kw, match):
    spec = write_good_shards(str(tmp_path), 1, 2)
    cfg = DataConfig(spec, **{"batch_size": 2, "workers": 0, **kw})
    with pytest.raises(ValueError, match=match):
        load(cfg, is_train=True)


def test_bad_rank_and_start_batch(tmp_path):
    spec = write_good_shards(str(tmp_path), 2, 2)
    cfg = DataConfig(spec, batch_size=2, workers=0)
    with pytest.raises(ValueError, match="rank"):
        load(cfg, is_train=True, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        load(cfg, is_train=True, start_batch=-1)


# ------------------------------------------------------------------------------------------ reading


def test_eval_reads_every_sample_once_in_order(synth):
    cfg = DataConfig(synth["train_shards"], batch_size=64, workers=0, drop_last=False)
    loader = load(cfg, is_train=False)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"{i:09d}" for i in range(240)]
    assert [len(b["key"]) for b in batches] == [64, 64, 64, 48] and loader.num_batches == 4
    b = batches[0]
    assert b["image"].shape == (64, 3, 8, 8) and b["image"].dtype == torch.float32
    assert b["text"].shape == (64, 12) and b["text"].dtype == torch.long
    assert b["label"].dtype == torch.long and 0 <= int(b["label"].min()) and int(b["label"].max()) < 20
    assert torch.equal(b["text"], tokenize(b["caption"]))
    st = loader.stats()
    assert st["samples_read"] == 240 and st["samples_yielded"] == 240 and st["bad_total"] == 0 and st["shards"] == 6


def test_eval_drop_last_and_two_workers_batch_count(synth):
    # 6 shards of 40 over 2 workers -> 120 samples each -> floor(120 / 50) = 2 batches each with drop_last
    loader = load(DataConfig(synth["train_shards"], batch_size=50, workers=2, drop_last=True), is_train=False)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 4 and all(len(b["key"]) == 50 for b in batches)
    loader = load(DataConfig(synth["train_shards"], batch_size=50, workers=2, drop_last=False), is_train=False)
    keys = [k for b in loader for k in b["key"]]
    assert loader.num_batches == 6 and sorted(keys) == [f"{i:09d}" for i in range(240)]


def test_eval_ranks_split_the_shards(synth):
    cfg = DataConfig(synth["train_shards"], batch_size=32, workers=0, drop_last=False)
    k0 = {k for b in load(cfg, is_train=False, rank=0, world_size=2) for k in b["key"]}
    k1 = {k for b in load(cfg, is_train=False, rank=1, world_size=2) for k in b["key"]}
    assert not (k0 & k1) and len(k0) == len(k1) == 120 and len(k0 | k1) == 240


def test_real_open_clip_tokenizer_and_missing_cls(tmp_path):
    import open_clip

    with ShardWriter(str(tmp_path), 10) as w:
        w.write({"__key__": "a", "png": _png(), "txt": "a red circle"})
    tok = open_clip.get_tokenizer("ViT-B-32")
    (b,) = list(build_loader(DataConfig(str(tmp_path / "00000.tar"), batch_size=4, workers=0, drop_last=False),
                             preprocess=preprocess, tokenize=tok, is_train=False))
    assert b["text"].shape == (1, 77) and torch.equal(b["text"], tok(["a red circle"]))
    assert b["label"].tolist() == [-1]  # no cls


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5, 7), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _write_bad_dataset(directory) -> str:
    """Shard 0: 10 samples of which 5 are bad (one per reason); shard 1: 6 good; shard 2: truncated (3 good + a cut)."""
    d = str(directory)
    good = lambda k: {"__key__": f"{k:06d}", "jpg": jpeg_bytes(k), "txt": f"caption {k}", "cls": "1"}  # noqa: E731
    with ShardWriter(d, 10) as w:
        for k in range(10):
            s = good(k)
            if k == 1:
                s["jpg"] = b"\x00not an image at all" * 10  # undecodable
            elif k == 3:
                s["jpg"] = s["jpg"][: len(s["jpg"]) // 2]  # truncated JPEG
            elif k == 5:
                del s["txt"]  # missing caption
            elif k == 7:
                del s["jpg"]  # missing image
            elif k == 8:
                s["txt"] = b"\xff\xfe\xfa"  # not UTF-8
            w.write(s)
        for k in range(10, 16):
            w.write(good(k))
    # third shard: 4 samples, then the file is cut inside the 4th sample's image
    with ShardWriter(os.path.join(d, "t"), 10) as w:
        for k in range(16, 20):
            w.write(good(k))
    raw = open(os.path.join(d, "t", "00000.tar"), "rb").read()
    cut = raw.index(b"000019.jpg") + 512 + 100
    with open(os.path.join(d, "00002.tar"), "wb") as f:
        f.write(raw[:cut])
    return os.path.join(d, "{00000..00002}.tar")


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    spec = _write_bad_dataset(tmp_path)
    cfg = DataConfig(spec, batch_size=4, workers=0, drop_last=False, num_samples=20)
    loader = load(cfg, is_train=False)
    with caplog.at_level(logging.WARNING, logger="pyprotoclip.data"):
        keys = [k for b in loader for k in b["key"]]
    assert keys == [f"{k:06d}" for k in (0, 2, 4, 6, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)]
    st = loader.stats()
    assert st["bad"] == {"missing_image": 1, "missing_caption": 1, "bad_caption": 1, "bad_image": 2, "bad_shard": 1}
    assert st["bad_total"] == 6 and st["samples_yielded"] == 14
    assert st["samples_read"] == 19  # 10 + 6 + 3 whole samples; the cut one is dropped
    # warnings are rate-limited: the first five in full, the rest only as a periodic summary
    msgs = [r.getMessage() for r in caplog.records if "bad sample" in r.getMessage()]
    assert len(msgs) == 5 and "bad_image" in msgs[0] and "000001" in msgs[0]


def test_bad_samples_two_workers_stats_are_summed(tmp_path):
    spec = _write_bad_dataset(tmp_path)
    loader = load(DataConfig(spec, batch_size=2, workers=2, drop_last=False, num_samples=20), is_train=False)
    keys = sorted(k for b in loader for k in b["key"])
    assert len(keys) == 14
    st = loader.stats()
    assert st["workers_reporting"] == 2 and st["bad_total"] == 6 and st["samples_yielded"] == 14


def test_tar_reader_matches_tarfile_and_detects_damage(tmp_path):
    spec = write_good_shards(str(tmp_path), 1, 5)
    path = expand_shards(spec)[0]
    with tarfile.open(path) as t:
        expected = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    with open(path, "rb") as f:
        assert list(iter_tar_members(f)) == expected
    raw = open(path, "rb").read()
    with pytest.raises(TarDamaged, match="end of data"):
        list(iter_tar_members(io.BytesIO(raw[: 512 * 3 + 17])))
    bad = bytearray(raw)
    bad[0] ^= 0x20  # flips a name byte: checksum no longer matches
    with pytest.raises(TarDamaged, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(bad))))


def test_tar_reader_long_names(tmp_path):
    path = str(tmp_path / "long.tar")
    name = "d" * 120 + "/sample.txt"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        ti = tarfile.TarInfo(name)
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"abc"))
    with tarfile.open(str(tmp_path / "pax.tar"), "w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo(name)
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"xyz"))
    assert list(iter_tar_members(open(path, "rb"))) == [(name, b"abc")]
    assert list(iter_tar_members(open(str(tmp_path / "pax.tar"), "rb"))) == [(name, b"xyz")]


# ------------------------------------------------------------------------------------------ determinism


def test_main_process_loading_leaves_the_callers_rng_alone(synth):
    cfg = DataConfig(synth["train_shards"], batch_size=16, workers=0, shuffle_buffer=10, num_samples=32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    it = iter(build_loader(cfg, preprocess=random_preprocess, tokenize=tokenize, is_train=True))
    next(it)
    a = torch.rand(1)
    next(it)
    assert torch.equal(torch.cat([a, torch.rand(2)]), expected)


def test_train_order_is_deterministic_and_depends_on_epoch_and_seed(synth):
    cfg = DataConfig(synth["train_shards"], batch_size=16, workers=0, shuffle_buffer=50)
    a, b = keys_of(load(cfg, is_train=True)), keys_of(load(cfg, is_train=True))
    assert a == b and len(a) == 15 and all(len(x) == 16 for x in a)
    flat = [k for x in a for k in x]
    assert flat != sorted(flat)  # shuffled
    assert keys_of(load(cfg, is_train=True, epoch=1)) != a
    assert keys_of(load(DataConfig(synth["train_shards"], batch_size=16, workers=0, shuffle_buffer=50, seed=1), is_train=True)) != a


def _assert_same_batches(resumed, full, s):
    assert len(resumed) == len(full) - s
    for r, f in zip(resumed, full[s:]):
        assert r["key"] == f["key"] and r["caption"] == f["caption"]
        assert torch.equal(r["image"], f["image"]) and torch.equal(r["text"], f["text"]) and torch.equal(r["label"], f["label"])


def random_preprocess(im):
    """A random augmentation drawn from torch's and Python's global RNGs, as open_clip's RandomResizedCrop does."""
    import random

    return preprocess(im) + torch.rand(1) + random.random()


@pytest.mark.parametrize("workers, resampled, start", [(0, False, 5), (2, False, 3), (2, True, 5), (2, False, 0)])
def test_start_batch_resume_equals_the_uninterrupted_epoch(synth, workers, resampled, start):
    # num_samples above the data so the workers also start second passes
    cfg = DataConfig(synth["train_shards"], batch_size=16, workers=workers, resampled=resampled, shuffle_buffer=40, num_samples=300)
    kw = dict(preprocess=random_preprocess, tokenize=tokenize, is_train=True, epoch=2)
    full = list(build_loader(cfg, **kw))
    assert len(full) == 19
    resumed = build_loader(cfg, start_batch=start, **kw)
    assert len(resumed) == 19 - start and resumed.num_batches == 19
    _assert_same_batches(list(resumed), full, start)
    if start:
        assert resumed.stats()["samples_skipped_for_resume"] == 16 * start


def test_start_batch_resume_with_bad_samples(tmp_path):
    spec = _write_bad_dataset(tmp_path)
    cfg = DataConfig(spec, batch_size=3, workers=0, shuffle_buffer=6, num_samples=30)
    full = list(load(cfg, is_train=True))
    assert len(full) == 10
    for s in (1, 4, 7):
        _assert_same_batches(list(load(cfg, is_train=True, start_batch=s)), full, s)


def test_ranks_get_disjoint_shards_in_train(synth):
    cfg = DataConfig(synth["train_shards"], batch_size=8, workers=0, shuffle_buffer=10, num_samples=96)
    k0 = {k for x in keys_of(load(cfg, is_train=True, rank=0, world_size=2)) for k in x}
    k1 = {k for x in keys_of(load(cfg, is_train=True, rank=1, world_size=2)) for k in x}
    assert not (k0 & k1)


# ------------------------------------------------------------------------------------------ zero-shot files


def test_read_zeroshot_files_beside_and_in_parent(synth, tmp_path):
    names, templates = read_zeroshot_files(synth["train_shards"])
    assert names == synth["classnames"] and all("{}" in t for t in templates)
    ood_names, _ = read_zeroshot_files(synth["ood_shards"])
    assert ood_names == synth["ood_classnames"]
    # parent directory
    spec = write_good_shards(str(tmp_path / "shards"), 1, 2)
    (tmp_path / "classnames.txt").write_text("cat\ndog\n\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    assert read_zeroshot_files(spec) == (["cat", "dog"], ["a photo of a {}."])
    (tmp_path / "templates.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match=r"templates\.txt"):
        read_zeroshot_files(spec)


def test_read_zeroshot_files_missing(tmp_path):
    spec = write_good_shards(str(tmp_path / "x"), 1, 2)
    with pytest.raises(FileNotFoundError, match=r"classnames\.txt and templates\.txt not found"):
        read_zeroshot_files(spec)


def test_train_stream_over_only_broken_shards_ends_instead_of_spinning(tmp_path):
    for i in range(2):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"garbage" * 100)
    cfg = DataConfig(str(tmp_path / "{00000..00001}.tar"), batch_size=2, workers=0, num_samples=10)
    with pytest.raises(BadDataError, match=r"every shard is damaged \(2 of 2\)"):  # found before reading
        load(cfg, is_train=True)
    # tar headers that pass the check, cut inside the first sample: the stream ends with an error naming the shards
    spec = write_good_shards(str(tmp_path / "cut"), 2, 3)
    for path in expand_shards(spec):
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[:700])
    loader = load(DataConfig(spec, batch_size=2, workers=0, num_samples=10), is_train=True)
    with pytest.raises(BadDataError, match=r"stopped after 0 of 5 batches.*gave no samples.*00000\.tar"):
        list(loader)
    st = loader.stats()
    assert st["bad"]["bad_shard"] == 2 and st["samples_read"] == 0


def test_pipe_urls_are_read_and_not_checked_to_exist(tmp_path):
    spec = write_good_shards(str(tmp_path), 2, 3)
    url = f"pipe:cat {spec}"
    assert expand_shards(url) == [f"pipe:cat {tmp_path}/00000.tar", f"pipe:cat {tmp_path}/00001.tar"]
    with pytest.raises(ValueError, match="num_samples"):  # no sizes.json for URLs
        load(DataConfig(url, batch_size=4, workers=0), is_train=False)
    loader = load(DataConfig(url, batch_size=4, workers=0, num_samples=6, drop_last=False), is_train=False)
    assert [k for b in loader for k in b["key"]] == [f"{k:06d}" for k in range(6)]
