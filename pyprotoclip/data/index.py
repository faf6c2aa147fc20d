"""Random access into webdataset shards: an index of every sample's tar members (byte offset, size).

ProtoCLIP's episodes draw sample indices uniformly over the whole dataset and read exactly those samples,
once to extract features and once to train. :class:`ShardIndex` numbers the samples of a list of local tar
files in order (shard by shard, member order within a shard) and reads any of them with one seek per
member. Building it reads only the tar headers; the index of each shard is cached beside it as
``<shard>.index.npz`` (numpy arrays, no pickle), valid while the shard's size and mtime are unchanged.
Where the shard's directory is not writable the index stays in memory.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from pyprotoclip.data.pipeline import BadDataError, _describe_exc, _parse, group_samples, iter_tar_entries, name_shards

logger = logging.getLogger("pyprotoclip.data")

INDEX_VERSION = 1


def _index_path(shard: str) -> str:
    return shard + ".index.npz"


def _signature(shard: str) -> np.ndarray:
    st = os.stat(shard)
    return np.array([INDEX_VERSION, st.st_size, st.st_mtime_ns], dtype=np.int64)


def _scan(shard: str) -> dict[str, np.ndarray]:
    """The index arrays of one shard: sample keys, and per member its sample, extension, offset, size."""
    keys: list[str] = []
    m_sample: list[int] = []
    m_ext: list[str] = []
    m_offset: list[int] = []
    m_size: list[int] = []
    with open(shard, "rb") as f:
        entries = ((name, (offset, size)) for name, offset, size, _ in iter_tar_entries(f, with_data=False))
        for key, parts in group_samples(entries):
            for ext, (offset, size) in parts.items():
                m_sample.append(len(keys))
                m_ext.append(ext)
                m_offset.append(offset)
                m_size.append(size)
            keys.append(key)
    return {
        "keys": np.array(keys, dtype=np.str_),
        "member_sample": np.array(m_sample, dtype=np.int64),
        "member_ext": np.array(m_ext, dtype=np.str_),
        "member_offset": np.array(m_offset, dtype=np.int64),
        "member_size": np.array(m_size, dtype=np.int64),
    }


def _empty_index() -> dict[str, np.ndarray]:
    return {"keys": np.array([], dtype=np.str_), "member_sample": np.array([], dtype=np.int64),
            "member_ext": np.array([], dtype=np.str_), "member_offset": np.array([], dtype=np.int64),
            "member_size": np.array([], dtype=np.int64)}


def load_shard_index(shard: str, *, cache: bool = True) -> dict[str, np.ndarray]:
    """The index of one local shard, from its cache file when that matches the shard, else by scanning it."""
    path = _index_path(shard)
    sig = _signature(shard)
    if cache and os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as z:
                if np.array_equal(z["signature"], sig):
                    return {k: z[k] for k in z.files if k != "signature"}
        except (OSError, ValueError, KeyError):
            pass  # unreadable or old cache: rebuilt below
    arrays = _scan(shard)
    if cache:
        tmp = f"{path}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, signature=sig, **arrays)
            os.replace(tmp, path)
        except OSError as exc:
            logger.info("not caching the index of %s (%s); it is rebuilt next time", shard, exc)
            if os.path.exists(tmp):
                os.remove(tmp)
    return arrays


class ShardIndex:
    """Every sample of ``shards`` (local tar files), numbered 0..N-1 in shard order, readable by number.

    ``keys[i]`` is sample i's key; ``read(i)`` returns its raw members {"__key__", "__url__", ext: bytes},
    the same dict a streaming read of the shard gives. File handles are opened lazily and kept per process
    (safe in DataLoader workers: each has its own). A shard that cannot be indexed (damaged, unreadable) is left
    out with a warning naming it (``damaged``); BadDataError when every shard is.
    """

    def __init__(self, shards: Sequence[str], *, cache: bool = True, flag: str = "shards") -> None:
        self.shards = list(shards)
        self.damaged: dict[str, str] = {}  # shard -> what is wrong: left out of the index (no samples)
        per_shard = []
        for s in self.shards:
            try:
                per_shard.append(load_shard_index(s, cache=cache))
            except Exception as exc:  # noqa: BLE001 - a damaged or unreadable shard is left out, never the run
                self.damaged[s] = _describe_exc(exc)
                per_shard.append(_empty_index())
        if self.damaged:
            items = [(s, self.damaged[s]) for s in self.shards if s in self.damaged]
            if len(items) == len(self.shards):
                raise BadDataError(f"{flag}: every shard is damaged ({len(items)} of {len(self.shards)}): {name_shards(items)}")
            logger.warning("%s: %d of %d shard(s) are damaged and left out: %s", flag, len(items), len(self.shards),
                           name_shards(items))
        counts = np.array([len(a["keys"]) for a in per_shard], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # sample number of each shard's first sample
        self.keys = np.concatenate([a["keys"] for a in per_shard]) if per_shard else np.array([], dtype=np.str_)
        # members sorted by (global sample): member_start[i]..member_start[i+1] are sample i's members
        self.member_shard = np.concatenate([np.full(len(a["member_sample"]), s, dtype=np.int64) for s, a in enumerate(per_shard)])
        self.member_sample = np.concatenate([a["member_sample"] + self.starts[s] for s, a in enumerate(per_shard)])
        self.member_ext = np.concatenate([a["member_ext"] for a in per_shard])
        self.member_offset = np.concatenate([a["member_offset"] for a in per_shard])
        self.member_size = np.concatenate([a["member_size"] for a in per_shard])
        self.member_start = np.searchsorted(self.member_sample, np.arange(len(self.keys) + 1))
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.starts, i, side="right") - 1)

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker: never share the parent's file offsets
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")
        return f

    def read(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.keys):
            raise IndexError(f"sample {i} out of range [0, {len(self.keys)})")
        lo, hi = int(self.member_start[i]), int(self.member_start[i + 1])
        shard = int(self.member_shard[lo])
        f = self._file(shard)
        sample: dict[str, Any] = {"__key__": str(self.keys[i]), "__url__": self.shards[shard]}
        for m in range(lo, hi):
            f.seek(int(self.member_offset[m]))
            size = int(self.member_size[m])
            data = f.read(size)
            if len(data) != size:
                raise OSError(f"{self.shards[shard]}: sample {sample['__key__']} is truncated")
            sample[str(self.member_ext[m])] = data
        return sample

    def caption(self, i: int) -> str | None:
        """Sample i's caption, or None when the sample is damaged or has none (its image is not decoded)."""
        try:
            return _parse(self.read(i))[2]
        except Exception:  # noqa: BLE001 - a damaged sample has no caption
            return None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
