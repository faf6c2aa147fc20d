"""Feature extraction over a loader (frozen model, no grad)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    *,
    device: str | torch.device = "cpu",
    autocast: Any = None,
    max_samples: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run the towers over every batch of ``loader``; ``progress(samples so far)`` after each batch.

    Returns {"image_features": (N, D) float32 unnormalised, "text_features": (N, D) float32
    unnormalised, "labels": (N,) int64 (-1 where absent), "captions": list[str], "keys": list[str]}.
    """
    net = unwrap(model)
    was_training = net.training
    net.eval()
    img, txt, labels, captions, keys = [], [], [], [], []
    n = 0
    ctx = autocast if autocast is not None else contextlib.nullcontext
    try:
        for batch in loader:
            with ctx():
                img.append(net.encode_image(batch["image"].to(device), normalize=False).float().cpu())
                txt.append(net.encode_text(batch["text"].to(device), normalize=False).float().cpu())
            labels.append(batch["label"].cpu())
            captions.extend(batch.get("caption", []))
            keys.extend(batch.get("key", []))
            n += img[-1].shape[0]
            if progress is not None:
                progress(n)
            if max_samples is not None and n >= max_samples:
                break
    finally:
        net.train(was_training)
    if not img:
        raise ValueError("data: the loader yielded no batches (empty or too few shards?)")
    out = {
        "image_features": torch.cat(img),
        "text_features": torch.cat(txt),
        "labels": torch.cat(labels).long(),
        "captions": captions,
        "keys": keys,
    }
    if max_samples is not None:
        for k in ("image_features", "text_features", "labels"):
            out[k] = out[k][:max_samples]
        out["captions"], out["keys"] = captions[:max_samples], keys[:max_samples]
    return out
