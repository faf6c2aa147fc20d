"""An open_clip model with a method's additions (projection heads, extra scales), under one flat state dict.

:class:`ExtendedModel` adopts the base model's submodules, parameters and buffers as its own instead of
nesting the model under a name, so its state dict has the base model's keys unchanged plus the
additions' keys: evaluation and open_clip still find the towers where they expect them, and the
additions are part of the model's state dict and checkpoint. Subclasses add modules in ``__init__``
and define ``forward``; the open_clip API (``encode_image``, ``encode_text``, ``logit_scale``) is
delegated to the base model, whose parameters are the same objects.
"""

from __future__ import annotations

import torch


class ExtendedModel(torch.nn.Module):
    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)  # not a registered child: no "base." prefix in the state dict
        for name, child in base.named_children():
            self.add_module(name, child)
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in base.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in base._non_persistent_buffers_set)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.base.encode_image(image, normalize=normalize)

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.base.encode_text(text, normalize=normalize)

    def base_forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """The open_clip model's own output dict (normalised features, exp(logit_scale))."""
        return self.base(image, text)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.base.set_grad_checkpointing(enable)

    def train(self, mode: bool = True) -> "ExtendedModel":
        super().train(mode)
        self.base.training = mode  # the adopted children follow super(); the base object itself too
        return self
