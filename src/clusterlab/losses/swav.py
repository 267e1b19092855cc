"""SwAV's swapped-prediction loss (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020, eq. 1-2; seeds spec 1.4)."""
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
