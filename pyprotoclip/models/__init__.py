"""Model factory: open_clip architectures by name plus tiny built-in configs (``tiny-vit``, ``tiny-rn``)."""

from pyprotoclip.models.factory import (
    PRECISIONS,
    TINY_MODELS,
    create_model,
    get_model_config,
    get_tokenizer,
    list_models,
    load_weights,
    register_tiny_configs,
)

__all__ = [
    "PRECISIONS",
    "TINY_MODELS",
    "create_model",
    "get_model_config",
    "get_tokenizer",
    "list_models",
    "load_weights",
    "register_tiny_configs",
]
