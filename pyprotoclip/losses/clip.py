"""CLIP: the symmetric InfoNCE loss over the global batch, the baseline every method builds on."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist

from pyprotoclip.losses.base import Method, StepContext
from pyprotoclip.losses.registry import register_method
from pyprotoclip.ops import infonce_loss


class ClipLoss(torch.nn.Module):
    """L_clip = 1/2 [CE(s I T^T, diag) + CE(s T I^T, diag)] over the global batch (open_clip's
    ``ClipLoss(local_loss=True, gather_with_grad=True)``), through :func:`pyprotoclip.ops.infonce_loss`.

    outputs: ``image_features``, ``text_features`` (B, d) normalised, ``logit_scale`` 0-d (already
    exponentiated). The features reach the op in the dtype the towers produced (bf16 under
    ``amp_bf16``: the op accumulates in fp32). Returns {"contrastive_loss", "loss"}, 0-d fp32.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group

    def forward(self, outputs: Mapping[str, Any], *, step_context: StepContext | None = None) -> dict[str, torch.Tensor]:
        loss = infonce_loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"], group=self.group)
        return {"contrastive_loss": loss, "loss": loss}


@register_method
class ClipMethod(Method):
    name = "clip"
    summary = "CLIP: symmetric InfoNCE over the global batch"

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        # another method's switches would otherwise be ignored without a word
        for key in ("cylambda1", "cylambda2"):
            if params.get(key):
                raise ValueError(f"{key}: CLIP has no cyclic terms; use --method cyclip (or protoclip) with it")
        if params.get("inmodal"):
            raise ValueError("inmodal: the augmented-view term belongs to --method cyclip")

    def build_loss(self) -> torch.nn.Module:
        return ClipLoss()
