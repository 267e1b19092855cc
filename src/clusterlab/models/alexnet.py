"""SeLa's AlexNet with batch normalisation (`alexnet_bn`): the "big" configuration of the self-label code
(yukimasano/self-label@3891e37 models/alexnet.py, used by cifar.py), which it took from DeepCluster.

    conv 96-11/4 (pad 2) BN ReLU, max-pool 3/2, conv 256-5 (pad 2) BN ReLU, max-pool 3/2,
    conv 384-3, 384-3, 256-3 (pad 1) each BN ReLU, max-pool 3/2            -> 256 x 6 x 6 at 224 px
    Dropout(0.5) FC 4096 ReLU Dropout(0.5) FC 4096 ReLU                      -> 4096 (fc7, `out_dim`)

SeLa's heads sit on the fc7 output, so the classifier is part of the backbone here. Initialisation as upstream:
convolutions N(0, sqrt(2 / (k * k * out_channels))) with zero bias (the convolutions keep their bias although a
BN follows), BN weight 1 and bias 0, linear layers N(0, 0.01) with zero bias.

Two additions, both inactive at the standard setting: `width` scales every channel count and the 4096 of the
classifier by width / 64 (64: the standard widths; tests use tiny ones), and an adaptive average pool to 6 x 6
before the classifier (torchvision's AlexNet has the same) lets inputs other than 224 px through; at 224 px the
map is already 6 x 6 and the pool is the identity. Inputs need at least 63 px (three stride-2 max-pools after
the stride-4 convolution).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# (output channels, kernel, stride, padding) of each convolution; "M" a 3x3 max-pool with stride 2.
BIG = ((96, 11, 4, 2), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M")
FC_WIDTH = 4096


def _scaled(channels: int, width: int) -> int:
    return max(1, round(channels * width / 64))


class AlexNetBN(nn.Module):
    min_input_size = 63  # the smallest input its three stride-2 max-pools leave a pixel of

    def __init__(self, in_channels: int = 3, width: int = 64, init: str = "kaiming"):
        super().__init__()
        layers, channels = [], in_channels
        for spec in BIG:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
                continue
            out, kernel, stride, padding = spec
            out = _scaled(out, width)
            layers += [nn.Conv2d(channels, out, kernel, stride, padding), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(6)
        hidden = _scaled(FC_WIDTH, width)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(channels * 6 * 6, hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.out_dim = hidden
        if init == "kaiming":  # upstream SeLa's initialisation; "default" keeps PyTorch's
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                    nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                    nn.init.zeros_(module.bias)
                elif isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, 0.0, 0.01)
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def alexnet_bn(in_channels: int = 3, width: int = 64, init: str = "kaiming") -> AlexNetBN:
    return AlexNetBN(in_channels, width, init)
