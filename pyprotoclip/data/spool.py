"""Episodes over streaming-only shards (``pipe:`` commands, URLs): a shard-level draw, spooled to local disk.

Such shards cannot be read by random access, so an episode cannot be E samples drawn one by one over the
dataset. Instead an episode is a seeded sequence of shard draws, uniform with replacement over the shards
and the same on every rank; rank r streams draws r, r + W, r + 2W, ... in order and keeps the first
n = E // W usable samples (the streaming loader's checks: an image and a caption, a UTF-8 caption, an image
that opens; bad samples are skipped and counted). Their raw members are written, byte for byte, into a
local spool ``<cache dir>/episode-<e>-rank<r>/`` that the rank then reads by random access like local
shards, so feature extraction and every training epoch of the episode read exactly these samples at the
same positions and the cluster labels never leave the rank.

The spool is written to a temporary directory and renamed when complete, with a manifest of what it holds
(and a digest of every position's key and source shard). A resumed run reuses a complete spool whose
manifest matches; otherwise it streams the same draws again (the same samples while the shards are
unchanged: the caller compares the digests). A rank keeps one episode's spool: completing the next removes
its others.

Compared with the sample-level draw: samples come in runs of whole shards, a shard drawn twice gives its
samples twice, and a rank's last shard is cut at n samples.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import shutil
import time
from typing import Any, Iterator, Sequence

import numpy as np

from pyprotoclip.data.index import ShardIndex
from pyprotoclip.data.pipeline import (
    _PIL_NOISE,
    BAD_CHECK_MIN_SAMPLES,
    BAD_REASONS,
    BadDataError,
    StreamStats,
    _BadSampleLog,
    _check_image_cheaply,
    _parse,
    _seed_of,
    bad_samples_of,
    describe_bad,
    iter_raw_samples,
    too_bad,
)
from pyprotoclip.data.writer import ShardWriter
from pyprotoclip.progress import ProgressClock, format_duration

logger = logging.getLogger("pyprotoclip.data")

SPOOL_VERSION = 1
SAMPLES_PER_SPOOL_SHARD = 10_000
MANIFEST, SOURCES = "manifest.json", "sources.npz"


def shard_draws(num_shards: int, *, seed: int, episode: int, rank: int, world_size: int) -> Iterator[int]:
    """Shard numbers in [0, num_shards) that ``rank`` streams for ``episode``: draws rank, rank + W, ... of one
    seeded sequence drawn uniformly with replacement (the same sequence on every rank). Endless."""
    if num_shards < 1:
        raise ValueError("train-data: no shards")
    rng = random.Random(_seed_of(seed, episode, 13))
    j = 0
    while True:
        s = rng.randrange(num_shards)
        if j % world_size == rank:
            yield s
        j += 1


def spool_dir(cache_dir: str, episode: int, rank: int) -> str:
    return os.path.join(cache_dir, f"episode-{episode:05d}-rank{rank:03d}")


def _identity(shards: Sequence[str], **what: int) -> dict[str, Any]:
    """What a spool must match to be reused: the shard list, the draw's seed and place, the sample count."""
    digest = hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]
    return {"version": SPOOL_VERSION, "shards": digest, **what}


