"""Networks and image transforms for OOD training: a backbone (torchvision ResNet-18/34, or the image tower of
any open_clip / pyprotoclip architecture) with the official PALM head, and the official augmentations.

The official model (jeff024/PALM ``models/resnet.py``) is a CIFAR ResNet: a 3x3 stride-1 first convolution,
no max-pool, global average pooling to 512-d; the head is Linear(512, 512) -> ReLU -> Linear(512, 128) and
its output is L2-normalised. ``resnet18``/``resnet34`` with ``cifar_stem`` are torchvision's ResNets changed
to that stem, which makes them the same architecture (same layers, strides and initialisation).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

RESNETS = ("resnet18", "resnet34")
HEADS = ("mlp", "linear", "none")

# the official normalisation of each in-distribution set (data_loader.get_normalizer)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def _resnet(name: str, cifar_stem: bool) -> torch.nn.Module:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        torch.nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's own
        net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    return net


def resolve_model_cfg(backbone: str, *, cifar_stem: bool | None = None, image_size: int | None = None,
                      mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None, feat_dim: int = 128,
                      head: str = "mlp", num_classes: int | None = None) -> dict[str, Any]:
    """The JSON-able description a checkpoint stores and :func:`build_model` reads.

    backbone: ``resnet18`` | ``resnet34`` (torchvision; ``cifar_stem`` default True, image_size 32, CIFAR-100
    normalisation) or an open_clip / pyprotoclip architecture name (its image tower; its own image size and
    normalisation). head: "mlp" (official), "linear" or "none" (no projection head: cross-entropy training).
    num_classes: add a linear classifier on the backbone features (cross-entropy training).
    """
    if head not in HEADS:
        raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
    cfg: dict[str, Any] = {"backbone": backbone, "feat_dim": int(feat_dim), "head": head,
                           "num_classes": None if num_classes is None else int(num_classes)}
    if backbone in RESNETS:
        cfg.update(kind="torchvision", cifar_stem=True if cifar_stem is None else bool(cifar_stem), dim=512,
                   image_size=image_size or 32, mean=list(mean or CIFAR100_MEAN), std=list(std or CIFAR100_STD))
        return cfg
    from pyprotoclip.models import get_model_config

    arch = get_model_config(backbone)  # ValueError naming close architectures when unknown
    if cifar_stem:
        raise ValueError(f"cifar-stem: only for the torchvision ResNets {RESNETS}, not {backbone!r}")
    vision = arch.get("vision_cfg", {})
    size = vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if image_size and image_size != size:
        raise ValueError(f"image-size: {backbone!r} takes {size}x{size} images, got {image_size}")
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg.update(kind="open_clip", cifar_stem=False, dim=int(arch["embed_dim"]), image_size=int(size),
               mean=list(mean or OPENAI_DATASET_MEAN), std=list(std or OPENAI_DATASET_STD))
    return cfg


class OODNet(torch.nn.Module):
    """encoder (images -> penultimate features (B, dim)) + head (-> L2-normalised (B, feat_dim)) + optional
    classifier ``fc`` (-> logits (B, num_classes)).

    ``forward(x)``: the normalised head features (PALM's training features). ``encode(x)``: the penultimate
    features the OOD scores use. ``logits(x)``: the classifier's logits.
    """

    def __init__(self, encoder: torch.nn.Module, dim: int, *, feat_dim: int = 128, head: str = "mlp",
                 num_classes: int | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        if head == "mlp":
            self.head = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(inplace=True), torch.nn.Linear(dim, feat_dim))
        elif head == "linear":
            self.head = torch.nn.Linear(dim, feat_dim)
        else:
            self.head = None
        self.fc = torch.nn.Linear(dim, num_classes) if num_classes else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise ValueError("head: this network has no projection head (trained with --loss ce); use logits()")
        return F.normalize(self.head(self.encoder(x)), dim=-1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise ValueError("fc: this network has no classifier (trained with --loss palm)")
        return self.fc(self.encoder(x))


def build_model(cfg: dict[str, Any]) -> OODNet:
    """The network ``cfg`` (from :func:`resolve_model_cfg`) describes, randomly initialised."""
    if cfg["kind"] == "torchvision":
        encoder = _resnet(cfg["backbone"], cfg["cifar_stem"])
    else:
        from pyprotoclip.models import create_model

        encoder = create_model(cfg["backbone"])[0].visual
    return OODNet(encoder, cfg["dim"], feat_dim=cfg["feat_dim"], head=cfg["head"], num_classes=cfg["num_classes"])


# ---- transforms ---------------------------------------------------------------------------------------------


AUGMENTATIONS = ("simclr", "crop")


def train_transform(size: int, mean, std, *, augment: str = "simclr", crop_scale: float = 0.2) -> Callable[[Image.Image], torch.Tensor]:
    """One augmented view. "simclr": the official PALM pipeline (``simclr_transform_train``): RandomResizedCrop
    (area ``crop_scale``-1) -> flip -> colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8 -> grayscale with p 0.2.
    "crop": RandomResizedCrop -> flip only (the official cross-entropy pipeline, ``transform_train``), for data
    whose classes depend on colour."""
    from torchvision import transforms as T

    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment: expected one of {AUGMENTATIONS}, got {augment!r}")
    if not 0 < crop_scale <= 1:
        raise ValueError(f"crop-scale: expected a value in (0, 1], got {crop_scale!r}")
    steps = [T.RandomResizedCrop(size=size, scale=(crop_scale, 1.0)), T.RandomHorizontalFlip()]
    if augment == "simclr":
        steps += [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(size: int, mean, std) -> Callable[[Image.Image], torch.Tensor]:
    """The official evaluation transform: Resize((s, s)) -> CenterCrop(s) -> ToTensor -> Normalize."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((size, size)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


class MultiView:
    """``nviews`` independent draws of ``transform``, stacked: PIL image -> (nviews, 3, H, W)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], nviews: int) -> None:
        self.transform, self.nviews = transform, nviews

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.nviews)])


def no_text(captions: list[str]) -> torch.Tensor:
    """A stand-in tokenizer: the loader needs one, OOD training reads no caption."""
    return torch.zeros((len(captions), 1), dtype=torch.long)
