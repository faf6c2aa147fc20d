"""Image<->text retrieval recall@k, one caption per image (row i of each side is a pair)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _ranks(query: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Rank of the true key for each query: #keys scoring strictly higher than key i (0 = first).

    Ties count in the true pair's favour, so duplicate captions do not punish a model.
    """
    out = []
    for s in range(0, query.shape[0], chunk):
        sim = query[s : s + chunk] @ keys.t()  # (c, N)
        idx = torch.arange(s, s + sim.shape[0], device=sim.device)
        true = sim[torch.arange(sim.shape[0], device=sim.device), idx]
        out.append((sim > true[:, None]).sum(dim=1))
    return torch.cat(out)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways on cosine similarity, and their mean.

    image_features, text_features: (N, D); pair i is (image i, text i). Returns
    {"image_to_text_R@k", "text_to_image_R@k" for each k, "mean_recall"}.
    """
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"text_features: expected shape {tuple(image_features.shape)} to match image_features, got {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("image_features: expected at least one row")
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    out: dict[str, float] = {}
    for name, ranks in (("image_to_text", _ranks(img, txt)), ("text_to_image", _ranks(txt, img))):
        for k in ks:
            out[f"{name}_R@{k}"] = int((ranks < k).sum()) / ranks.numel()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
