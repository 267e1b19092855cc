"""Sinkhorn-Knopp: equipartitioned assignments of samples to prototypes or classes (SwAV, SeLa).

`sinkhorn` is SwAV's per-batch version (Caron et al., "Unsupervised Learning of Visual Features by Contrasting
Cluster Assignments", NeurIPS 2020, eq. 3 and appendix A.1). With scores S (B x K) and Q = exp(S / eps)^T, it
alternately rescales the rows (prototypes) of Q to sum to 1/K and the columns (samples) to sum to 1/B, so that Q
approaches the entropic optimal transport plan with uniform marginals. When torch.distributed is initialised the
row sums and the total are all-reduced: every rank then works on one problem over the global batch (local
columns are normalised locally because each column is one sample). Differences from upstream, on purpose: the
global maximum of S / eps is subtracted before the exponential (it cancels exactly in the first normalisation),
and the scores come in float32 (upstream's apex AMP O1 hands over fp16 scores, then exponentiates and iterates in
float32); the arithmetic runs in float32 or float64.

`sela_sinkhorn` is SeLa's whole-dataset version: fixed marginals, iterated to a tolerance instead of a fixed number
of steps, hard labels out. The samples are spread over the ranks the same way (one column per sample), so the same
all-reduce of the per-class sums makes W processes solve the one problem over the whole dataset.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import distributed
from . import rows_per_chunk


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
    global_batch = distributed.all_reduce_sum(q.new_full((1,), q.shape[1]))  # filled on the device: no host copy
    q /= distributed.all_reduce_sum(q.sum().reshape(1))
    for _ in range(iterations):
        q /= distributed.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= global_batch
    q *= global_batch
    return q.t().float()


class SelaSolution(NamedTuple):
    labels: torch.Tensor     # (N_local,) int64: argmax_k alpha_k P_kn^lambda for this rank's samples
    log_alpha: torch.Tensor  # (K,) float64, the same on every rank
    beta: torch.Tensor       # (N_local,) float64
    iterations: int
    error: float             # the last stopping-rule value, sum_n |beta_old / beta_new - 1| over all samples
    solved: bool             # False where some rank's scalings are not finite: labels and error mean nothing then


@torch.no_grad()
def sela_sinkhorn(scores: torch.Tensor, lamb: float, tol: float, check_every: int = 10,
                  max_iterations: int = 100_000, overwrite_scores: bool = False) -> SelaSolution:
    """Hard labels of a whole dataset under an equipartition constraint: SeLa's Sinkhorn-Knopp.

    Asano, Rupprecht and Vedaldi, "Self-labelling via simultaneous clustering and representation learning",
    ICLR 2020, arXiv:1911.05371, section 3; upstream yukimasano/self-label@3891e37 cifar.py `optimize_L_sk` and
    sinkhornknopp.py `cpu_sk`. With P (K x N) the softmax of every sample's `scores` over the K
    classes, the transport plan is Q = diag(alpha) P^lambda diag(beta) with marginals r = 1/K (classes) and
    c = 1/N (samples), found by alternating, from beta = 1/N,

        alpha <- (1/K) / (P^lambda beta),    beta <- (1/N) / ((P^lambda)^T alpha)

    in float64. Stopping rule as upstream: on the 1st, 11th, 21st, ... iteration (`check_every`) the error
    sum_n |beta_old / beta_new - 1| over all samples is computed and the loop ends once it is <= `tol` (0.01
    in the CIFAR code, 0.1 in the ImageNet code), or after `max_iterations`. Label of sample n:
    argmax_k alpha_k P_kn^lambda (beta_n is constant along the column). `solved` is False, on every rank, where
    the scalings of any rank are not finite (P^lambda underflowed to 0 for whole images or classes).

    Distributed: `scores` (N_local x K, logits or log-probabilities) holds only this rank's samples; the
    K-vectors P^lambda beta and the error are all-reduced, so every rank iterates the problem over all N
    samples while holding N_local x K values (float64) itself. Stability: log P^lambda = lambda log_softmax
    is formed in float64 and shifted by its global maximum before the exponential. A constant factor on
    P^lambda is absorbed by alpha and leaves every beta iterate unchanged, so labels, iterations and beta
    are exactly those of the unshifted problem (returned log_alpha is in its scale), while near-uniform
    columns no longer underflow to 0 when lambda log K exceeds ~745 (a random network at the first labelling).

    Memory: N_local x K float64 values is the size of the problem (29 GiB for ImageNet's 1.28 M images and 3,000
    classes on one process). `overwrite_scores` with float64 `scores` works in their storage (the caller's logits
    are then lost), so that no second such matrix exists; the result is the same to the bit.
    """
    if overwrite_scores and scores.dtype == torch.float64:
        log_p = scores.detach()
        rows = rows_per_chunk(log_p.shape[1])
        for chunk in log_p.split(rows):  # row by row, as log_softmax of the whole: each row is its own
            chunk.copy_(torch.log_softmax(chunk, dim=1))
    else:
        log_p = torch.log_softmax(scores.detach().double(), dim=1)
    log_p.mul_(lamb)  # N_local x K: log P^lambda
    local, classes = log_p.shape
    local_peak = log_p.max().reshape(1) if local else log_p.new_full((1,), float("-inf"))
    peak = distributed.all_reduce_max(local_peak)
    p = log_p.sub_(peak).exp_()
    total = int(distributed.all_reduce_sum(torch.tensor([local], device=p.device)).item())
    beta = p.new_full((local,), 1.0 / total)
    error, iterations = float("inf"), 0
    while iterations < max_iterations:
        alpha = (1.0 / classes) / distributed.all_reduce_sum(p.t() @ beta)
        new_beta = (1.0 / total) / (p @ alpha)
        check = iterations % check_every == 0
        if check:
            error = float(distributed.all_reduce_sum(torch.nansum(torch.abs(beta / new_beta - 1)).reshape(1)))
        beta = new_beta
        iterations += 1
        if check and error <= tol:
            break
    # A lambda too large underflows P^lambda to 0 for whole images or classes even in float64: the scalings turn
    # infinite or NaN, and the stopping rule's sum (a nansum, as upstream's) reads 0 as if solved.
    unsolved = ~(torch.isfinite(beta).all() & torch.isfinite(alpha).all())
    solved = not distributed.all_reduce_max(unsolved.double().reshape(1)).item()
    labels = p.mul_(alpha).argmax(dim=1)
    return SelaSolution(labels, alpha.log() - peak, beta, iterations, error, solved)
