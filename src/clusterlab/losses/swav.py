"""SwAV's swapped-prediction loss.

- Paper: Mathilde Caron, Ishan Misra, Julien Mairal, Priya Goyal, Piotr Bojanowski and Armand Joulin,
  "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020, arXiv:2006.09882
  (eq. 1-2).
- Upstream code: facebookresearch/swav@06b1b7c main_swav.py `train` (the loss over the assignment crops and the
  crops that predict them); szq0214/Un-Mix@0911f77 UnMix_SwAV/for_CIFAR/main_swav_unmix.py `swav_loss`, the same
  loss in SwAV's older code.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


def code_cross_entropy(scores: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """l(v, c) = -1/B sum_b sum_k q_c[b, k] log softmax(s_v[b] / tau)_k: crop v's scores predict the codes q_c."""
    return -(codes * F.log_softmax(scores.float() / temperature, dim=1)).sum(dim=1).mean()


def swav_loss(scores: Sequence[torch.Tensor], codes: Mapping[int, torch.Tensor], temperature: float) -> torch.Tensor:
    """L = 1/|A| sum_{c in A} 1/(V - 1) sum_{v != c} l(v, c).

    `scores[v]` (B x K) are crop v's prototype scores for V crops, `codes[c]` the Sinkhorn codes of each
    assignment crop c in A (the keys). Every other crop, global or small, predicts each assignment crop's code.
    """
    total = 0.0
    for c, q in codes.items():
        others = [v for v in range(len(scores)) if v != c]
        total = total + sum(code_cross_entropy(scores[v], q, temperature) for v in others) / len(others)
    return total / len(codes)
