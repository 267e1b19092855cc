"""Heads on top of a backbone: SwAV's projection MLP and the prototypes."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """Linear -> BN -> ReLU -> Linear, SwAV's projection head (facebookresearch/swav@06b1b7c src/resnet50.py);
    hidden 0 gives one Linear, out 0 no head at all."""
    if out_dim == 0:
        return nn.Identity()
    if hidden_dim == 0:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class Prototypes(nn.Module):
    """K learnable unit vectors; scores are cosine similarities once `normalize_()` has run."""

    def __init__(self, dim: int, count: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default, as upstream

    @torch.no_grad()
    def normalize_(self) -> None:
        self.weight.copy_(F.normalize(self.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Scores in float32 also under autocast: the Sinkhorn raises them to exp(score / epsilon) at epsilon = 0.05
        or below, where bf16's rounding of a score (up to 0.004 at 1) would move the codes by percents."""
        with torch.autocast(z.device.type, enabled=False):
            return z.float() @ self.weight.t()


def float32_embedding(head: nn.Module, features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The L2-normalised head(features), in float32 also under autocast: a bf16 embedding would put errors of several
    hundredths on the logits f . M / T that memory banks, prototypes and normalised heads form at T = 0.1 or below
    (the head is a small share of the network's work)."""
    with torch.autocast(features.device.type, enabled=False):
        return unit_rows(head(features.float()), eps)


def unit_rows(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each row divided by its L2 norm (F.normalize's arithmetic, to the bit), and NaN where that norm is not finite:
    entries of 1e19 and more, finite, have squares beyond float32's range, and F.normalize returned such a row as
    zeros, which kNN and k-means scored as chance and training took as a valid embedding; NaN is refused as the
    overflow it is (by the evaluations, and by the NaN guard in training)."""
    norms = features.norm(dim=1, keepdim=True)
    return torch.where(torch.isfinite(norms), features / norms.clamp_min(eps), torch.nan)
