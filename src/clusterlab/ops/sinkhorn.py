"""Sinkhorn-Knopp: equipartitioned soft assignments of samples to prototypes (SwAV, SeLa).

`sinkhorn` is SwAV's per-batch version (Caron et al., "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments", NeurIPS 2020, eq. 3 and appendix A.1). With scores S (B x K) and Q = exp(S / eps)^T, it
alternately rescales the rows (prototypes) of Q to sum to 1/K and the columns (samples) to sum to 1/B, so that Q
approaches the entropic optimal transport plan with uniform marginals. When torch.distributed is initialised the
row sums and the total are all-reduced: every rank then works on one problem over the global batch (local
columns are normalised locally because each column is one sample). Differences from upstream, on purpose: the
global maximum of S / eps is subtracted before the exponential (it cancels exactly in the first normalisation)
and the arithmetic runs in float32 or float64, never in half precision.
"""
from __future__ import annotations

import torch

from .. import distributed


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes (B x K, float32) for scores (B x K): each row sums to 1 and, summed over the samples of all ranks,
    each prototype's column to about B_global / K (exactly after the last row step, before the last column step).
    """
    logits = scores.detach().to(dtype) / epsilon
    peak = distributed.all_reduce_max(logits.max().reshape(1))
    q = torch.exp(logits - peak).t()  # K x B_local
    num_prototypes = q.shape[0]
    global_batch = distributed.all_reduce_sum(torch.tensor([q.shape[1]], dtype=dtype, device=q.device))
    q /= distributed.all_reduce_sum(q.sum().reshape(1))
    for _ in range(iterations):
        q /= distributed.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= global_batch
    q *= global_batch
    return q.t().float()
