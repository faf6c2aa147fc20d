"""Bad data: damaged shards and members are skipped, counted and named; commands end with one-line errors; the
--max-bad-fraction limit over workers and ranks; no hang on data that never yields a usable sample."""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import tarfile

import pytest
import torch
from click.testing import CliRunner

from pyprotoclip.cli import main
from pyprotoclip.data import DataConfig, build_loader, expand_shards
from pyprotoclip.data.pipeline import MAX_CAPTION_CHARS, BadDataError, BadDataMonitor, check_shard_headers
from pyprotoclip.data.writer import ShardWriter
from tests.data.helpers import jpeg_bytes, preprocess, tokenize, write_good_shards


def load(cfg: DataConfig, **kw):
    return build_loader(cfg, preprocess=preprocess, tokenize=tokenize, **kw)


def randomize(spec: str, seed: int = 0) -> list[str]:
    """Overwrite every shard of ``spec`` with 100 kB of random bytes, as `head -c 100000 /dev/urandom` does."""
    g = torch.Generator().manual_seed(seed)
    shards = expand_shards(spec)
    for path in shards:
        with open(path, "wb") as f:
            f.write(bytes(torch.randint(0, 256, (100_000,), generator=g, dtype=torch.uint8).tolist()))
    return shards


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


def write_bad_image_shards(directory: str, n_shards: int, per_shard: int, bad_every: int) -> str:
    """Valid tars where every ``bad_every``-th sample's image is not an image (1: all of them); returns the spec."""
    os.makedirs(directory, exist_ok=True)
    with ShardWriter(directory, per_shard) as w:
        for k in range(n_shards * per_shard):
            img = b"this is not an image" if k % bad_every == 0 else jpeg_bytes(k)
            w.write({"__key__": f"{k:06d}", "jpg": img, "txt": f"caption {k}", "cls": str(k % 5)})
    return w.spec()


