"""Loss modules and the method registry (``--method``): CLIP, with the interface the other methods use."""

from pyprotoclip.losses.base import EpochContext, LoaderRequest, Method, StepContext
from pyprotoclip.losses.clip import ClipLoss, ClipMethod
from pyprotoclip.losses.cyclip import (CyCLIPLoss, CyCLIPMethod, add_cyclic_terms, cyclic_losses, cyclic_penalty,
                                      cyclic_weights)
from pyprotoclip.losses.palm import PALMLoss
from pyprotoclip.losses.protoclip import ProtoCLIPLoss, ProtoCLIPMethod, ProtoCLIPModel, ProtoLoss
from pyprotoclip.losses.registry import get_method, method_names, register_method

__all__ = [
    "ClipLoss",
    "ClipMethod",
    "CyCLIPLoss",
    "CyCLIPMethod",
    "EpochContext",
    "LoaderRequest",
    "Method",
    "PALMLoss",
    "ProtoCLIPLoss",
    "ProtoCLIPMethod",
    "ProtoCLIPModel",
    "ProtoLoss",
    "StepContext",
    "add_cyclic_terms",
    "cyclic_losses",
    "cyclic_penalty",
    "cyclic_weights",
    "get_method",
    "method_names",
    "register_method",
]
