"""Webdataset loading for training and evaluation.

Shards are tar files as img2dataset writes them (``<key>.jpg|jpeg|png|webp`` + ``<key>.txt``, optional ``.cls`` and
``.json``). Batches are formed inside the DataLoader workers, and the DataLoader hands them out round-robin over the
workers (``batch_size=None``), which fixes the global batch order:

    global batch j of an epoch is local batch j // W of *logical* worker j % W   (W = workers)

Each logical worker's stream depends only on (seed, epoch, rank, world_size, W, logical id): its shards, shard order
and shuffle buffer are seeded from those. Resuming at ``start_batch = s`` rotates the workers (physical worker w plays
logical worker (w + s) % W) and lets each skip its first ceil((s - l) / W) batches by reading, but not decoding,
samples. So the resumed loader yields exactly batches s, s+1, ... of an uninterrupted epoch.

Training streams never run dry: without ``resampled`` each worker walks its share of the (epoch-shuffled) shards and
starts another pass, reshuffled, when it has fewer samples than its quota of batches; with ``resampled`` workers draw
shards with replacement. Every batch is full. An epoch has ceil(num_samples / (batch_size * world_size)) batches per
rank. Evaluation streams read each shard of the rank once, in order, without shuffling.

Bad data is never skipped silently and never crashes or stalls a stream. Bad samples (no image, no caption or an empty
one, a caption that is not UTF-8, an image PIL cannot decode) and damaged shards (not a tar, truncated, a bad header,
unreadable or deleted after the run started) are skipped, counted by reason and by shard, and reported with a
rate-limited warning; captions longer than MAX_CAPTION_CHARS characters are cut to that length (counted, not bad).
The counts travel to the main process inside every batch (a snapshot of the worker's counts) and in a last stats-only
item; :meth:`Loader.stats` sums them over workers. Before reading, :func:`build_loader` checks the first tar header of
every local shard: when every shard is damaged it raises :class:`BadDataError` naming them. With
``DataConfig.max_bad_fraction`` a worker whose bad share (after ``BAD_CHECK_MIN_SAMPLES`` samples) passes it stops,
so a worker that finds only bad data cannot stall the step that waits for its batch; a training stream that ends
before its epoch's batches raises :class:`BadDataError` naming the damaged shards and the worst ones.
:class:`BadDataMonitor` applies the same limit to the counts of every worker of every process.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

logger = logging.getLogger("pyprotoclip.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "text", "caption")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http://, s3://, ... (not checked to exist)
BAD_REASONS = ("missing_image", "missing_caption", "bad_caption", "bad_image", "bad_shard")
MAX_CAPTION_CHARS = 1000  # longer captions are cut here: the tokenizers keep 77 tokens, and BPE of megabytes is slow
BAD_CHECK_MIN_SAMPLES = 1000  # --max-bad-fraction judges after this many samples (or the epoch's, when fewer)
SHARDS_REPORTED = 8  # worst shards a worker reports with each batch


class BadDataError(ValueError):
    """The data cannot give what was asked: every shard damaged, a training stream that ran out because its shards
    are damaged, or more bad samples than ``max_bad_fraction`` allows. The message is one line naming the shards."""


@dataclass
class DataConfig:
    """Where the shards are and how to batch them (see the data contract).

    shards: brace-expanded spec(s) joined by '::', e.g. "d/train/{00000..00009}.tar".
    batch_size: per rank. workers: DataLoader workers per rank (0: load in the main process).
    num_samples: samples per epoch (global); None: the sum from sizes.json beside the shards.
    resampled: draw shards with replacement (train). seed: shard order and shuffle seed.
    shuffle_buffer: samples per worker (train only). drop_last: eval only; training batches are always full.
    max_bad_fraction: a data worker stops (and the loader raises BadDataError) when more than this share of the
    samples it read is bad, once it read BAD_CHECK_MIN_SAMPLES (or its epoch's samples, when fewer); None: never.
    flag: what error messages call these shards ("train-data", "val-data", "data").
    """

    shards: str
    batch_size: int
    workers: int = 2
    num_samples: int | None = None
    resampled: bool = False
    seed: int = 0
    shuffle_buffer: int = 1000
    drop_last: bool = True
    max_bad_fraction: float | None = None
    flag: str = "shards"


# ----------------------------------------------------------------------------------------------- shard specs


def _is_url(path: str) -> bool:
    return bool(_URL_RE.match(path)) and not os.path.exists(path)


def expand_shards(spec: str, flag: str = "shards") -> list[str]:
    """Expand '::'-joined brace specs ("a/{000..009}.tar::b/x.tar") into a list of shard paths; a local part with
    ``*`` or ``?`` is a glob (sorted matches, "dir/*.tar").

    Local paths are checked to exist (FileNotFoundError naming the missing ones, the first few and a count, after
    ``flag``; a directory gets the spec of the shards in it as a hint); URLs (pipe:, http://, ...) are not.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{flag}: expected a non-empty shard spec such as 'dir/{{00000..00009}}.tar', got {spec!r}")
    shards: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise ValueError(f"{flag}: empty part in shard spec {spec!r} (parts are joined by '::')")
        for path in braceexpand.braceexpand(os.path.expanduser(part)):
            if not _is_url(path) and any(c in path for c in "*?") and not os.path.exists(path):
                shards.extend(sorted(glob.glob(path)) or [path])  # no match: reported as missing below
            else:
                shards.append(path)
    missing = [s for s in shards if not _is_url(s) and not os.path.isfile(s)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        hint = ""
        if os.path.isdir(missing[0]):
            tars = sorted(n for n in os.listdir(missing[0]) if n.endswith(".tar"))
            hint = (f"; {missing[0]} is a directory: name its shards, e.g. '{os.path.join(missing[0], '*.tar')}'"
                    if tars else f"; {missing[0]} is a directory with no .tar shards")
        raise FileNotFoundError(f"{flag}: {len(missing)} of {len(shards)} shard(s) not found: {', '.join(missing[:3])}{more} "
                                f"(from {spec!r}){hint}")
    return shards


def _load_sizes(directory: str) -> dict[str, int] | None:
    path = os.path.join(directory, "sizes.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        sizes = json.load(f)
    if not isinstance(sizes, dict):
        raise ValueError(f"{path}: expected a JSON object {{shard file name: sample count}}")
    return {str(k): int(v) for k, v in sizes.items()}


def shard_sizes(shards: list[str]) -> list[int] | None:
    """Per-shard sample counts from the sizes.json beside each shard, or None if any shard is not listed."""
    cache: dict[str, dict[str, int] | None] = {}
    out = []
    for s in shards:
        d = os.path.dirname(s)
        if d not in cache:
            cache[d] = None if _is_url(s) else _load_sizes(d)
        sizes = cache[d]
        if sizes is None or os.path.basename(s) not in sizes:
            return None
        out.append(sizes[os.path.basename(s)])
    return out


def read_zeroshot_files(shard_spec: str) -> tuple[list[str], list[str]]:
    """Class names and prompt templates (classnames.txt, templates.txt; one per line) found beside the shards of
    ``shard_spec``: in the first shard's directory, else its parent. Templates contain "{}".

    Raises FileNotFoundError naming the places looked in when neither has both files.
    """
    first = expand_shards(shard_spec)[0]
    d = os.path.dirname(os.path.abspath(first))
    tried = []
    for cand in (d, os.path.dirname(d)):
        cn, tp = os.path.join(cand, "classnames.txt"), os.path.join(cand, "templates.txt")
        tried.append(cand)
        if os.path.isfile(cn) and os.path.isfile(tp):
            classnames = _read_lines(cn)
            templates = _read_lines(tp)
            if not classnames:
                raise ValueError(f"{cn}: no class names (expected one per line)")
            bad = [t for t in templates if "{}" not in t]
            if not templates or bad:
                raise ValueError(f"{tp}: expected one template per line, each containing '{{}}'; bad: {bad[:3]}")
            return classnames, templates
    raise FileNotFoundError(
        f"classnames.txt and templates.txt not found beside the shards of {shard_spec!r} (looked in {' and '.join(tried)}); "
        "write them (one class name / one template with '{}' per line) or pass the files explicitly"
    )


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


# ----------------------------------------------------------------------------------------------- reading samples


class _BadSampleLog:
    """Rate-limited warnings: the first few bad samples in full, then one summary line per ``interval`` seconds."""

    def __init__(self, first: int = 5, interval: float = 30.0):
        self.first, self.interval = first, interval
        self.count = 0
        self.last = 0.0
        self.suppressed = 0

    def __call__(self, reason: str, where: str, detail: str = "") -> None:
        self.count += 1
        now = time.monotonic()
        if self.count <= self.first:
            logger.warning("skipping bad sample (%s) %s%s", reason, where, f": {detail}" if detail else "")
            self.last = now
        elif now - self.last >= self.interval:
            logger.warning("skipping bad sample (%s) %s; %d bad samples skipped so far in this worker", reason, where, self.count)
            self.last = now


def _open_shard(url: str):
    if _is_url(url):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb")


def _split_name(name: str) -> tuple[str | None, str | None]:
    # img2dataset convention: key = everything before the first '.' of the base name
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return None, None
    return name[:dot], name[dot + 1 :].lower()


class TarDamaged(Exception):
    """A tar stream ended inside a member or holds a malformed header."""


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise TarDamaged(f"unexpected end of data (wanted {n} bytes, got {len(data)})")
    return data


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarDamaged(f"malformed header field {field!r}") from None


def iter_tar_entries(f, *, with_data: bool = True) -> Iterator[tuple[str, int, int, bytes | None]]:
    """(name, data offset, size, data) of the regular files of an uncompressed tar stream, in order.

    A small header parser (ustar, GNU long names, pax ``path``) instead of :mod:`tarfile`, whose per-member cost
    dominated loading small images. ``with_data=False`` (a seekable file) skips over the members' data and yields
    None for it: an index of a shard reads its headers only. Raises TarDamaged on a truncated stream or a bad
    header checksum.
    """
    long_name: str | None = None
    pos = 0
    while True:
        header = f.read(512)
        if len(header) == 0:
            return  # end of stream without the zero blocks: accepted, as tar does
        if len(header) != 512:
            raise TarDamaged("unexpected end of data in a header")
        if header == b"\0" * 512:
            return
        chksum = _octal(header[148:156])
        if chksum != sum(header[:148]) + 256 + sum(header[156:]):
            raise TarDamaged("bad header checksum")
        size = _octal(header[124:136])
        kind = header[156:157]
        offset = pos + 512
        padded = size + (-size) % 512
        regular = kind in (b"0", b"\0", b"7")
        data = None
        if with_data or not regular:
            data = _read_exact(f, size)
            if padded > size:
                _read_exact(f, padded - size)
        else:
            f.seek(padded, os.SEEK_CUR)
        pos = offset + padded
        if kind == b"L":  # GNU long name for the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if kind in (b"x", b"g"):  # pax header: 'len key=value\n' records
            if kind == b"x":
                for rec in data.decode("utf-8", "replace").split("\n"):
                    _, _, kv = rec.partition(" ")
                    if kv.startswith("path="):
                        long_name = kv[5:]
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                if prefix:
                    name = prefix + "/" + name
        if regular:
            yield name, offset, size, data


def iter_tar_members(f) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of an uncompressed tar stream, in order (see :func:`iter_tar_entries`)."""
    for name, _, _, data in iter_tar_entries(f):
        yield name, data


def group_samples(members: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {ext: payload}) of consecutive members sharing a key, as webdataset groups a tar: a new key, or an
    extension seen twice, starts the next sample. Members without an extension or named ``__*`` are ignored."""
    key: str | None = None
    parts: dict[str, Any] = {}
    for name, payload in members:
        k, ext = _split_name(name)
        if k is None or os.path.basename(k).startswith("__"):
            continue
        if key is not None and (k != key or ext in parts):
            yield key, parts
            key, parts = None, {}
        key = k
        parts[ext] = payload
    if key is not None:
        yield key, parts


class StreamStats(Counter):
    """One data stream's counts (a Counter: samples_read, samples_yielded, shards, a count per bad reason,
    samples_lost, captions_truncated, ...) plus, per shard, its bad samples (``by_shard``) and the first thing found
    wrong with it (``why``). ``ended`` says why the stream stopped before its quota (None: it did not)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_shard: Counter = Counter()
        self.why: dict[str, str] = {}
        self.ended: str | None = None
        self.pass_samples: int | None = None  # samples in this stream's first full pass over its shards
        self.lost_in: set[str] = set()  # shards whose lost samples are counted (once: a stream re-reads its shards)

    def bad_in(self, url: str, reason: str, n: int = 1, detail: str = "") -> None:
        """Count ``n`` bad samples of ``url`` (already counted by reason by the caller)."""
        self.by_shard[url] += n
        self.why.setdefault(url, f"{reason}: {detail}" if detail else reason)

    def snapshot(self) -> dict[str, Any]:
        """What travels with a batch: the counts, the worst SHARDS_REPORTED shards (url, bad, why), ``ended``."""
        worst = [(u, int(n), self.why.get(u, "")) for u, n in self.by_shard.most_common(SHARDS_REPORTED)]
        return {"counts": {k: int(v) for k, v in self.items()}, "shards": worst, "ended": self.ended}


def bad_samples_of(counts: dict[str, int]) -> tuple[int, int]:
    """(bad, seen) samples of a stream's counts: bad samples of every reason plus the samples lost in damaged shards,
    out of the samples checked (read and judged good or bad; a shuffle buffer holds some read, not yet judged) plus
    those lost."""
    lost = int(counts.get("samples_lost", 0))
    bad = sum(int(counts.get(r, 0)) for r in BAD_REASONS if r != "bad_shard") + lost
    return bad, int(counts.get("samples_checked", counts.get("samples_read", 0))) + lost


def too_bad(bad: int, seen: int, max_fraction: float | None, min_samples: int) -> bool:
    """More than ``max_fraction`` of ``seen`` samples bad, once at least ``min_samples`` (>= 1) were seen."""
    return max_fraction is not None and seen >= max(1, min_samples) and bad > max_fraction * seen


def _describe_exc(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing: deleted or moved after the run started"
    if isinstance(exc, TarDamaged):
        return f"damaged tar: {exc}"
    if isinstance(exc, OSError):
        return f"unreadable: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def _header_problem(head: bytes) -> str | None:
    """What is wrong with a file whose first bytes are ``head`` (up to 512), as a tar shard; None: nothing seen."""
    if not head:
        return "an empty file, 0 bytes"
    if head[:2] == b"\x1f\x8b":
        return "gzip-compressed, shards must be uncompressed .tar"
    if len(head) < 512:
        return f"not a tar file, {len(head)} bytes, shorter than one tar header"
    if head == b"\0" * 512:
        return "an empty tar, no members"
    try:
        chksum = _octal(head[148:156])
    except TarDamaged:
        chksum = -1
    if chksum != sum(head[:148]) + 256 + sum(head[156:]):
        return "not a tar file: its first header's checksum is wrong"
    return None


_HEADERS_CHECKED: dict[tuple[str, ...], dict[str, str]] = {}
_DAMAGED_WARNED: set[tuple[str, ...]] = set()


HEADER_CHECK_LIMIT = 1024  # shards read before a run; a longer list is sampled (the stream counts the rest)


def shards_to_check(shards: list[str], limit: int | None = None) -> list[str]:
    """The local shards whose first bytes are read before a run: all of them up to ``limit`` (default
    HEADER_CHECK_LIMIT), else ``limit`` evenly spaced ones (the first and the last included), so that every
    rank of a large run does not open every shard of the list at start-up."""
    limit = HEADER_CHECK_LIMIT if limit is None else limit
    local = [s for s in shards if not _is_url(s)]
    if len(local) <= limit:
        return local
    return [local[round(i * (len(local) - 1) / (limit - 1))] for i in range(limit)]


def check_shard_headers(shards: list[str]) -> dict[str, str]:
    """{shard: what is wrong} for the shards of :func:`shards_to_check` that cannot be opened or do not start with
    a tar header (URLs are not opened). Reads 512 bytes per shard; the answer for a shard list is kept for the process."""
    key = tuple(shards)
    if key not in _HEADERS_CHECKED:
        bad: dict[str, str] = {}
        for s in shards_to_check(shards):
            try:
                with open(s, "rb") as f:
                    head = f.read(512)
            except OSError as exc:
                bad[s] = _describe_exc(exc)
                continue
            why = _header_problem(head)
            if why:
                bad[s] = why
        _HEADERS_CHECKED[key] = bad
    return _HEADERS_CHECKED[key]


def name_shards(items: list[tuple[str, str]], total: int | None = None, first: int = 3) -> str:
    """'a.tar (why), b.tar (why), c.tar (why) and 4 more' for (shard, why) pairs (``total``: their full count)."""
    total = len(items) if total is None else total
    text = ", ".join(f"{u} ({why})" if why else u for u, why in items[:first])
    return text + (f" and {total - min(first, len(items))} more" if total > min(first, len(items)) else "")


def iter_raw_samples(url: str, stats: Counter, warn: Callable[[str, str, str], None], *,
                     expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one tar as dicts {"__key__", "__url__", ext: bytes}, grouped by key as webdataset does.

    A shard that cannot be opened, or that ends inside a member (truncated) or at a bad header, counts one
    "bad_shard"; the samples read before the damage are kept. The samples it did not give count as "samples_lost":
    ``expected`` (sizes.json) less those read, else this stream's mean per intact shard (at least 1).
    """
    read_here = 0
    try:
        with _open_shard(url) as f:
            stats["shards"] += 1
            # a sample is complete when the next one starts: the half-read one at a point of damage is dropped
            for key, parts in group_samples(iter_tar_members(f)):
                stats["samples_read"] += 1
                read_here += 1
                yield {"__key__": key, "__url__": url, **parts}
        stats["shards_intact"] += 1
        stats["samples_in_intact_shards"] += read_here
    except Exception as exc:  # noqa: BLE001 - any damage ends this shard, never the run
        if expected is None:
            expected = round(stats["samples_in_intact_shards"] / stats["shards_intact"]) if stats["shards_intact"] else 1
        lost = max(1, expected - read_here)
        stats["bad_shard"] += 1
        detail = _describe_exc(exc)
        if isinstance(stats, StreamStats):
            if url not in stats.lost_in:  # a training stream wraps around its shards: count a shard's loss once
                stats.lost_in.add(url)
                stats["samples_lost"] += lost
                stats.bad_in(url, "bad_shard", lost, detail)
        else:
            stats["samples_lost"] += lost
        warn("bad_shard", url, detail)


def _decode_caption(raw: bytes, stats: Counter | None = None) -> tuple[str | None, str | None]:
    """(bad reason or None, caption): not UTF-8 -> "bad_caption", empty -> "missing_caption"; captions longer than
    MAX_CAPTION_CHARS are cut to it (counted as "captions_truncated" in ``stats``)."""
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_caption", None
    if not caption:
        return "missing_caption", None
    if len(caption) > MAX_CAPTION_CHARS:
        caption = caption[:MAX_CAPTION_CHARS].rstrip()
        if stats is not None:
            stats["captions_truncated"] += 1
    return None, caption


def _parse(sample: dict[str, Any], stats: Counter | None = None) -> tuple[str | None, tuple[str, bytes] | None, str | None, int]:
    """(bad reason or None, image bytes, caption, label) without decoding the image."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return "missing_image", None, None, -1
    img = (ext, sample[ext])
    raw = next((sample[e] for e in CAPTION_EXTS if e in sample), None)
    if raw is None:
        return "missing_caption", None, None, -1
    reason, caption = _decode_caption(raw, stats)
    if reason is not None:
        return reason, None, None, -1
    label = -1
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
    return None, img, caption, label


_PIL_NOISE = re.compile(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_FORMAT_OF_EXT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _open_image(img: tuple[str, bytes]) -> Image.Image:
    ext, data = img
    try:
        # the extension's format first: PIL's probing of every plugin costs more than decoding a small JPEG
        return Image.open(io.BytesIO(data), formats=[_FORMAT_OF_EXT[ext]])
    except Exception:  # noqa: BLE001 - a misnamed file: let PIL probe
        return Image.open(io.BytesIO(data))


def _decode_image(img: tuple[str, bytes]) -> Image.Image:
    return _open_image(img).convert("RGB")


def _check_image_cheaply(img: tuple[str, bytes]) -> None:
    """Raise where :func:`_decode_image` would, at a fraction of the cost: JPEGs decode at 1/8 scale (the entropy
    decoder still reads every byte, so truncation is found); other formats decode fully."""
    im = _open_image(img)
    if im.format == "JPEG":
        im.draft("RGB", (1, 1))
    im.load()


def preprocess_seeded(preprocess: Callable, image: Image.Image, seed: int, in_worker: bool) -> torch.Tensor:
    """``preprocess(image)`` with torch's and Python's global RNGs seeded by ``seed`` (random augmentations
    draw from them): the result depends on the sample, not on the worker or on resuming. In the main process
    the caller's RNG states are restored afterwards."""
    if in_worker:
        _seed_global_rngs(seed)
        return preprocess(image)
    t_state, p_state = torch.get_rng_state(), random.getstate()
    try:
        _seed_global_rngs(seed)
        return preprocess(image)
    finally:
        torch.set_rng_state(t_state)
        random.setstate(p_state)


def _seed_global_rngs(seed: int) -> None:
    # What torch.manual_seed(seed) seeds that a transform can draw from, at a fraction of its cost (it also
    # queues a lazy seed, with a formatted stack trace, for every accelerator type not started yet): the CPU
    # generator, and the CUDA ones when CUDA is up in this process (as torch.manual_seed would).
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------------------------- the stream


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class WebDatasetStream(IterableDataset):
    """The per-rank stream of ready batches; one instance per (epoch, rank). See the module docstring."""

    def __init__(self, shards: list[str], sizes: list[int] | None, cfg: DataConfig, *, preprocess: Callable, tokenize: Callable,
                 is_train: bool, epoch: int, rank: int, world_size: int, workers: int, start_batch: int,
                 num_batches: int | None):
        super().__init__()
        self.shards, self.sizes, self.cfg = shards, sizes, cfg
        self.preprocess, self.tokenize = preprocess, tokenize
        self.is_train, self.epoch, self.rank, self.world_size = is_train, epoch, rank, world_size
        self.workers = workers  # W >= 1 logical workers (1 when loading in the main process)
        self.start_batch = start_batch
        self.num_batches = num_batches  # train: batches per rank per epoch

    # shard lists ------------------------------------------------------------------------------------------
    def rank_shards(self) -> list[int]:
        idx = list(range(len(self.shards)))
        if self.is_train:
            # same permutation on every rank: seeded by (seed, epoch) only
            random.Random(_seed_of(self.cfg.seed, self.epoch)).shuffle(idx)
        return idx[self.rank :: self.world_size]

    def worker_shards(self, logical: int) -> list[int]:
        return self.rank_shards()[logical :: self.workers]

    def worker_quota(self, logical: int) -> int | None:
        """Batches logical worker ``logical`` yields in the whole epoch (None: until its shards end)."""
        if not self.is_train:
            return None
        return max(0, math.ceil((self.num_batches - logical) / self.workers))

    def _shard_sequence(self, logical: int) -> Iterator[int]:
        cfg = self.cfg
        if self.is_train and cfg.resampled:
            rng = random.Random(_seed_of(cfg.seed, self.epoch, self.rank, self.world_size, self.workers, logical, 1))
            while True:
                yield rng.randrange(len(self.shards))
        mine = self.worker_shards(logical)
        if not self.is_train:
            yield from mine
            return
        yield from mine
        # more passes (reshuffled) only when this worker's shards hold fewer samples than its quota
        for p in range(1, 1 << 30):
            order = list(mine)
            random.Random(_seed_of(cfg.seed, self.epoch, self.rank, self.world_size, self.workers, logical, 2, p)).shuffle(order)
            yield from order

    def _raw_stream(self, logical: int, stats: StreamStats, warn, min_bad: int) -> Iterator[dict[str, Any]]:
        read_in_pass, shards_in_pass = 0, 0
        n_mine = len(self.worker_shards(logical)) if not (self.is_train and self.cfg.resampled) else len(self.shards)
        for s in self._shard_sequence(logical):
            expected = self.sizes[s] if self.sizes is not None else None
            for sample in iter_raw_samples(self.shards[s], stats, warn, expected=expected):
                read_in_pass += 1
                yield sample
            if self._stop_for_bad(stats, min_bad):
                return
            shards_in_pass += 1
            if shards_in_pass >= max(n_mine, 1):
                if read_in_pass == 0:
                    if self.is_train:
                        logger.warning("worker %d of rank %d: a full pass over its %d shard(s) gave no samples; stopping",
                                       logical, self.rank, n_mine)
                        stats.ended = f"a full pass over a data worker's {n_mine} shard(s) gave no samples"
                    return
                if stats.pass_samples is None:
                    stats.pass_samples = read_in_pass
                read_in_pass, shards_in_pass = 0, 0

    def _stop_for_bad(self, stats: StreamStats, min_samples: int) -> bool:
        """Whether this stream's bad share passed ``max_bad_fraction`` (then ``stats.ended`` says so)."""
        bad, seen = bad_samples_of(stats)
        if too_bad(bad, seen, self.cfg.max_bad_fraction, min_samples):
            stats.ended = f"more than --max-bad-fraction {self.cfg.max_bad_fraction:g} of a data worker's samples are bad"
            return True
        return False

    def _shuffled(self, stream: Iterator[dict[str, Any]], logical: int) -> Iterator[dict[str, Any]]:
        size = self.cfg.shuffle_buffer
        if not self.is_train or size <= 1:
            yield from stream
            return
        rng = random.Random(_seed_of(self.cfg.seed, self.epoch, self.rank, self.world_size, self.workers, logical, 3))
        buf: list[dict[str, Any]] = []
        for sample in stream:
            if len(buf) < size:
                buf.append(sample)
                continue
            i = rng.randrange(size)
            out, buf[i] = buf[i], sample
            yield out
        rng.shuffle(buf)
        yield from buf

    # iteration --------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        stats = StreamStats()
        logical = yield from self._batches(stats)
        # a last stats-only item (dropped by Loader): counts made after the worker's last batch arrive too. It is
        # the worker's last item, so the round-robin order of the real batches is unchanged.
        yield {"__stats__": (logical, stats.snapshot())}

    def _batches(self, stats: StreamStats):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        W = self.workers
        logical = (physical + self.start_batch) % W
        skip = max(0, math.ceil((self.start_batch - logical) / W))
        quota = self.worker_quota(logical)
        warn = _BadSampleLog()
        B = self.cfg.batch_size
        min_bad = min(BAD_CHECK_MIN_SAMPLES, quota * B) if quota else BAD_CHECK_MIN_SAMPLES
        streak = 0  # bad samples since the last usable one

        def bad(reason: str, sample: dict[str, Any], detail: str = "") -> bool:
            """Count a bad sample; True when the stream must stop (too many bad ones, or no usable one in sight)."""
            nonlocal streak
            stats[reason] += 1
            stats.bad_in(sample["__url__"], reason, 1, detail)
            warn(reason, f"{sample['__url__']}:{sample['__key__']}", detail)
            streak += 1
            if self._stop_for_bad(stats, min_bad):
                return True
            # liveness: a training stream cycles over its shards forever; with no usable sample in two passes (plus
            # the shuffle buffer) it never will fill a batch
            if self.is_train and stats.pass_samples and streak > 2 * (stats.pass_samples + max(self.cfg.shuffle_buffer, 1)):
                stats.ended = f"a data worker read {streak} bad samples in a row, two passes over its shards, and no usable one"
                return True
            return False

        produced = 0
        images: list[Any] = []
        captions: list[str] = []
        labels: list[int] = []
        keys: list[str] = []
        decoding = skip == 0
        if quota is not None and produced >= quota:
            return logical
        # random augmentations in preprocess (open_clip's RandomResizedCrop) draw from torch's and Python's global RNGs:
        # reseeding them per sample from its place in this logical worker's stream makes them independent of the
        # physical worker and of resuming. In the main process the caller's RNG state is restored after each sample.
        aug_base = _seed_of(self.cfg.seed, self.epoch, self.rank, self.world_size, W, logical, 4)
        in_worker = info is not None
        n_valid = 0
        for sample in self._shuffled(self._raw_stream(logical, stats, warn, min_bad), logical):
            if stats.ended:
                return logical
            stats["samples_checked"] += 1
            reason, img, caption, label = _parse(sample, stats)
            if reason is not None:
                if bad(reason, sample):
                    return logical
                continue
            n_valid += 1
            try:
                if decoding:
                    images.append(preprocess_seeded(self.preprocess, _decode_image(img), (aug_base + n_valid) % (1 << 62), in_worker))
                else:
                    _check_image_cheaply(img)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
                if bad("bad_image", sample, _PIL_NOISE.sub("", f"{type(exc).__name__}: {exc}")):
                    return logical
                continue
            streak = 0
            captions.append(caption)
            labels.append(label)
            keys.append(sample["__key__"])
            if len(captions) == B:
                if decoding:
                    stats["samples_yielded"] += B
                    yield self._collate(images, captions, labels, keys, logical, stats)
                else:
                    stats["samples_skipped_for_resume"] += B
                produced += 1
                images, captions, labels, keys = [], [], [], []
                decoding = produced >= skip
                if quota is not None and produced >= quota:
                    return logical
        if quota is not None and stats.ended is None:
            stats.ended = "a data worker's stream ended"
        if captions and decoding and not self.cfg.drop_last and not self.is_train and not stats.ended:
            stats["samples_yielded"] += len(captions)
            yield self._collate(images, captions, labels, keys, logical, stats)
        return logical

    def _collate(self, images, captions, labels, keys, logical: int, stats: StreamStats) -> dict[str, Any]:
        text = self.tokenize(captions)
        if not isinstance(text, torch.Tensor):
            text = torch.as_tensor(text)
        return {
            "image": torch.stack(images),
            "text": text.long(),
            "label": torch.tensor(labels, dtype=torch.long),
            "caption": list(captions),
            "key": list(keys),
            "__stats__": (logical, stats.snapshot()),
        }


# ----------------------------------------------------------------------------------------------- the loader


class Loader:
    """Iterable over dict batches {"image" (B,3,H,W) float, "text" (B,L) long, "label" (B,) long (-1: no cls),
    "caption" list[str], "key" list[str]}.

    num_samples: samples per epoch (global; train: whole batches). data_samples: the samples the epoch was asked
    for (sizes.json or --train-num-samples) before rounding up to whole batches. num_batches: batches per rank per
    epoch (train: exact; eval: from sizes.json when every shard is listed there, else an estimate). stats(): counts
    summed over workers.
    """

    def __init__(self, stream: WebDatasetStream, dataloader: DataLoader, num_samples: int, num_batches: int,
                 data_samples: int | None = None):
        self.stream = stream
        self.dataloader = dataloader
        self.num_samples = num_samples
        self.data_samples = num_samples if data_samples is None else data_samples
        self.num_batches = num_batches
        self.start_batch = stream.start_batch
        self._stats: dict[int, dict[str, int]] = {}

    def __len__(self) -> int:
        """Batches this loader yields: the epoch's ``num_batches`` less ``start_batch`` (train)."""
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        flag, yielded = self.stream.cfg.flag, 0
        for batch in self.dataloader:
            logical, snap = batch.pop("__stats__")
            self._stats[logical] = snap
            if snap["ended"]:
                # a worker gave up before its quota (training) or passed max_bad_fraction: say why, with the shards
                raise BadDataError(f"{flag}: stopped after {yielded} of {len(self)} batches on this process: "
                                   f"{snap['ended']}; {describe_bad(self.stats())}")
            if batch:
                yielded += 1
                yield batch
        st = self.stats()
        if self.stream.is_train and yielded < len(self):
            raise BadDataError(f"{flag}: the data ran out after {yielded} of {len(self)} batches on this process; "
                               f"{describe_bad(st)}")
        if not self.stream.is_train and yielded == 0 and (st["bad_total"] or st["samples_read"] == 0):
            raise BadDataError(f"{flag}: no usable sample in {len(self.stream.rank_shards())} shard(s); {describe_bad(st)}")
        if st["bad_total"]:
            logger.warning("%s: skipped %s", flag, describe_bad(st))

    def stats(self) -> dict[str, Any]:
        """{"samples_read", "samples_yielded", "shards", "bad": {reason: count}, "bad_total", "bad_samples",
        "samples_seen", "samples_lost", "captions_truncated", "worst_shards": [(shard, bad samples, why)], ...} summed
        over the workers, as reported so far (complete once the loader is exhausted). ``bad_samples`` / ``samples_seen``
        is the share --max-bad-fraction judges: bad samples plus those lost in damaged shards, out of read plus lost."""
        total: Counter = Counter()
        shards: Counter = Counter()
        why: dict[str, str] = {}
        for snap in self._stats.values():
            total.update(snap["counts"])
            for url, n, w in snap["shards"]:
                shards[url] += n
                why.setdefault(url, w)
        bad = {r: int(total.get(r, 0)) for r in BAD_REASONS}
        bad_samples, seen = bad_samples_of(total)
        return {
            "samples_read": int(total.get("samples_read", 0)),
            "samples_yielded": int(total.get("samples_yielded", 0)),
            "samples_skipped_for_resume": int(total.get("samples_skipped_for_resume", 0)),
            "shards": int(total.get("shards", 0)),
            "bad": bad,
            "bad_total": sum(bad.values()),
            "bad_samples": bad_samples,
            "samples_seen": seen,
            "samples_lost": int(total.get("samples_lost", 0)),
            "captions_truncated": int(total.get("captions_truncated", 0)),
            "worst_shards": [(u, int(n), why[u]) for u, n in shards.most_common(SHARDS_REPORTED)],
            "workers_reporting": len(self._stats),
        }


def describe_bad(stats: dict[str, Any], worst: int = 3) -> str:
    """One line for :meth:`Loader.stats`-like counts: bad samples of the samples seen, by reason, damaged shards
    and the worst shards with what was wrong with them."""
    reasons = ", ".join(f"{r} {n}" for r, n in stats["bad"].items() if n and r != "bad_shard")
    parts = [f"{stats['bad_samples']} of {stats['samples_seen']} samples bad" + (f" ({reasons})" if reasons else "")]
    if stats["bad"].get("bad_shard"):
        parts.append(f"{stats['bad']['bad_shard']} damaged shard read(s), about {stats['samples_lost']} samples lost")
    if stats["worst_shards"]:
        parts.append("worst shards: " + name_shards([(u, f"{n} bad, {w}" if w else f"{n} bad")
                                                      for u, n, w in stats["worst_shards"]], first=worst))
    return "; ".join(parts)


class BadDataMonitor:
    """--max-bad-fraction over every data worker of every process: :meth:`check` after each step raises
    BadDataError (the same step, the same message, on every rank) once more than ``max_fraction`` of the samples
    seen so far is bad and at least ``min_samples`` were seen.

    ``reduce`` sums a list of ints over processes (identity for one); ``gather`` returns every process's object.
    Both are collective: every process must call :meth:`check` at the same steps.
    """

    def __init__(self, max_fraction: float | None, min_samples: int, flag: str = "train-data", *,
                 reduce: Callable[[list[int]], list[int]] | None = None,
                 gather: Callable[[Any], list[Any]] | None = None) -> None:
        self.max_fraction, self.min_samples, self.flag = max_fraction, min_samples, flag
        self.reduce = reduce or (lambda xs: xs)
        self.gather = gather or (lambda x: [x])

    def check(self, stats: dict[str, Any] | None) -> None:
        """``stats``: this process's :meth:`Loader.stats` (``bad_samples``, ``samples_seen``, ``worst_shards``)."""
        if self.max_fraction is None:
            return
        bad, seen = (stats.get("bad_samples", 0), stats.get("samples_seen", 0)) if stats else (0, 0)
        g_bad, g_seen = self.reduce([int(bad), int(seen)])
        if not too_bad(g_bad, g_seen, self.max_fraction, self.min_samples):
            return
        worst: list[tuple[str, int, str]] = []
        for part in self.gather((stats or {}).get("worst_shards", [])):
            worst.extend(part)
        worst.sort(key=lambda x: -x[1])
        shards = name_shards([(u, f"{n} bad, {w}" if w else f"{n} bad") for u, n, w in worst], first=3)
        raise BadDataError(f"{self.flag}: {g_bad} of the {g_seen} samples read so far are bad ({g_bad / g_seen:.1%}), "
                           f"more than --max-bad-fraction {self.max_fraction:g} allows" + (f"; worst shards: {shards}" if shards else ""))


def _check_shards_before_reading(shards: list[str], sizes: list[int] | None, cfg: DataConfig) -> dict[str, str]:
    """BadDataError when every shard is damaged, or (with max_bad_fraction) when the damaged ones hold more than that
    share of the samples; else one warning naming them. Returns {damaged shard: why} (training streams leave them
    out; evaluation reads and counts each once)."""
    damaged = check_shard_headers(shards)
    if not damaged:
        return damaged
    items = [(s, damaged[s]) for s in shards if s in damaged]
    n, total, checked = len(items), len(shards), len(shards_to_check(shards))
    sampled = f", {checked} of {total} checked" if checked < total else ""
    if n == total or (n == checked and checked < total):
        raise BadDataError(f"{cfg.flag}: every shard{' checked' if sampled else ''} is damaged "
                           f"({n} of {total if not sampled else checked}{sampled}): {name_shards(items)}")
    if sizes is not None and sum(sizes) and not sampled:
        share = sum(z for s, z in zip(shards, sizes) if s in damaged) / sum(sizes)
    else:
        share = n / checked
    of = f"{n} of {checked} shard(s) checked" if sampled else f"{n} of {total} shard(s)"
    if cfg.max_bad_fraction is not None and share > cfg.max_bad_fraction:
        raise BadDataError(f"{cfg.flag}: {of} are damaged ({share:.1%} of the {'shards checked' if sampled else 'samples'}), "
                           f"more than --max-bad-fraction {cfg.max_bad_fraction:g} allows: {name_shards(items)}")
    if tuple(shards) not in _DAMAGED_WARNED:  # once per process for a shard list, not every epoch
        _DAMAGED_WARNED.add(tuple(shards))
        logger.warning("%s: %s are damaged and are skipped: %s", cfg.flag, of, name_shards(items))
    return damaged


def build_loader(cfg: DataConfig, *, preprocess: Callable[[Image.Image], torch.Tensor], tokenize: Callable[[list[str]], torch.Tensor],
                 is_train: bool, epoch: int = 0, rank: int = 0, world_size: int = 1, start_batch: int = 0) -> Loader:
    """A loader over ``cfg.shards`` for one epoch of one rank (see the module docstring for the order guarantees).

    preprocess: PIL RGB image -> (3, H, W) float tensor. tokenize: list of B captions -> (B, L) long tensor.
    start_batch: skip the first ``start_batch`` batches of the epoch cheaply (mid-epoch resume; train loaders).
    """
    if not isinstance(cfg, DataConfig):
        raise ValueError(f"cfg: expected a DataConfig, got {type(cfg).__name__}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {cfg.batch_size!r}")
    if not isinstance(cfg.workers, int) or cfg.workers < 0:
        raise ValueError(f"workers: expected an int >= 0, got {cfg.workers!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
    if not isinstance(start_batch, int) or start_batch < 0:
        raise ValueError(f"start_batch: expected an int >= 0, got {start_batch!r}")
    if cfg.num_samples is not None and (not isinstance(cfg.num_samples, int) or cfg.num_samples < 1):
        raise ValueError(f"num_samples: expected a positive int or None, got {cfg.num_samples!r}")

    if cfg.max_bad_fraction is not None and not 0 <= cfg.max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction: expected a fraction in [0, 1] or None, got {cfg.max_bad_fraction!r}")
    shards = expand_shards(cfg.shards, cfg.flag)
    sizes = shard_sizes(shards)
    damaged = _check_shards_before_reading(shards, sizes, cfg)
    if is_train and damaged:  # skipped: a training stream would re-read them every pass (the epoch length stays)
        keep = [i for i, s in enumerate(shards) if s not in damaged]
        all_sizes, shards = sizes, [shards[i] for i in keep]
        sizes = [sizes[i] for i in keep] if sizes is not None else None
    else:
        all_sizes = sizes
    if cfg.num_samples is not None:
        num_samples = cfg.num_samples
    elif all_sizes is not None:
        num_samples = sum(all_sizes)
    else:
        raise ValueError(
            f"num_samples: not given and no sizes.json beside the shards of {cfg.shards!r} lists every shard; "
            "pass --train-num-samples (DataConfig.num_samples) or write sizes.json ({\"<shard file name>\": count, ...})"
        )

    W = max(cfg.workers, 1)
    if is_train:
        if not cfg.resampled and len(shards) < W * world_size:
            raise ValueError(
                f"shards: {len(shards)} shard(s) for {world_size} rank(s) x {W} worker(s): without --dataset-resampled every "
                f"worker of every rank needs at least one shard ({W * world_size}). Use fewer --workers, split the data "
                "into more shards, or pass --dataset-resampled"
            )
        num_batches = math.ceil(num_samples / (cfg.batch_size * world_size))
        loader_samples = num_batches * cfg.batch_size * world_size
    else:
        n_rank = len(shards[rank::world_size])
        W = max(1, min(W, n_rank))  # eval: never more workers than shards
        num_batches = 0
    stream = WebDatasetStream(shards, sizes, cfg, preprocess=preprocess, tokenize=tokenize, is_train=is_train, epoch=epoch,
                              rank=rank, world_size=world_size, workers=W, start_batch=start_batch, num_batches=num_batches)
    if not is_train:
        rank_idx = stream.rank_shards()
        if sizes is not None and cfg.num_samples is None:
            per_worker = [sum(sizes[i] for i in rank_idx[w::W]) for w in range(W)]
            rnd = math.floor if cfg.drop_last else math.ceil
            num_batches = sum(rnd(n / cfg.batch_size) for n in per_worker)
            loader_samples = sum(sizes)
        else:
            rnd = math.floor if cfg.drop_last else math.ceil
            num_batches = rnd(num_samples / (cfg.batch_size * world_size))
            loader_samples = num_samples
        stream.num_batches = num_batches
    # a private generator: creating an iterator would otherwise draw from the caller's global torch RNG (the
    # workers' base seed), so starting an epoch in a resumed run would shift the trainer's random stream
    gen = torch.Generator().manual_seed(_seed_of(cfg.seed, epoch, rank, 5))
    dataloader = DataLoader(stream, batch_size=None, shuffle=False, num_workers=0 if cfg.workers == 0 else W,
                            persistent_workers=False, pin_memory=torch.cuda.is_available(), generator=gen)
    return Loader(stream, dataloader, loader_samples, num_batches, data_samples=num_samples)
