"""Self-Classifier's loss.

- Paper: Elad Amrani, Leonid Karlinsky and Alex Bronstein, "Self-Supervised Classification Network", ECCV 2022,
  arXiv:2103.10994.
- Upstream code: elad-amrani/self-classifier@3935138 src/loss.py (v2, the ECCV code) and
  elad-amrani/self-classifier@635972b src/loss.py (v1, the last commit with CIFAR code).

For one classifier head with logits s_v (N x C, the global batch) of view v:

    target of view i       T_i = row-L1-normalise( softmax over the batch of s_i / tau_c )
    prediction of view j   log P~_j = log( N/C * P_j / sum_batch P_j + eps ),  P_j = softmax over classes of s_j / tau_r
    l(i, j) = - 1/n sum_{n in this rank's rows} sum_c T_i[n, c] log P~_j[n, c]

P_j / sum_batch P_j is p(x | y) by Bayes with a uniform class prior (N/C keeps the values near 1). Both L1
normalisations divide by max(sum, eps), as upstream's F.normalize(..., eps=eps) does. The head's loss
is the mean of l(i, j) over all view pairs i != j except those of two local crops; no stop-gradient anywhere.
v1 is the same with one temperature and no prior normalisation (log P~_j = log softmax(s_j / tau)) and two views,
which makes the mean over pairs 1/2 [l(1, 2) + l(2, 1)].
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def view_pairs(num_views: int, num_global: int) -> list[tuple[int, int]]:
    """(target view i, predicting view j): i != j and not both local (index >= num_global). 2 global + 6 local
    views give 2 + 12 + 12 = 26 pairs."""
    return [(i, j) for i in range(num_views) for j in range(num_views)
            if i != j and (i < num_global or j < num_global)]


def batch_targets(logits: torch.Tensor, col_tau: float, eps: float = 1e-12) -> torch.Tensor:
    """T = row-L1-normalise(softmax over the batch dimension of logits / col_tau): for each class a distribution
    over the samples, then each sample's vector rescaled to sum to 1 (divided by max(sum, eps), as upstream)."""
    return F.normalize(F.softmax(logits / col_tau, dim=0), p=1, dim=1, eps=eps)


def class_log_predictions(logits: torch.Tensor, row_tau: float, uniform_prior: bool = True,
                          eps: float = 1e-12) -> torch.Tensor:
    """log((N/C) P / max(sum_batch P, eps) + eps) with P = softmax over classes of logits / row_tau (uniform
    prior, v2), or log softmax(logits / row_tau) (v1). A class nobody predicts has a column sum below eps; the
    clamp (upstream's F.normalize eps) keeps its P~ tiny instead of dividing by ~0."""
    if not uniform_prior:
        return F.log_softmax(logits / row_tau, dim=1)
    samples, classes = logits.shape
    probs = F.softmax(logits / row_tau, dim=1)
    return torch.log(samples / classes * F.normalize(probs, p=1, dim=0, eps=eps) + eps)


def self_classifier_loss(views: Sequence[torch.Tensor], rows: slice, row_tau: float, col_tau: float,
                         num_global: int = 2, uniform_prior: bool = True, eps: float = 1e-12) -> torch.Tensor:
    """One head's loss, 1/|pairs| sum_{(i, j) in pairs} l(i, j) (module docstring), in float32.

    `views[v]` holds view v's logits of the whole global batch (gathered with gradients); `rows` selects this
    rank's samples, over which l(i, j) averages. Both softmaxes and the prior normalisation run over all rows.
    """
    views = [v.float() for v in views]
    targets = [batch_targets(v, col_tau, eps)[rows] for v in views]
    predictions = [class_log_predictions(v, row_tau, uniform_prior, eps)[rows] for v in views]
    pairs = view_pairs(len(views), num_global)
    return sum(-(targets[i] * predictions[j]).sum(dim=1).mean() for i, j in pairs) / len(pairs)
