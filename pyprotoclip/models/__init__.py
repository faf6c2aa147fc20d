"""Model factory: open_clip architectures by name plus tiny built-in configs (``tiny-vit``, ``tiny-rn``).

Importing this package (``import pyprotoclip`` does) makes the tiny configs visible to open_clip once
open_clip is imported, in either order, without importing open_clip itself (see ``_open_clip_hook``).
"""

from pyprotoclip.models import _open_clip_hook
from pyprotoclip.models.factory import (
    PRECISIONS,
    TINY_MODELS,
    create_model,
    export_weights,
    get_model_config,
    get_tokenizer,
    infer_architecture,
    list_models,
    load_weights,
    register_tiny_configs,
)

_open_clip_hook.install()

__all__ = [
    "PRECISIONS",
    "TINY_MODELS",
    "create_model",
    "export_weights",
    "get_model_config",
    "get_tokenizer",
    "infer_architecture",
    "list_models",
    "load_weights",
    "register_tiny_configs",
]
