"""Invariant Information Clustering's loss, as EmbedUL's class-assignment stage uses it.

- Paper: Xu Ji, Joao F. Henriques and Andrea Vedaldi, "Invariant Information Clustering for Unsupervised Image
  Classification and Segmentation", ICCV 2019, arXiv:1807.06653.
- Used by: Sungwon Han, Sungwon Park, Sungkyu Park, Sundong Kim and Meeyoung Cha, "Mitigating Embedding and Class
  Assignment Mismatch in Unsupervised Image Classification", ECCV 2020 (no arXiv version).
- Upstream code: EmbedUL/EmbedUL@4027eab lib/criterion.py `IID_loss` and `compute_joint`.
"""
from __future__ import annotations

import sys

import torch

from .. import distributed

EPS = sys.float_info.epsilon


def iic_loss(probs_a: torch.Tensor, probs_b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """-I(y; y') of the class distributions of two views (B x C each, rows summing to 1):

    P = sum_b y_b y'_b^T over the global batch (all ranks), symmetrised (P + P^T) / 2 and normalised to sum 1;
    P_i, P_j its row and column marginals; P, P_i, P_j clamped below at machine epsilon (as IIC's code);
    L = -sum_ij P_ij (log P_ij - log P_i - log P_j).
    """
    joint = distributed.all_reduce_sum_with_grad(probs_a.float().t() @ probs_b.float())
    joint = (joint + joint.t()) / 2
    joint = joint / joint.sum()
    rows, cols = joint.sum(dim=1, keepdim=True), joint.sum(dim=0, keepdim=True)
    joint, rows, cols = joint.clamp(min=eps), rows.clamp(min=eps), cols.clamp(min=eps)
    return -(joint * (joint.log() - rows.log() - cols.log())).sum()