def one_line_error(result, exit_code: int = 1) -> str:
    """The 'Error: ...' line of a failed command, after checking there is exactly one and no traceback. Bad data
    exits 1 without the usage text; a flag's value (a missing file, a bad number) exits 2 with it."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output, result.output
    assert ("Usage:" in result.output) == (exit_code == 2), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


# ------------------------------------------------------------------------------------------ random-bytes shards


@pytest.fixture(scope="module")
def random_shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("random"))
    spec = write_good_shards(d, 3, 4)
    randomize(spec)
    return spec


@pytest.fixture(scope="module")
def good_shards(tmp_path_factory):
    return write_good_shards(str(tmp_path_factory.mktemp("good")), 2, 8)


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory):
    from pyprotoclip.checkpoint import save_checkpoint
    from pyprotoclip.models import create_model

    model = create_model("tiny-vit", seed=0)[0]
    path = str(tmp_path_factory.mktemp("ckpt") / "clip.pt")
    save_checkpoint({"state_dict": model.state_dict(), "model": "tiny-vit", "method": "clip", "step": 0}, path)
    return path


def test_random_bytes_shards_are_named_before_reading(random_shards):
    cfg = DataConfig(random_shards, batch_size=2, workers=0, num_samples=8, flag="train-data")
    with pytest.raises(BadDataError, match=r"^train-data: every shard is damaged \(3 of 3\): .*00000\.tar \(not a tar "
                                           r"file: its first header's checksum is wrong\), .*00001\.tar .*00002\.tar"):
        load(cfg, is_train=True)
    with pytest.raises(BadDataError, match="every shard is damaged"):
        load(DataConfig(random_shards, batch_size=2, workers=0, drop_last=False), is_train=False)


@pytest.mark.parametrize("method", ["clip", "cyclip", "protoclip"])
def test_train_on_random_bytes_is_a_one_line_error(random_shards, tmp_path, method):
    args = ["train", "--train-data", random_shards, "--model", "tiny-vit", "--batch-size", "2", "--epochs", "1",
            "--workers", "0", "--precision", "fp32", "--logs", str(tmp_path), "--name", "r", "--threads", "1",
            "--method", method]
    if method == "protoclip":
        args += ["--num-prototypes", "2"]
    line = one_line_error(CliRunner().invoke(main, args))
    assert "train-data: every shard is damaged (3 of 3)" in line and "00000.tar" in line and "and 0 more" not in line


def test_eval_and_ood_on_random_bytes_are_one_line_errors(random_shards, good_shards, clip_ckpt, tmp_path):
    common = ["--batch-size", "4", "--workers", "0", "--device", "cpu"]
    r = CliRunner().invoke(main, ["eval", "--checkpoint", clip_ckpt, "--data", random_shards, "--out", str(tmp_path),
                                  "--batch-size", "4", "--workers", "0", "--device", "cpu", "--classnames",
                                  _lines(tmp_path, "c.txt", "a\nb"), "--templates", _lines(tmp_path, "t.txt", "{}")])
    assert "data: every shard is damaged (3 of 3)" in one_line_error(r)
    r = CliRunner().invoke(main, ["ood", "score", "--checkpoint", clip_ckpt, "--train-data", good_shards, "--data",
                                  random_shards, "--score", "knn", "--knn-k", "1", *common])
    assert "data: every shard is damaged (3 of 3)" in one_line_error(r)
    r = CliRunner().invoke(main, ["ood", "eval", "--checkpoint", clip_ckpt, "--train-data", random_shards, "--id-data",
                                  good_shards, "--ood-data", good_shards, "--score", "knn", "--knn-k", "1", *common])
    assert "train-data: every shard is damaged (3 of 3)" in one_line_error(r)
    r = CliRunner().invoke(main, ["ood", "train", "--train-data", random_shards, "--backbone", "tiny-rn", "--batch-size",
                                  "2", "--epochs", "1", "--workers", "0", "--precision", "fp32", "--logs", str(tmp_path),
                                  "--name", "o", "--device", "cpu", "--train-num-samples", "4", "--num-classes", "5"])
    assert "train-data: every shard is damaged (3 of 3)" in one_line_error(r)


def _lines(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    return str(path)


def test_shard_header_check_says_what_is_wrong(tmp_path):
    good = expand_shards(write_good_shards(str(tmp_path / "g"), 1, 2))[0]
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "short.tar").write_bytes(b"abc")
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    (tmp_path / "zeros.tar").write_bytes(b"\0" * 1024)
    names = [str(tmp_path / n) for n in ("empty.tar", "short.tar", "gz.tar", "zeros.tar")]
    found = check_shard_headers([good, *names])
    assert good not in found
    assert [found[n].split(",")[0].split(":")[0] for n in names] == ["an empty file", "not a tar file", "gzip-compressed",
                                                                     "an empty tar"]


def test_a_long_shard_list_reads_an_evenly_spaced_sample_before_a_run(tmp_path, monkeypatch):
    from pyprotoclip.data import pipeline

    shards = [str(tmp_path / f"{i:05d}.tar") for i in range(10)]
    assert pipeline.shards_to_check(shards, limit=4) == [shards[0], shards[3], shards[6], shards[9]]
    assert pipeline.shards_to_check(shards, limit=10) == shards
    for s in shards:
        open(s, "wb").write(b"\x07" * 3000)
    opened = []
    real_open = open
    monkeypatch.setattr(pipeline, "HEADER_CHECK_LIMIT", 4)
    monkeypatch.setattr(pipeline, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k), raising=False)
    with pytest.raises(BadDataError) as info:
        pipeline._check_shards_before_reading(shards, None, DataConfig(shards, batch_size=2, flag="train-data"))
    assert sorted(opened) == [shards[0], shards[3], shards[6], shards[9]]  # 4 of the 10 read, not all of them
    msg = str(info.value)
    assert msg.startswith("train-data: every shard checked is damaged (4 of 4, 4 of 10 checked): ") and "\n" not in msg, msg


def test_some_damaged_shards_are_skipped_with_one_warning_naming_them(tmp_path, caplog):
    spec = write_good_shards(str(tmp_path), 4, 5)
    damaged = expand_shards(spec)[1]
    open(damaged, "wb").write(b"\x07" * 3000)
    cfg = DataConfig(spec, batch_size=5, workers=0, drop_last=False, flag="val-data")
    with caplog.at_level(logging.WARNING, logger="pyprotoclip.data"):
        loader = load(cfg, is_train=False)
        keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 15
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("val-data: 1 of 4 shard(s) are damaged and are skipped: ") and "00001.tar" in m for m in msgs)
    st = loader.stats()
    assert st["bad"]["bad_shard"] == 1 and st["samples_lost"] == 5  # sizes.json says the shard held 5
    assert st["worst_shards"][0][0] == damaged and "damaged tar" in st["worst_shards"][0][2]
    # with a limit below the damaged share (5 of 20 samples): an error before reading, naming the flag
    with pytest.raises(BadDataError, match=r"1 of 4 shard\(s\) are damaged \(25\.0% of the samples\), more than "
                                           r"--max-bad-fraction 0\.1 allows: .*00001\.tar"):
        load(DataConfig(spec, batch_size=5, workers=0, max_bad_fraction=0.1), is_train=True)


# ------------------------------------------------------------------------------------------ members and captions


def test_corrupt_truncated_empty_and_non_image_members_and_captions(tmp_path, caplog):
    img = jpeg_bytes(1)
    huge = "word " * 4000
    samples = [
        ("000", img, b"fine"),
        ("001", b"\xff\xd8\xff garbage", b"corrupt jpeg"),
        ("002", img[: len(img) // 2], b"truncated jpeg"),
        ("003", b"", b"empty image member"),
        ("004", b"plain text, not an image", b"non-image member"),
        ("005", img, b""),  # empty caption
        ("006", img, b"   \n "),  # blank caption
        ("007", img, huge.encode()),  # huge caption: cut, kept
        ("008", img, b"\xff\xfe not utf-8"),
        ("009", img, b"fine too"),
    ]
    path = str(tmp_path / "00000.tar")
    write_tar(path, [m for k, im, cap in samples for m in ((f"{k}.jpg", im), (f"{k}.txt", cap))])
    loader = load(DataConfig(path, batch_size=3, workers=0, drop_last=False, num_samples=10), is_train=False)
    with caplog.at_level(logging.WARNING, logger="pyprotoclip.data"):
        batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert keys == ["000", "007", "009"]
    cut = next(c for b in batches for c in b["caption"] if c.startswith("word"))
    assert len(cut) <= MAX_CAPTION_CHARS and huge.startswith(cut)
    st = loader.stats()
    assert st["bad"] == {"missing_image": 0, "missing_caption": 2, "bad_caption": 1, "bad_image": 4, "bad_shard": 0}
    assert st["captions_truncated"] == 1 and st["bad_samples"] == 7 and st["samples_seen"] == 10
    assert st["worst_shards"] == [(path, 7, st["worst_shards"][0][2])] and "bad_image" in st["worst_shards"][0][2]
    # the epoch's summary names the shard; the per-sample warnings name shard and key
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("shards: skipped 7 of 10 samples bad") and path in m for m in msgs)
    assert any(f"{path}:001" in m for m in msgs)


def test_truncated_tar_and_bad_member_header_keep_the_samples_before(tmp_path):
    spec = write_good_shards(str(tmp_path), 2, 6)
    a, b = expand_shards(spec)
    raw = open(a, "rb").read()
    open(a, "wb").write(raw[: raw.index(b"000003.jpg") + 512 + 40])  # cut inside sample 3's image
    raw = bytearray(open(b, "rb").read())
    pos = raw.index(b"000009.jpg")
    raw[pos] ^= 0x01  # sample 9's image header no longer matches its checksum
    open(b, "wb").write(bytes(raw))
    loader = load(DataConfig(spec, batch_size=2, workers=0, drop_last=False), is_train=False)
    keys = [k for x in loader for k in x["key"]]
    assert keys == [f"{k:06d}" for k in (0, 1, 2, 6, 7, 8)]
    st = loader.stats()
    assert st["bad"]["bad_shard"] == 2 and st["samples_lost"] == 6  # 3 + 3 of the 6 in each, by sizes.json
    whys = {u: w for u, _, w in st["worst_shards"]}
    assert "unexpected end of data" in whys[a] and "checksum" in whys[b]


def test_shard_deleted_after_the_run_started_is_counted_and_named(tmp_path):
    spec = write_good_shards(str(tmp_path), 2, 4)
    a, b = expand_shards(spec)
    # 24 samples a rank from 8 on disk: the worker starts its second and third pass after the deletion
    loader = load(DataConfig(spec, batch_size=4, workers=0, shuffle_buffer=1, num_samples=24), is_train=True)
    it = iter(loader)
    first = next(it)
    os.remove(b)
    rest = list(it)
    assert len(rest) == 5 and all(len(x["key"]) == 4 for x in [first, *rest])
    st = loader.stats()
    assert st["bad"]["bad_shard"] >= 1
    assert any(u == b and "missing: deleted or moved after the run started" in w for u, _, w in st["worst_shards"])


def test_a_damaged_shard_is_left_out_of_a_training_stream_not_counted_every_pass(tmp_path):
    spec = write_good_shards(str(tmp_path), 4, 6)
    damaged = expand_shards(spec)[3]
    open(damaged, "wb").write(b"\x07" * 3000)  # 1 of 4 shards: a quarter of the samples, found before reading
    # 72 samples a rank from 18 readable ones: four passes over the shards, and a limit the one shard stays under
    cfg = DataConfig(spec, batch_size=4, workers=0, shuffle_buffer=50, num_samples=72, max_bad_fraction=0.3)
    loader = load(cfg, is_train=True)
    keys = [k for x in loader for k in x["key"]]
    assert len(keys) == 72 and set(keys) == {f"{k:06d}" for k in range(18)}  # the readable samples, repeated
    st = loader.stats()
    assert st["bad"].get("bad_shard", 0) == 0 and st["samples_lost"] == 0  # never opened in the stream


def test_a_shard_damaged_inside_counts_its_lost_samples_once_per_stream(tmp_path):
    spec = write_good_shards(str(tmp_path), 2, 6)
    a, _ = expand_shards(spec)
    raw = open(a, "rb").read()
    open(a, "wb").write(raw[: raw.index(b"000003.jpg") + 512 + 40])  # its header is fine: it fails while read
    loader = load(DataConfig(spec, batch_size=3, workers=0, shuffle_buffer=1, num_samples=27), is_train=True)
    assert sum(len(x["key"]) for x in loader) == 27  # three passes over the 9 readable samples
    st = loader.stats()
    assert st["bad"]["bad_shard"] == 3  # read (and failed) in each pass
    assert st["samples_lost"] == 3  # its 3 unreadable samples, counted once


def test_missing_files_in_the_spec_are_named_before_training(tmp_path):
    spec = write_good_shards(str(tmp_path / "d"), 2, 4)
    wide = spec.replace("{00000..00001}", "{00000..00004}")
    r = CliRunner().invoke(main, ["train", "--train-data", wide, "--model", "tiny-vit", "--batch-size", "2", "--epochs",
                                  "1", "--workers", "0", "--precision", "fp32", "--logs", str(tmp_path / "logs"),
                                  "--name", "m", "--threads", "1", "--train-num-samples", "8"])
    line = one_line_error(r, exit_code=2)
    assert "train-data: 3 of 5 shard(s) not found: " in line and "00002.tar" in line and "00004.tar" in line
    assert not os.path.exists(tmp_path / "logs" / "m" / "results.jsonl")  # nothing trained


# ------------------------------------------------------------------------------------------ --max-bad-fraction


def test_max_bad_fraction_stops_a_worker_with_the_counts_and_worst_shards(tmp_path):
    spec = write_bad_image_shards(str(tmp_path), 4, 10, bad_every=3)  # 14 of 40 bad
    cfg = DataConfig(spec, batch_size=4, workers=0, shuffle_buffer=1, max_bad_fraction=0.1, flag="train-data")
    loader = load(cfg, is_train=True)
    with pytest.raises(BadDataError, match=r"^train-data: stopped after \d+ of 10 batches on this process: "
                                           r"more than --max-bad-fraction 0\.1 of a data worker's samples are bad; "
                                           r"\d+ of \d+ samples bad \(bad_image \d+\); worst shards: .*\.tar \(\d+ bad, "
                                           r"bad_image: UnidentifiedImageError: cannot identify image file\), "):
        list(loader)
    # the same data under a limit it stays below (the share is 35%): the whole epoch
    assert len(list(load(DataConfig(spec, batch_size=4, workers=0, shuffle_buffer=1, max_bad_fraction=0.4), is_train=True))) == 10


def test_max_bad_fraction_waits_for_the_minimum_sample_count(tmp_path):
    # the very first sample is bad (1 of 1 at first), 1 of 40 overall: under a limit of 0.1 the epoch completes
    spec = write_bad_image_shards(str(tmp_path), 2, 20, bad_every=1000)
    cfg = DataConfig(spec, batch_size=4, workers=0, shuffle_buffer=1, max_bad_fraction=0.1, num_samples=36)
    loader = load(cfg, is_train=True)
    assert len(list(loader)) == 9 and loader.stats()["bad"]["bad_image"] == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_worker_that_finds_only_bad_images_stops_instead_of_hanging(tmp_path):
    spec = write_bad_image_shards(str(tmp_path), 2, 6, bad_every=1)  # tars are fine, every image is not
    loader = load(DataConfig(spec, batch_size=2, workers=1, shuffle_buffer=4, num_samples=8, flag="train-data"),
                  is_train=True)
    faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test run instead of stalling it
    try:
        with pytest.raises(BadDataError, match=r"train-data: stopped after 0 of 4 batches.*bad samples in a "
                                               r"row.*worst shards: .*0000[01]\.tar"):
            list(loader)
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_monitor_judges_the_counts_summed_over_ranks():
    other_rank = [30, 100]  # another rank's (bad, seen)
    reduce = lambda xs: [xs[0] + other_rank[0], xs[1] + other_rank[1]]  # noqa: E731
    gather = lambda x: [x, [("other/00007.tar", 30, "bad_image: OSError")]]  # noqa: E731
    mon = BadDataMonitor(0.1, 50, "train-data", reduce=reduce, gather=gather)
    mine = {"bad_samples": 1, "samples_seen": 100, "worst_shards": [("mine/00001.tar", 1, "missing_caption")]}
    with pytest.raises(BadDataError, match=r"^train-data: 31 of the 200 samples read so far are bad \(15\.5%\), more "
                                           r"than --max-bad-fraction 0\.1 allows; worst shards: other/00007\.tar "
                                           r"\(30 bad, bad_image: OSError\), mine/00001\.tar"):
        mon.check(mine)  # this rank alone: 1%
    other_rank[:] = [5, 100]
    mon.check(mine)  # 3% over both
    other_rank[:] = [20, 20]
    BadDataMonitor(0.1, 200, reduce=reduce).check({"bad_samples": 0, "samples_seen": 20})  # 40 seen < 200: not yet
    BadDataMonitor(None, 1, reduce=reduce).check(mine)  # no limit


def _monitor_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One gloo rank: rank 1 read 40 bad of 100, rank 0 none; both must raise the same error at the same check."""
    import torch.distributed as dist

    from pyprotoclip import distributed as pdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mon = BadDataMonitor(0.1, 100, reduce=lambda xs: pdist.all_reduce_sum(torch.tensor(xs, dtype=torch.int64)).tolist(),
                             gather=pdist.gather_object)
        mine = {"bad_samples": 40 * rank, "samples_seen": 100,
                "worst_shards": [(f"rank{rank}/00003.tar", 40, "bad_image")] if rank else []}
        try:
            mon.check({"bad_samples": 0, "samples_seen": 10, "worst_shards": []})  # 20 seen: below the minimum
            mon.check(mine)
            msg = "no error"
        except BadDataError as exc:
            msg = str(exc)
        with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
            f.write(msg)
    finally:
        dist.destroy_process_group()