def _read_manifest(directory: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _digest(keys: Sequence[str], sources: Sequence[int]) -> str:
    """What identifies a spool's samples, position by position: their keys and source shards."""
    h = hashlib.sha256()
    for key, source in zip(keys, sources):
        h.update(f"{source}\t{key}\n".encode())
    return h.hexdigest()[:32]


class SpooledEpisode(ShardIndex):
    """A rank's spooled episode: a :class:`ShardIndex` of the spool whose ``keys`` are the source samples' keys.

    ``source_shards[j]``: the shard number (into the run's shard list) sample j came from. ``digest``: a
    hash of every position's key and source shard (a spool streamed again must give the same one).
    ``manifest["draws"]``: the shard draws streamed; ``stats``: the counts of that stream (bad samples
    skipped, shards read). ``seconds``: the time it took to stream, 0 for a spool found complete."""

    def __init__(self, directory: str, seconds: float = 0.0) -> None:
        self.directory, self.seconds = directory, seconds
        self.manifest = _read_manifest(directory) or {}
        super().__init__(sorted(glob.glob(os.path.join(directory, "*.tar"))), flag="episode spool")
        with np.load(os.path.join(directory, SOURCES), allow_pickle=False) as z:
            keys, self.source_shards = z["keys"], z["shards"]
        if len(keys) != len(self.keys) or _digest(keys, self.source_shards) != self.manifest.get("digest"):
            raise BadDataError(f"episode spool {directory}: its samples do not match its manifest")
        self.keys = keys
        self.digest: str = self.manifest["digest"]
        self.stats: dict[str, Any] = self.manifest.get("stats", {})


def spool_episode(shards: Sequence[str], *, cache_dir: str, episode: int, rank: int, world_size: int, seed: int,
                  num_samples: int, max_bad_fraction: float | None = None, flag: str = "train-data",
                  log: logging.Logger | None = None, every_s: float = 30.0) -> SpooledEpisode:
    """The spool of ``rank``'s ``num_samples`` samples of ``episode``: reused when complete and matching, else
    streamed from the rank's shard draws and written (see the module docstring).

    BadDataError, naming the shards, when the draws give no usable sample for a whole round of draws, or when
    more than ``max_bad_fraction`` of the samples read are bad.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    log = log or logger
    final = spool_dir(cache_dir, episode, rank)
    identity = _identity(shards, episode=episode, rank=rank, world_size=world_size, seed=seed, num_samples=num_samples)
    manifest = _read_manifest(final)
    if manifest is not None and {k: manifest.get(k) for k in identity} == identity:
        try:
            return SpooledEpisode(final)
        except Exception as exc:  # noqa: BLE001 - a damaged spool is streamed again
            log.warning("episode %d: the spool %s is damaged (%s); streaming it again", episode, final, exc)
    tmp = f"{final}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    stats, warn = StreamStats(), _BadSampleLog()
    keys: list[str] = []
    sources: list[int] = []
    draws: list[int] = []
    dry = 0  # draws in a row without a usable sample
    t0, clock = time.time(), ProgressClock(every_s)
    try:
        with ShardWriter(tmp, SAMPLES_PER_SPOOL_SHARD) as writer:
            for s in shard_draws(len(shards), seed=seed, episode=episode, rank=rank, world_size=world_size):
                draws.append(s)
                before = len(keys)
                for sample in iter_raw_samples(shards[s], stats, warn):
                    stats["samples_checked"] += 1
                    reason, img, _, _ = _parse(sample, stats)
                    detail = ""
                    if reason is None:
                        try:
                            _check_image_cheaply(img)
                        except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
                            reason, detail = "bad_image", _PIL_NOISE.sub("", f"{type(exc).__name__}: {exc}")
                    if reason is not None:
                        stats[reason] += 1
                        stats.bad_in(shards[s], reason, 1, detail)
                        warn(reason, f"{shards[s]}:{sample['__key__']}", detail)
                        continue
                    writer.write({"__key__": f"{len(keys):09d}",
                                  **{k: v for k, v in sample.items() if not k.startswith("__")}})
                    keys.append(sample["__key__"])
                    sources.append(s)
                    if len(keys) == num_samples:
                        break
                dry = 0 if len(keys) > before else dry + 1
                bad, seen = bad_samples_of(stats)
                exceeded = too_bad(bad, seen, max_bad_fraction, min(BAD_CHECK_MIN_SAMPLES, num_samples))
                if exceeded or dry >= 2 * len(shards):
                    why = (f"more than --max-bad-fraction {max_bad_fraction:g} of the samples read are bad" if exceeded
                           else f"{dry} shard draws in a row gave no usable sample")
                    raise BadDataError(f"{flag}: spooling episode {episode} on process {rank} stopped after "
                                       f"{len(keys)} of {num_samples} samples: {why}; {describe_bad(_summary(stats))}")
                if len(keys) == num_samples:
                    break
                if clock.due():
                    clock.mark()
                    rate = len(keys) / max(time.time() - t0, 1e-9)
                    log.info("episode %d: spooling %d/%d samples on this process (%d shard draws, %.0f samples/s, "
                             "ETA %s)", episode, len(keys), num_samples, len(draws), rate,
                             format_duration((num_samples - len(keys)) / max(rate, 1e-9)))
        np.savez(os.path.join(tmp, SOURCES), keys=np.array(keys, dtype=np.str_), shards=np.array(sources, dtype=np.int64))
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({**identity, "digest": _digest(keys, sources), "draws": draws, "stats": _summary(stats)}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in glob.glob(os.path.join(cache_dir, f"episode-*-rank{rank:03d}*")):  # other episodes, dead writers
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return SpooledEpisode(final, seconds=time.time() - t0)


def _summary(stats: StreamStats) -> dict[str, Any]:
    """The counts :func:`describe_bad` reads, from one stream's :class:`StreamStats`."""
    bad_samples, seen = bad_samples_of(stats)
    bad = {r: int(stats.get(r, 0)) for r in BAD_REASONS}
    worst = [(u, int(n), stats.why.get(u, "")) for u, n in stats.by_shard.most_common(5)]
    return {"bad": bad, "bad_total": sum(bad.values()), "bad_samples": bad_samples, "samples_seen": seen,
            "samples_read": int(stats.get("samples_read", 0)), "shards": int(stats.get("shards", 0)),
            "samples_lost": int(stats.get("samples_lost", 0)), "worst_shards": worst}
