"""Helpers for the data tests: a cheap preprocess / tokenize pair and hand-made shards."""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from pyprotoclip.data.writer import ShardWriter


def preprocess(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, 8, 8) float: small, cheap and sensitive to the image content."""
    return torch.from_numpy(np.asarray(im.resize((8, 8), Image.BILINEAR), dtype=np.float32)).permute(2, 0, 1) / 255.0


def tokenize(captions: list[str]) -> torch.Tensor:
    """(B, 12) long: character codes, enough to tell captions apart in tests."""
    return torch.tensor([[ord(c) for c in cap[:12].ljust(12)] for cap in captions], dtype=torch.long)


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_good_shards(directory: str, n_shards: int, per_shard: int, *, start_key: int = 0, sizes: bool = True) -> str:
    """n_shards shards of valid samples (key k has caption 'caption k' and cls k % 5); returns the brace spec."""
    os.makedirs(directory, exist_ok=True)
    with ShardWriter(directory, per_shard) as w:
        for k in range(start_key, start_key + n_shards * per_shard):
            w.write({"__key__": f"{k:06d}", "jpg": jpeg_bytes(k), "txt": f"caption {k}", "cls": str(k % 5)})
    if not sizes:
        os.remove(os.path.join(directory, "sizes.json"))
    return w.spec()
