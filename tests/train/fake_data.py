"""A tiny in-memory stand-in for ``pyprotoclip.data`` that follows the data contract
(build_loader with epoch/rank/world_size/start_batch determinism, read_zeroshot_files)."""

from __future__ import annotations

import types

import torch

from pyprotoclip.data import DataConfig

NUM_SAMPLES = 64
IMAGE = 64
CONTEXT = 32


def _sample(i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(1000 + i)
    label = i % 4
    image = torch.randn(3, IMAGE, IMAGE, generator=g) * 0.1
    image[label % 3] += 1.0
    text = torch.zeros(CONTEXT, dtype=torch.long)
    text[0], text[1], text[2] = 49406, 320 + label, 49407
    return image, text, label


class Loader:
    def __init__(self, cfg: DataConfig, *, is_train: bool, epoch: int, rank: int, world_size: int, start_batch: int):
        self.cfg, self.is_train, self.epoch, self.rank, self.world = cfg, is_train, epoch, rank, world_size
        self.start_batch = start_batch
        self.num_samples = cfg.num_samples or NUM_SAMPLES
        per_rank = self.num_samples // world_size
        self.num_batches = per_rank // cfg.batch_size if cfg.drop_last else -(-per_rank // cfg.batch_size)

    def stats(self) -> dict:
        return {"samples": 0, "bad": {}}

    def __iter__(self):
        order = torch.arange(self.num_samples)
        if self.is_train:
            g = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
            order = order[torch.randperm(self.num_samples, generator=g)]
        mine = order[self.rank :: self.world]
        bs = self.cfg.batch_size
        for b in range(self.start_batch, self.num_batches):
            idx = mine[b * bs : (b + 1) * bs].tolist()
            items = [_sample(i) for i in idx]
            yield {
                "image": torch.stack([x[0] for x in items]),
                "text": torch.stack([x[1] for x in items]),
                "label": torch.tensor([x[2] for x in items]),
                "caption": [f"class {x[2]}" for x in items],
                "key": [f"{i:06d}" for i in idx],
            }


def build_loader(cfg, *, preprocess, tokenize, is_train, epoch=0, rank=0, world_size=1, start_batch=0):
    return Loader(cfg, is_train=is_train, epoch=epoch, rank=rank, world_size=world_size, start_batch=start_batch)


def read_zeroshot_files(spec: str):
    return [f"c{i}" for i in range(4)], ["a photo of {}.", "{}"]


module = types.SimpleNamespace(DataConfig=DataConfig, build_loader=build_loader, read_zeroshot_files=read_zeroshot_files)
