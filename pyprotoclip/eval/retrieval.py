"""Image<->text retrieval recall@k (row i of each side is a pair).

With captions, a retrieved item counts as correct when its caption text equals the query's (COCO
style: any caption with the same text counts). Without them, only the item of the same row counts.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """(N,) int64: the same id for rows whose caption text is identical (ids in order of first appearance)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(c, len(ids)) for c in captions], dtype=torch.long)


def _ranks(query: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Rank of the best correct key for each query: #keys scoring strictly higher than it (0 = first).

    Correct keys of query i: key i, and with ``groups`` every key j with groups[j] == groups[i]. Ties
    count in the correct key's favour. Every key scoring above the best correct one is an incorrect one.
    """
    if chunk is None:  # rows of (chunk, N) similarities at a time: at most 2**26 elements (256 MiB of float32)
        chunk = max(1, min(4096, (1 << 26) // max(keys.shape[0], 1)))
    if groups is not None:
        groups = groups.to(keys.device)  # indexed below by device indices; once, not per chunk
    out = []
    for s in range(0, query.shape[0], chunk):
        sim = query[s : s + chunk] @ keys.t()  # (c, N)
        idx = torch.arange(s, s + sim.shape[0], device=sim.device)
        if groups is None:
            best = sim[torch.arange(sim.shape[0], device=sim.device), idx]
        else:
            correct = groups[idx][:, None] == groups[None, :]  # (c, N), includes key i
            best = sim.masked_fill(~correct, float("-inf")).max(dim=1).values
        out.append((sim > best[:, None]).sum(dim=1))
    return torch.cat(out)


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    captions: Sequence[str] | None = None,
) -> dict[str, float]:
    """Recall@k both ways on cosine similarity, and their mean.

    image_features, text_features: (N, D); pair i is (image i, text i). captions: the N caption texts;
    when given, image->text counts any text whose caption equals image i's caption, and text->image any
    image whose caption equals text i's; the result also has ``retrieval_num_captions`` (N) and
    ``retrieval_distinct_captions``. Returns {"image_to_text_R@k", "text_to_image_R@k" for each k,
    "mean_recall"}.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"text_features: expected shape {tuple(image_features.shape)} to match image_features, got {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("image_features: expected at least one row")
    groups = None
    if captions is not None:
        if len(captions) != image_features.shape[0]:
            raise ValueError(f"captions: expected {image_features.shape[0]} captions (one per row), got {len(captions)}")
        groups = caption_groups(captions)
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", _ranks(img, txt, groups)), ("text_to_image", _ranks(txt, img, groups))):
        for k in ks:
            out[f"{name}_R@{k}"] = int((ranks < k).sum()) / ranks.numel()
    out["mean_recall"] = sum(out.values()) / len(out)
    if groups is not None:
        out["retrieval_num_captions"] = int(groups.numel())
        out["retrieval_distinct_captions"] = int(groups.max()) + 1
    return out
