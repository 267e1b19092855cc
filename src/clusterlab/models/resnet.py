"""ResNets for small images: the CIFAR stem (3x3 convolution, stride 1, no max-pool) with a width multiplier.

- `resnet18_cifar`: BasicBlock [2, 2, 2, 2], 8 x width features (512 at the full width 64); the backbone of
  NPID, Super-AND, the ResNet recipes of SeLa and Self-Classifier, SCAN, and the small-image SwAV / Un-Mix recipes
  (Fashion-MNIST, digits, swav_small / unmix_small); the CIFAR SwAV / Un-Mix recipes use resnet18_bottleneck.
- `resnet18_bottleneck`: what the Un-Mix / SwAV CIFAR code calls "resnet18" (szq0214/Un-Mix@0911f77
  UnMix_SwAV/for_CIFAR/src/resnet50.py): Bottleneck blocks
  (expansion 4) in [2, 2, 2, 2], 32 x width features (2048 at width 64), and a zero ConstantPad2d(1) before the
  stem convolution, left over from the ImageNet code, so a 32 x 32 input is 34 x 34 after the stem.

`init`: "kaiming" draws every convolution kaiming-normal (fan_out, ReLU gain), as torchvision's and SwAV's ResNets
do; "default" keeps PyTorch's own initialisation (convolutions uniform in +-1/sqrt(fan_in), about 2.5 times smaller
in std), as the CIFAR ResNets of NPID, Super-AND and EmbedUL do. Batch norm starts at weight 1, bias 0 either way
(`build_backbone`'s "legacy" then redraws the weights U(0, 1), as PyTorch before 1.2 did).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_planes, out_planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class CifarResNet(nn.Module):
    """Stem conv 3x3/1 + BN + ReLU (no max-pool), four stages, global average pool -> `out_dim` features."""

    def __init__(self, block, layers, in_channels: int = 3, width: int = 64, stem_pad: bool = False,
                 init: str = "kaiming"):
        super().__init__()
        self.pad = nn.ConstantPad2d(1, 0.0) if stem_pad else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_planes, stages = width, []
        for index, blocks in enumerate(layers):
            planes = width * 2 ** index
            stage = []
            for b in range(blocks):
                stage.append(block(in_planes, planes, stride=2 if (index > 0 and b == 0) else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = in_planes
        if init == "kaiming":
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.pad(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet18_cifar(in_channels: int = 3, width: int = 64, init: str = "kaiming") -> CifarResNet:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], in_channels, width, init=init)


def resnet18_bottleneck(in_channels: int = 3, width: int = 64, init: str = "kaiming") -> CifarResNet:
    return CifarResNet(Bottleneck, [2, 2, 2, 2], in_channels, width, stem_pad=True, init=init)
