"""Backbones by name; every backbone maps images to a flat feature vector of size `out_dim`."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


# "kaiming": the architecture's explicit initialisation (convolutions kaiming-normal, fan_out); "default": PyTorch's;
# "legacy": PyTorch's before version 1.2, which drew batch-norm weights U(0, 1) instead of setting them to 1 (the
# PyTorch NPID (0.4) and EmbedUL (1.1.0) name; convolutions and linear layers were drawn as today).
INITS = ("kaiming", "default", "legacy")


def build_backbone(name: str, in_channels: int, width: int, init: str = "kaiming") -> nn.Module:
    if name not in BACKBONES:
        raise ConfigError(f"unknown --arch {name!r} (choose one of: {', '.join(BACKBONES)})")
    if init not in INITS:
        raise ConfigError(f"unknown --init {init!r} (choose one of: {', '.join(INITS)})")
    backbone = BACKBONES[name](in_channels=in_channels, width=width, init="default" if init == "legacy" else init)
    if init == "legacy":
        for module in backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                nn.init.uniform_(module.weight)
    return backbone


def backbone_label(name: str, width: int) -> str:
    return f"{name}_w{width}"


__all__ = ["BACKBONES", "INITS", "build_backbone", "backbone_label", "Prototypes", "projection_mlp", "training_mode"]


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """`module` in train (True) or eval mode inside the block, back in the mode it had after it, also on an error."""
    was_training = module.training
    module.train(training)
    try:
        yield
    finally:
        module.train(was_training)
