"""Backbones by name; every backbone maps images to a flat feature vector of size `out_dim`."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import ConfigError

from .alexnet import alexnet_bn
from .heads import Prototypes, projection_mlp
from .resnet import resnet18_bottleneck, resnet18_cifar
from .sobel import resnet18_sobel

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18_bottleneck": resnet18_bottleneck,
    "resnet18_sobel": resnet18_sobel,
    "alexnet_bn": alexnet_bn,
}


def build_backbone(name: str, in_channels: int, width: int) -> nn.Module:
    if name not in BACKBONES:
        raise ConfigError(f"unknown --arch {name!r} (choose one of: {', '.join(BACKBONES)})")
    return BACKBONES[name](in_channels=in_channels, width=width)


def backbone_label(name: str, width: int) -> str:
    return f"{name}_w{width}"


__all__ = ["BACKBONES", "build_backbone", "backbone_label", "Prototypes", "projection_mlp"]
