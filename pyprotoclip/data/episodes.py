"""Episodes: E sample indices drawn uniformly with replacement over the whole dataset, read by random access.

An episode is the same on every rank (drawn from a generator seeded by (seed, episode)); rank r owns the
contiguous block of positions [r * E/W, (r + 1) * E/W) and is the only one that reads those samples, to
extract their features and to train on them, so their cluster labels never leave it. A training epoch walks
the rank's positions in an order seeded by (seed, epoch, rank); a resumed epoch skips the batches already
done. Random augmentations are seeded per (purpose, epoch, position), so a sample's views do not depend on
the worker that decodes it or on resuming.

A sample that cannot be read or decoded is replaced, deterministically, by the next readable sample in the
dataset (counted as bad): extraction and training then see the same replacement. When none of the next
``MAX_REPLACEMENTS`` is readable, the loader's worker does not raise (torch would re-raise its exception in the
main process with the worker's traceback inside the message): the item carries the one-line reason, and
:class:`EpisodeLoader` raises :class:`BadDataError` with it in the main process, as the webdataset loader does.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pyprotoclip.data.index import ShardIndex
from pyprotoclip.data.pipeline import BadDataError, _decode_image, _parse, _seed_of, preprocess_seeded

PURPOSE_EXTRACT, PURPOSE_TRAIN = 1, 2
MAX_REPLACEMENTS = 16


def draw_episode(num_samples: int, size: int, *, seed: int, episode: int) -> torch.Tensor:
    """(size,) int64 sample numbers in [0, num_samples), uniform with replacement, the same on every rank."""
    if num_samples < 1:
        raise ValueError("train-data: the shards hold no samples")
    g = torch.Generator().manual_seed(_seed_of(seed, episode, 11))
    return torch.randint(num_samples, (size,), generator=g, dtype=torch.int64)


def rank_block(episode_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the episode positions that ``rank`` owns (E // W each; the remainder is unused)."""
    per = episode_size // world_size
    return rank * per, (rank + 1) * per


class EpisodeSamples(Dataset):
    """Item j: sample ``ids[j]`` of the index (episode position ``positions[j]``), decoded and preprocessed.

    Returns {"image", "caption", "label", "key", "index" (sample number actually read), "episode_pos", "bad"}.
    ``index`` may be a zero-argument callable that returns the index: it is called once, when the index is
    first needed (an episode's spool is then only streamed when the episode is read, not when an epoch's
    loader is sized).
    """

    def __init__(self, index: ShardIndex | Callable[[], ShardIndex], ids: torch.Tensor, positions: torch.Tensor,
                 preprocess: Callable, *, seed: int, purpose: int, epoch: int) -> None:
        self._index, self.ids, self.positions = index, ids.tolist(), positions.tolist()
        self.preprocess, self.seed, self.purpose, self.epoch = preprocess, seed, purpose, epoch

    @property
    def index(self) -> ShardIndex:
        if not isinstance(self._index, ShardIndex):
            self._index = self._index()
        return self._index

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, j: int) -> dict[str, Any]:
        n = len(self.index)
        i = self.ids[j]
        aug_seed = _seed_of(self.seed, self.purpose, self.epoch, self.positions[j]) % (1 << 62)
        why = ""
        for bad in range(MAX_REPLACEMENTS):
            try:
                reason, img, caption, label = _parse(self.index.read(i))
                if reason is None:
                    image = preprocess_seeded(self.preprocess, _decode_image(img), aug_seed, get_worker_info() is not None)
                    return {"image": image, "caption": caption, "label": label, "key": str(self.index.keys[i]),
                            "index": i, "episode_pos": self.positions[j], "bad": bad}
                why = reason
            except Exception as exc:  # noqa: BLE001 - PIL and tar damage raise many types; the sample is replaced
                why = f"{type(exc).__name__}: {exc}"
            i = (i + 1) % n
        raise BadDataError(f"train-data: {MAX_REPLACEMENTS} consecutive unreadable samples from sample {self.ids[j]} "
                           f"({self.index.shards[self.index.shard_of(self.ids[j])]}: {why}); the shards look damaged "
                           "or were changed after the run started")


class _Reported(Dataset):
    """An :class:`EpisodeSamples` whose BadDataError becomes an item {"__error__": message}, for the loader to raise."""

    def __init__(self, samples: EpisodeSamples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, j: int) -> dict[str, Any]:
        try:
            return self.samples[j]
        except BadDataError as exc:
            return {"__error__": str(exc)}


class EpisodeLoader:
    """Batches of B items of an :class:`EpisodeSamples` in a given order, from batch ``start_batch`` on.

    Batches are dicts {"image" (B,...), "text" (B, ...) from ``tokenize``, "label" (B,), "caption", "key",
    "index" (B,), "episode_pos" (B,)}. ``num_batches`` counts the whole pass (full batches only when
    ``drop_last``); ``stats()`` gives the replaced (bad) samples seen so far.
    """

    def __init__(self, samples: EpisodeSamples, order: torch.Tensor, *, batch_size: int, tokenize: Callable,
                 workers: int, start_batch: int = 0, drop_last: bool = True) -> None:
        self.samples, self.order, self.batch_size, self.tokenize = samples, order.tolist(), batch_size, tokenize
        self.workers, self.start_batch = workers, start_batch
        rnd = math.floor if drop_last else math.ceil
        self.num_batches = rnd(len(self.order) / batch_size)
        self.num_samples = len(self.order)
        self._bad: Counter = Counter()
        self._seen = 0

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        for x in items:
            if "__error__" in x:
                return {"__error__": x["__error__"]}
        text = self.tokenize([x["caption"] for x in items])
        return {
            "image": torch.stack([x["image"] for x in items]),
            "text": torch.as_tensor(text).long(),
            "label": torch.tensor([x["label"] for x in items], dtype=torch.long),
            "caption": [x["caption"] for x in items],
            "key": [x["key"] for x in items],
            "index": torch.tensor([x["index"] for x in items], dtype=torch.long),
            "episode_pos": torch.tensor([x["episode_pos"] for x in items], dtype=torch.long),
            "__bad__": sum(x["bad"] for x in items),
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        B = self.batch_size
        batches = [self.order[b * B : (b + 1) * B] for b in range(self.start_batch, self.num_batches)]
        self.samples.index  # noqa: B018 - resolved here, once, not in every worker
        loader = DataLoader(_Reported(self.samples), batch_sampler=batches, collate_fn=self._collate, num_workers=self.workers,
                            pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
        for batch in loader:
            if "__error__" in batch:  # from a worker, or from this process: the same one-line message
                raise BadDataError(batch["__error__"])
            n_bad = batch.pop("__bad__")
            self._bad["bad_image"] += n_bad
            self._seen += n_bad + len(batch["key"])
            yield batch

    def stats(self) -> dict[str, Any]:
        """{"bad": {reason: count}, "bad_total", "bad_samples", "samples_seen", "worst_shards"} of the samples
        read so far (a replaced sample counts as bad; --max-bad-fraction judges bad_samples / samples_seen)."""
        bad = {k: int(v) for k, v in self._bad.items() if v}
        total = sum(bad.values())
        return {"bad": bad, "bad_total": total, "bad_samples": total, "samples_seen": self._seen, "worst_shards": []}


def epoch_order(positions: int, *, seed: int, epoch: int, rank: int) -> torch.Tensor:
    """A seeded permutation of a rank's ``positions`` local items for one training epoch."""
    g = torch.Generator().manual_seed(_seed_of(seed, epoch, rank, 12))
    return torch.randperm(positions, generator=g)
