"""A second, augmented view of every training sample (CyCLIP's ``--inmodal``): the loader's image
preprocess and tokenizer return [original, augmented], and the model encodes both in one pass.

Image: torchvision's ``AutoAugment()`` (ImageNet policy), as the official code, applied to the PIL
image before the training preprocess. It draws from torch's global RNG, which the data pipeline
reseeds per sample from the sample's place in the stream, so a resumed run sees the same views.

Caption: EDA (Wei & Zou, 2019), as the official code (utils/eda.py: lower-case and keep only
letters, then one of its operations chosen uniformly, each on max(1, 0.1 * #words) words). EDA's
synonym replacement and its synonym insertion need WordNet, which pyprotoclip does not ship (it runs
offline); here the operations are random swap, random deletion (p = 0.1, keeping one word when all
would go) and random insertion of a word taken from the same caption. The randomness is a
``random.Random`` seeded from (run seed, caption text), never the global RNG: a caption always gets
the same augmented version, as in the official code, where each caption is augmented once when the
dataset is built.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Callable, Sequence

import torch

from pyprotoclip.models.extended import ExtendedModel

EDA_ALPHA = 0.1  # the official eda() defaults: alpha_ri = alpha_rs = p_rd = 0.1, one augmented sentence


def clean_caption(caption: str) -> str:
    """EDA's ``get_only_chars``: lower-case, drop apostrophes, everything but a-z becomes a space."""
    text = caption.lower().replace("'", "").replace("\u2019", "")
    text = re.sub(r"[^a-z ]", " ", text.replace("-", " ").replace("\t", " ").replace("\n", " "))
    return re.sub(" +", " ", text).strip()


def _swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def _delete(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() > p]
    return kept or [rng.choice(words)]


def _insert(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), rng.choice(words))
    return out


def eda(caption: str, seed: int = 0) -> str:
    """One EDA-augmented version of ``caption`` (see the module docstring), deterministic in
    (seed, caption)."""
    words = clean_caption(caption).split()
    if not words:
        return caption
    rng = random.Random(zlib.crc32(f"{seed}\0{caption}".encode("utf-8")))
    n = max(1, int(EDA_ALPHA * len(words)))
    op = rng.randrange(3)
    if op == 0:
        out = _swap(words, n, rng)
    elif op == 1:
        out = _delete(words, EDA_ALPHA, rng)
    else:
        out = _insert(words, n, rng)
    return " ".join(out)


class TwoViewPreprocess:
    """PIL image -> (2, 3, H, W): [preprocess(image), preprocess(AutoAugment(image))]."""

    def __init__(self, preprocess: Callable) -> None:
        from torchvision.transforms import AutoAugment

        self.preprocess = preprocess
        self.augment = AutoAugment()

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.preprocess(image), self.preprocess(self.augment(image))])


class TwoViewTokenizer:
    """B captions -> (B, 2, L) token ids: [tokenize(caption), tokenize(eda(caption))]."""

    def __init__(self, tokenize: Callable, seed: int = 0) -> None:
        self.tokenize, self.seed = tokenize, seed

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        captions = list(captions)
        original = torch.as_tensor(self.tokenize(captions))
        augmented = torch.as_tensor(self.tokenize([eda(c, self.seed) for c in captions]))
        return torch.stack([original, augmented], dim=1)


class TwoViewModel(ExtendedModel):
    """The open_clip model, with the same state-dict keys, whose forward also takes two views.

    forward(image (B, 2, 3, H, W), text (B, 2, L)) runs the towers once on the 2B originals and
    augmented views (BatchNorm sees both, as in the official code) and returns the base output dict
    with ``image_features`` / ``text_features`` the originals' (B, d) and ``augmented_image_features``
    / ``augmented_text_features`` (B, d). forward(image (B, 3, H, W), text (B, L)) is the base model's.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.dim() != 5:
            return self.base_forward(image, text)
        b = image.shape[0]
        if image.shape[1] != 2 or text.dim() != 3 or tuple(text.shape[:2]) != (b, 2):
            raise ValueError(
                f"image: expected (B, 2, 3, H, W) with text (B, 2, L) for two views, got {tuple(image.shape)} and {tuple(text.shape)}"
            )
        out = dict(self.base_forward(image.transpose(0, 1).flatten(0, 1), text.transpose(0, 1).flatten(0, 1)))
        img, txt = out["image_features"], out["text_features"]
        out.update(image_features=img[:b], text_features=txt[:b], augmented_image_features=img[b:],
                   augmented_text_features=txt[b:])
        return out