def test_monitor_over_two_gloo_ranks_stops_both_with_one_message(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_monitor_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    msgs = [(tmp_path / f"{r}.txt").read_text() for r in range(2)]
    assert msgs[0] == msgs[1]
    assert msgs[0].startswith("train-data: 40 of the 200 samples read so far are bad (20.0%), more than "
                              "--max-bad-fraction 0.1 allows; worst shards: rank1/00003.tar (40 bad, bad_image)")


def test_train_cli_max_bad_fraction(tmp_path):
    spec = write_bad_image_shards(str(tmp_path / "d"), 2, 16, bad_every=3)  # 11 of 32 bad
    base = ["train", "--train-data", spec, "--model", "tiny-vit", "--batch-size", "4", "--epochs", "1", "--workers", "0",
            "--precision", "fp32", "--logs", str(tmp_path / "logs"), "--threads", "1", "--warmup", "1"]
    line = one_line_error(CliRunner().invoke(main, [*base, "--name", "a"]))  # the default, 0.1
    assert "train-data: " in line and "more than --max-bad-fraction 0.1 of a data worker's samples are bad" in line and "0000" in line
    line = one_line_error(CliRunner().invoke(main, [*base, "--name", "b", "--max-bad-fraction", "1.5"]), exit_code=2)
    assert "max-bad-fraction: expected a fraction in [0, 1]" in line
    r = CliRunner().invoke(main, [*base, "--name", "c", "--max-bad-fraction", "0.5", "--train-num-samples", "8"])
    assert r.exit_code == 0, r.output


def test_help_documents_max_bad_fraction():
    out = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--max-bad-fraction" in out and "[default: 0.1]" in out.split("--max-bad-fraction", 1)[1][:600]
    out = CliRunner().invoke(main, ["ood", "train", "--help"]).output
    assert "--max-bad-fraction" in out


# ------------------------------------------------------------------------------------------ random access (ProtoCLIP)


def test_shard_index_leaves_damaged_shards_out_and_names_them(tmp_path, caplog):
    from pyprotoclip.data.index import ShardIndex

    spec = write_good_shards(str(tmp_path), 3, 4)
    shards = expand_shards(spec)
    open(shards[1], "wb").write(b"\x05" * 2048)
    with caplog.at_level(logging.WARNING, logger="pyprotoclip.data"):
        index = ShardIndex(shards, cache=False, flag="train-data")
    assert len(index) == 8 and list(index.damaged) == [shards[1]]
    assert any("train-data: 1 of 3 shard(s) are damaged and left out" in r.getMessage() for r in caplog.records)
    randomize(spec)
    with pytest.raises(BadDataError, match=r"train-data: every shard is damaged \(3 of 3\)"):
        ShardIndex(shards, cache=False, flag="train-data")


# ------------------------------------------------------------------------------------------ evaluation


def test_eval_reports_the_bad_samples_it_skipped(tmp_path, clip_ckpt):
    spec = write_bad_image_shards(str(tmp_path / "d"), 2, 10, bad_every=7)  # keys 0, 7, 14: 3 of 20 bad
    args = ["eval", "--checkpoint", clip_ckpt, "--data", spec, "--out", str(tmp_path), "--batch-size", "8", "--workers",
            "0", "--device", "cpu", "--no-plot", "--classnames", _lines(tmp_path, "c.txt", "a\nb\nc\nd\ne"),
            "--templates", _lines(tmp_path, "t.txt", "a {}")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "data: 3 bad sample(s) skipped (0 damaged shard read(s)), not in these numbers" in r.output
    import json

    row = json.loads(open(tmp_path / "results.jsonl").read().splitlines()[-1])
    assert row["bad_samples"] == 3 and row["damaged_shards"] == 0 and row["num_samples"] == 17


def test_eval_over_shards_without_a_usable_sample_names_them(tmp_path):
    spec = write_bad_image_shards(str(tmp_path), 2, 3, bad_every=1)
    loader = load(DataConfig(spec, batch_size=2, workers=0, drop_last=False, flag="data"), is_train=False)
    with pytest.raises(BadDataError, match=r"^data: no usable sample in 2 shard\(s\); 6 of 6 samples bad \(bad_image 6\); "
                                           r"worst shards: .*0000[01]\.tar \(3 bad, bad_image: "):
        list(loader)


def test_class_files_beside_the_shards_may_start_with_a_bom(tmp_path):
    from pyprotoclip.data.pipeline import read_zeroshot_files

    spec = write_good_shards(str(tmp_path), 1, 2)
    (tmp_path / "classnames.txt").write_bytes("\ufeffred circle\nblue square\n".encode("utf-8"))
    (tmp_path / "templates.txt").write_bytes("\ufeffa photo of a {}.\n".encode("utf-8"))
    assert read_zeroshot_files(spec) == (["red circle", "blue square"], ["a photo of a {}."])
