"""SCAN's two losses: the neighbour-consistency loss of stage 2 and the confidence-based cross-entropy of the
self-labelling stage 3.

- Paper: Wouter Van Gansbeke, Simon Vandenhende, Stamatios Georgoulis, Marc Proesmans and Luc Van Gool, "SCAN:
  Learning to Classify Images without Labels", ECCV 2020, arXiv:2005.12320 (eq. 2 and eq. 3).
- Upstream code: wvangansbeke/Unsupervised-Classification@952ec31 losses/losses.py `SCANLoss`, `entropy`,
  `ConfidenceBasedCE` and `MaskedCrossEntropyLoss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed

# Upstream's EPS: the mean prediction is clamped below at it before its entropy is taken.
ENTROPY_EPS = 1e-8


def scan_loss(anchor_logits: torch.Tensor, neighbour_logits: torch.Tensor, entropy_weight: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, consistency, entropy) of one head for anchors a and one neighbour n(a) each (B x C logits):

        p(x) = softmax(logits of x)
        consistency = -1/B sum_a max(log <p(a), p(n(a))>, -100)   (torch's BCE against 1, as upstream)
        entropy     = H(q) = -sum_c q_c log q_c,  q = max(mean over the global batch of p(a), 1e-8)
        total       = consistency - entropy_weight * entropy

    The consistency is the mean over this rank's anchors (DDP's gradient average makes it the global batch's);
    the mean prediction q is summed over all ranks, so the entropy is that of the global batch. In float32.
    """
    anchor_probs = F.softmax(anchor_logits.float(), dim=1)
    neighbour_probs = F.softmax(neighbour_logits.float(), dim=1)
    similarity = (anchor_probs * neighbour_probs).sum(dim=1)
    # BCE against 1 is -log(similarity), clamped at -100 by torch with a finite gradient where it is 0. torch's BCE
    # raises on a NaN input (logits of a diverged step): the loss is NaN instead, for the engine's non-finite stop.
    consistency = F.binary_cross_entropy(similarity.nan_to_num(nan=1.0), torch.ones_like(similarity))
    consistency = torch.where(similarity.isnan().any(), float("nan"), consistency)
    count = distributed.all_reduce_sum(anchor_probs.new_full((), len(anchor_probs)))
    mean_probs = (distributed.all_reduce_sum_with_grad(anchor_probs.sum(dim=0)) / count).clamp(min=ENTROPY_EPS)
    entropy = -(mean_probs * mean_probs.log()).sum()
    return consistency - entropy_weight * entropy, consistency, entropy


def confident_targets(weak_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, mask): the argmax class of each weak view's softmax, and whether its probability exceeds
    `threshold` (strictly, as upstream)."""
    probs = F.softmax(weak_logits.float(), dim=1)
    confidence, targets = probs.max(dim=1)
    return targets, confidence > threshold


def class_balance_weights(targets: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Upstream's `apply_class_balancing`: w_c = n / n_c for the classes among the n confident targets of the global
    batch (n_c of them in class c), 1 for the classes none of them has."""
    counts = torch.zeros(num_classes, device=targets.device).index_add_(0, targets, mask.float())  # no host read
    counts = distributed.all_reduce_sum(counts)
    return torch.where(counts > 0, counts.sum() / counts.clamp(min=1), 1.0)


def confident_cross_entropy(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float,
                            balance: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, number of confident samples in the global batch) of self-labelling:

        t_i = argmax softmax(weak_i),  m_i = [max softmax(weak_i) > threshold]
        L = sum_i m_i w_{t_i} CE(strong_i, t_i) / sum_i m_i w_{t_i}

    over the global batch, w = class_balance_weights (balance) or 1: PyTorch's weighted cross-entropy with
    reduction 'mean' on the confident rows, as upstream. Each rank returns world_size x its share of the numerator
    over the global denominator, so DDP's average of the ranks' gradients is the gradient of L. No confident sample
    anywhere: the loss is 0 (upstream raises an error and stops the run; methods/scan_selflabel.py skips that step).
    """
    targets, mask = confident_targets(weak_logits, threshold)
    num_classes = strong_logits.shape[1]
    weights = (class_balance_weights(targets, mask, num_classes) if balance
               else torch.ones(num_classes, device=strong_logits.device))
    row_weights = weights[targets] * mask
    per_row = F.cross_entropy(strong_logits.float(), targets, reduction="none")
    totals = distributed.all_reduce_sum(torch.stack([row_weights.sum(), mask.sum().float()]))
    numerator = (row_weights * per_row).sum()
    # Each confident row weighs at least 1, so the total is 0 (numerator 0 too: loss 0) or at least 1; clamping
    # rather than testing it keeps the host from waiting for the device.
    return numerator * distributed.world_size() / totals[0].clamp(min=1), totals[1]
