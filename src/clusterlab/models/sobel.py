"""Super-AND's "ResNet18withSobel" (super-AND/super-AND@5a0e5ca models/resnet_cifar.py; EmbedUL@4027eab keeps the
same): two CIFAR ResNet-18 trunks side by side.

Stream 1 sees the normalised image. Stream 2 sees its edges: a fixed 1x1 convolution averages the normalised
channels (weights 1/C, so a grey image passes unchanged), then fixed 3x3 Sobel filters give two channels,
x then y, with zero padding, exactly as upstream's (DeepCluster's) Sobel layer:

    sobel_x = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]      sobel_y = [[1, 2, 1], [0, 0, 0], [-1, -2, -1]]

Both pooled outputs are concatenated (2 x 8 x width, 1024 at width 64). The fixed filters are buffers, not
parameters: the optimiser never sees them, so they get neither gradients nor weight decay (upstream sets
requires_grad False on parameters it still hands to SGD, to the same effect). They are not saved either: they are
constants of the architecture.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import resnet18_cifar

SOBEL = torch.tensor([[[[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]],
                      [[[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]]])


class SobelTwoStream(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 64, init: str = "kaiming"):
        super().__init__()
        self.register_buffer("average", torch.full((1, in_channels, 1, 1), 1.0 / in_channels), persistent=False)
        self.register_buffer("sobel", SOBEL.clone(), persistent=False)
        self.rgb = resnet18_cifar(in_channels, width, init)
        self.edges = resnet18_cifar(2, width, init)
        self.out_dim = self.rgb.out_dim + self.edges.out_dim

    def edge_input(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed part of stream 2: channel average, then Sobel x and y (N x 2 x H x W)."""
        grey = F.conv2d(x, self.average.to(x.dtype))
        return F.conv2d(grey, self.sobel.to(x.dtype), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.rgb(x), self.edges(self.edge_input(x))], dim=1)


def resnet18_sobel(in_channels: int = 3, width: int = 64, init: str = "kaiming") -> SobelTwoStream:
    return SobelTwoStream(in_channels, width, init)
