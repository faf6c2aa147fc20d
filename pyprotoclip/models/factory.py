"""Model factory: open_clip architectures by name plus pyprotoclip's tiny built-in configs.

Everything is offline: a model is randomly initialised unless ``pretrained`` names a local
checkpoint file (an open_clip ``state_dict`` file or a pyprotoclip training checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from pyprotoclip.models._open_clip_hook import CONFIG_DIR
from pyprotoclip.models._open_clip_hook import register as _register

TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
PRECISIONS = ("amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16", "fp32")


def register_tiny_configs() -> None:
    """Register the JSON configs in ``pyprotoclip/models/configs`` with open_clip (idempotent). Importing
    pyprotoclip already does this once open_clip is imported; calling it imports open_clip."""
    import open_clip

    _register(open_clip)


def list_models() -> list[str]:
    """Every architecture name ``create_model`` accepts (open_clip's plus the tiny ones)."""
    register_tiny_configs()
    import open_clip

    return open_clip.list_models()


def get_model_config(name: str) -> dict[str, Any]:
    """The architecture config (a JSON-able dict) for ``name``; ValueError for an unknown name."""
    register_tiny_configs()
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = [m for m in open_clip.list_models() if name.lower() in m.lower()][:8]
        hint = f" (close: {', '.join(close)})" if close else f" (tiny built-ins: {', '.join(TINY_MODELS)})"
        raise ValueError(f"model: unknown architecture {name!r}{hint}; see `open_clip.list_models()`")
    return cfg


def get_tokenizer(name: str) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for ``name``: ``tok(list_of_str) -> (n, context_length)`` int64."""
    register_tiny_configs()
    import open_clip

    get_model_config(name)
    return open_clip.get_tokenizer(name)


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained: no such checkpoint file {path!r} (give a local .pt/.bin file)")
    from pyprotoclip.checkpoint import load_checkpoint, model_weights

    try:
        obj = load_checkpoint(path)
    except ValueError as exc:
        raise ValueError(f"pretrained: {str(exc).removeprefix('checkpoint: ')}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "state_dict" not in obj:
        obj = obj["model"]
    obj, _ = model_weights(obj)  # a training checkpoint's architecture weights (a method's additions left out)
    if not isinstance(obj, dict):
        raise ValueError(f"pretrained: {path!r} does not hold a state dict")
    return obj


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, what: str, source: str, name: str) -> None:
    """Load ``state`` into ``model`` strictly; ValueError naming ``what`` when keys or shapes differ."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what}: {source!r} does not match architecture {name!r}: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(shapes)} shape mismatches (e.g. {shapes[:2]})"
        )
    model.load_state_dict(state)


def infer_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """The built-in tiny config whose state dict has exactly the keys and shapes of ``state`` (a ``module.``
    prefix ignored), or None. Only the tiny configs are tried: building every open_clip architecture to
    compare would take minutes; for those, name the architecture."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    found = []
    for name in TINY_MODELS:
        cfg = get_model_config(name)
        if "text_projection" in state and state["text_projection"].shape[-1] != cfg["embed_dim"]:
            continue
        own = create_model(name)[0].state_dict()
        if own.keys() == state.keys() and all(own[k].shape == state[k].shape for k in own):
            found.append(name)
    return found[0] if len(found) == 1 else None


def export_weights(checkpoint: str, out: str) -> str:
    """Write the architecture weights of a pyprotoclip checkpoint (a method's additions left out) as a plain
    state dict, the form ``open_clip.create_model_and_transforms(name, pretrained=out)`` loads strictly.
    Returns ``out``."""
    from pyprotoclip.checkpoint import load_checkpoint, model_weights, save_checkpoint

    weights, _ = model_weights(load_checkpoint(checkpoint))
    save_checkpoint(weights, out)
    return out


def create_model(
    name: str,
    *,
    pretrained: str | None = None,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    grad_checkpointing: bool = False,
    seed: int | None = None,
) -> tuple[torch.nn.Module, Callable, Callable, Callable]:
    """Build ``(model, preprocess_train, preprocess_val, tokenizer)`` for an open_clip architecture.

    name: an open_clip model name (``RN50``, ``ViT-B-32``, ...) or a tiny built-in (``tiny-vit``,
    ``tiny-rn``: 64x64 images, context length 32). pretrained: a local checkpoint file loaded with
    ``weights_only=True`` (no downloads). precision: one of PRECISIONS; ``pure_*``/``bf16``/``fp16``
    cast the weights, ``amp*`` and ``fp32`` keep them fp32. The model's forward returns a dict
    with ``image_features`` (B, D) and ``text_features`` (B, D), both L2-normalised, and
    ``logit_scale`` = exp(t) (0-d).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    get_model_config(name)
    import open_clip

    if seed is not None:
        torch.manual_seed(seed)
    weight_precision = precision if precision in ("bf16", "fp16", "pure_bf16", "pure_fp16") else "fp32"
    import logging

    # open_clip warns at WARNING level that random init happened; that is the point offline.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, precision=weight_precision, device=device, output_dict=True
        )
    finally:
        logger.setLevel(level)
    if pretrained:
        load_weights(model, _load_state_dict_file(pretrained), what="pretrained", source=pretrained, name=name)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess_train, preprocess_val, tokenizer
