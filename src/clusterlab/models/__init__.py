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


# "kaiming": the architecture's explicit initialisation (convolutions kaiming-normal, fan_out); "default": PyTorch's.
INITS = ("kaiming", "default")


def build_backbone(name: str, in_channels: int, width: int, init: str = "kaiming") -> nn.Module:
    if name not in BACKBONES:
        raise ConfigError(f"unknown --arch {name!r} (choose one of: {', '.join(BACKBONES)})")
    if init not in INITS:
        raise ConfigError(f"unknown --init {init!r} (choose one of: {', '.join(INITS)})")
    return BACKBONES[name](in_channels=in_channels, width=width, init=init)


def backbone_label(name: str, width: int) -> str:
    return f"{name}_w{width}"


__all__ = ["BACKBONES", "INITS", "build_backbone", "backbone_label", "Prototypes", "projection_mlp"]
