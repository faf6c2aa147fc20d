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

Bad samples (no image, no caption, an image PIL cannot decode, a truncated tar) are skipped, counted by reason and
reported with a rate-limited warning; :meth:`Loader.stats` sums the counts over workers.
"""

from __future__ import annotations

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


@dataclass
class DataConfig:
    """Where the shards are and how to batch them (see the data contract).

    shards: brace-expanded spec(s) joined by '::', e.g. "d/train/{00000..00009}.tar".
    batch_size: per rank. workers: DataLoader workers per rank (0: load in the main process).
    num_samples: samples per epoch (global); None: the sum from sizes.json beside the shards.
    resampled: draw shards with replacement (train). seed: shard order and shuffle seed.
    shuffle_buffer: samples per worker (train only). drop_last: eval only; training batches are always full.
    """

    shards: str
    batch_size: int
    workers: int = 2
    num_samples: int | None = None
    resampled: bool = False
    seed: int = 0
    shuffle_buffer: int = 1000
    drop_last: bool = True


# ----------------------------------------------------------------------------------------------- shard specs


def _is_url(path: str) -> bool:
    return bool(_URL_RE.match(path)) and not os.path.exists(path)


def expand_shards(spec: str) -> list[str]:
    """Expand '::'-joined brace specs ("a/{000..009}.tar::b/x.tar") into a list of shard paths.

    Local paths are checked to exist (FileNotFoundError naming the missing ones); URLs (pipe:, http://, ...) are not.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"shards: expected a non-empty shard spec such as 'dir/{{00000..00009}}.tar', got {spec!r}")
    shards: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise ValueError(f"shards: empty part in shard spec {spec!r} (parts are joined by '::')")
        shards.extend(braceexpand.braceexpand(os.path.expanduser(part)))
    missing = [s for s in shards if not _is_url(s) and not os.path.isfile(s)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(f"shards: {len(missing)} of {len(shards)} shard(s) not found: {', '.join(missing[:3])}{more} (from {spec!r})")
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
    with open(path, encoding="utf-8") as f:
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


def iter_raw_samples(url: str, stats: Counter, warn: Callable[[str, str, str], None]) -> Iterator[dict[str, Any]]:
    """Samples of one tar as dicts {"__key__", "__url__", ext: bytes}, grouped by key as webdataset does.

    A shard that cannot be opened, or that ends inside a member (truncated), counts one "bad_shard"; the samples
    read before the damage are kept.
    """
    try:
        with _open_shard(url) as f:
            stats["shards"] += 1
            # a sample is complete when the next one starts: the half-read one at a point of damage is dropped
            for key, parts in group_samples(iter_tar_members(f)):
                stats["samples_read"] += 1
                yield {"__key__": key, "__url__": url, **parts}
    except Exception as exc:  # noqa: BLE001 - any damage ends this shard, never the run
        stats["bad_shard"] += 1
        warn("bad_shard", url, f"{type(exc).__name__}: {exc}")


def _parse(sample: dict[str, Any]) -> tuple[str | None, tuple[str, bytes] | None, str | None, int]:
    """(bad reason or None, image bytes, caption, label) without decoding the image."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return "missing_image", None, None, -1
    img = (ext, sample[ext])
    raw = next((sample[e] for e in CAPTION_EXTS if e in sample), None)
    if raw is None:
        return "missing_caption", None, None, -1
    try:
        caption = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_caption", None, None, -1
    if not caption:
        return "missing_caption", None, None, -1
    label = -1
    if "cls" in sample:
        try:
            label = int(sample["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
    return None, img, caption, label


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
        torch.manual_seed(seed)
        random.seed(seed)
        return preprocess(image)
    t_state, p_state = torch.get_rng_state(), random.getstate()
    try:
        torch.manual_seed(seed)
        random.seed(seed)
        return preprocess(image)
    finally:
        torch.set_rng_state(t_state)
        random.setstate(p_state)


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

    def _raw_stream(self, logical: int, stats: Counter, warn) -> Iterator[dict[str, Any]]:
        read_in_pass, shards_in_pass = 0, 0
        n_mine = len(self.worker_shards(logical)) if not (self.is_train and self.cfg.resampled) else len(self.shards)
        for s in self._shard_sequence(logical):
            for sample in iter_raw_samples(self.shards[s], stats, warn):
                read_in_pass += 1
                yield sample
            shards_in_pass += 1
            if shards_in_pass >= max(n_mine, 1):
                if read_in_pass == 0:
                    logger.warning("worker %d of rank %d: a full pass over its %d shard(s) gave no samples; stopping", logical, self.rank, n_mine)
                    return
                read_in_pass, shards_in_pass = 0, 0

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
        stats: Counter = Counter()
        logical = yield from self._batches(stats)
        # a last stats-only item (dropped by Loader): counts made after the worker's last batch arrive too. It is
        # the worker's last item, so the round-robin order of the real batches is unchanged.
        yield {"__stats__": (logical, dict(stats))}

    def _batches(self, stats: Counter):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        W = self.workers
        logical = (physical + self.start_batch) % W
        skip = max(0, math.ceil((self.start_batch - logical) / W))
        quota = self.worker_quota(logical)
        warn = _BadSampleLog()

        def bad(reason: str, sample: dict[str, Any], detail: str = "") -> None:
            stats[reason] += 1
            warn(reason, f"{sample['__url__']}:{sample['__key__']}", detail)

        B = self.cfg.batch_size
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
        for sample in self._shuffled(self._raw_stream(logical, stats, warn), logical):
            reason, img, caption, label = _parse(sample)
            if reason is not None:
                bad(reason, sample)
                continue
            n_valid += 1
            try:
                if decoding:
                    images.append(preprocess_seeded(self.preprocess, _decode_image(img), (aug_base + n_valid) % (1 << 62), in_worker))
                else:
                    _check_image_cheaply(img)
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
                bad("bad_image", sample, f"{type(exc).__name__}: {exc}")
                continue
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
        if captions and decoding and not self.cfg.drop_last and not self.is_train:
            stats["samples_yielded"] += len(captions)
            yield self._collate(images, captions, labels, keys, logical, stats)
        return logical

    def _collate(self, images, captions, labels, keys, logical: int, stats: Counter) -> dict[str, Any]:
        text = self.tokenize(captions)
        if not isinstance(text, torch.Tensor):
            text = torch.as_tensor(text)
        return {
            "image": torch.stack(images),
            "text": text.long(),
            "label": torch.tensor(labels, dtype=torch.long),
            "caption": list(captions),
            "key": list(keys),
            "__stats__": (logical, dict(stats)),
        }


# ----------------------------------------------------------------------------------------------- the loader


class Loader:
    """Iterable over dict batches {"image" (B,3,H,W) float, "text" (B,L) long, "label" (B,) long (-1: no cls),
    "caption" list[str], "key" list[str]}.

    num_samples: samples per epoch (global). num_batches: batches per rank per epoch (train: exact; eval: from
    sizes.json when every shard is listed there, else an estimate). stats(): counts summed over workers.
    """

    def __init__(self, stream: WebDatasetStream, dataloader: DataLoader, num_samples: int, num_batches: int):
        self.stream = stream
        self.dataloader = dataloader
        self.num_samples = num_samples
        self.num_batches = num_batches
        self.start_batch = stream.start_batch
        self._stats: dict[int, dict[str, int]] = {}

    def __len__(self) -> int:
        """Batches this loader yields: the epoch's ``num_batches`` less ``start_batch`` (train)."""
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataloader:
            logical, counts = batch.pop("__stats__")
            self._stats[logical] = counts
            if batch:
                yield batch

    def stats(self) -> dict[str, Any]:
        """{"samples_read", "samples_yielded", "shards", "bad": {reason: count}, "bad_total", ...} summed over the
        workers, as reported so far (complete once the loader is exhausted)."""
        total: Counter = Counter()
        for counts in self._stats.values():
            total.update(counts)
        bad = {r: int(total.get(r, 0)) for r in BAD_REASONS}
        return {
            "samples_read": int(total.get("samples_read", 0)),
            "samples_yielded": int(total.get("samples_yielded", 0)),
            "samples_skipped_for_resume": int(total.get("samples_skipped_for_resume", 0)),
            "shards": int(total.get("shards", 0)),
            "bad": bad,
            "bad_total": sum(bad.values()),
            "workers_reporting": len(self._stats),
        }


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

    shards = expand_shards(cfg.shards)
    sizes = shard_sizes(shards)
    if cfg.num_samples is not None:
        num_samples = cfg.num_samples
    elif sizes is not None:
        num_samples = sum(sizes)
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
    return Loader(stream, dataloader, loader_samples, num_batches)
