"""Super-AND's three losses.

- Paper: Sungwon Han, Yizhan Xu, Sungwon Park, Meeyoung Cha and Cheng-Te Li, "A Comprehensive Approach to
  Unsupervised Embedding Learning based on AND Algorithm" (Super-AND), arXiv:2002.12158, 2020.
- Upstream code: super-AND/super-AND@5a0e5ca lib/criterion.py (the three criteria) and main.py `train` (how they
  are weighted and where the UE mask is set); EmbedUL/EmbedUL@4027eab lib/criterion.py holds the same AUG loss.

Rows are the 2B views of a batch (view 1 block, then view 2 block); the non-parametric classifier's logits are
O = f M^T / T over the N memory bank entries (T = --bank_t).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

UE_OWN_LOGIT = -10.0


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or in float64 if it already is: the losses' sums over N columns need at least float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def and_loss(logits: torch.Tensor, own: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Neighbourhood discovery (Huang, Dong, Gong and Zhu, "Unsupervised Deep Learning by Neighbourhood
    Discovery", ICML 2019): with p_i = softmax(O_i),
    L = -1/R sum_i log( p_{i, own_i} + sum_{j in Omega_i} p_{i, j} ),
    Omega_i = the entries >= 0 of neighbours[i] (R x S; all -1 for an instance, i.e. not an anchor).

    Computed in logs, as autograd's log-softmax did, so that a picked mass below float32's range stays finite:
    L_i = logsumexp_j O_ij - logsumexp_{c in {own_i} + Omega_i} O_ic. The gradient is written out: with s_i the
    softmax over the picked columns, dL/dO_ij = (p_ij - s_ij) / R (a column picked twice counts twice). One R x N
    buffer each way instead of autograd's chain of log-softmax, gather and their backward (bench/RESULTS.md,
    "Super-AND's AND and AUG")."""
    columns = torch.cat([own[:, None], neighbours], dim=1)
    with torch.autocast(logits.device.type, enabled=False):
        return _NeighbourhoodLikelihood.apply(at_least_float32(logits), columns)


class _NeighbourhoodLikelihood(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, columns):
        top = logits.amax(dim=1, keepdim=True)
        p = torch.sub(logits, top).exp_()
        normaliser = p.sum(dim=1, keepdim=True)
        p.div_(normaliser)
        picked = logits.gather(1, columns.clamp(min=0)).masked_fill_(columns < 0, float("-inf"))
        ctx.save_for_backward(p, columns, torch.softmax(picked, dim=1))
        return (top + normaliser.log() - torch.logsumexp(picked, dim=1, keepdim=True)).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        p, columns, picked_softmax = ctx.saved_tensors
        scale = grad_loss / p.shape[0]
        grad = torch.mul(p, scale)
        return grad.scatter_add_(1, columns.clamp(min=0), picked_softmax.mul(-scale)), None


def aug_loss(similarities: torch.Tensor, own: torch.Tensor, partner: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """Augmentation invariance (Ye, Zhang, Yuen and Chang, "Unsupervised Embedding Learning via Invariant and
    Spreading Instance Feature", CVPR 2019, with batch_m = 1). `similarities` (R x C): x_i . x_j of each row's
    L2-normalised vector against all C columns of the (global) batch, the columns detached; own[i] is row i's own
    column, partner[i] its other view's.
    a_ij = exp(s_ij / T) for j != own_i, D_i = sum_j a_ij, P_i = a_{i,partner_i} / D_i, P_ij = a_ij / D_i,
    L = -1/R sum_i [ log P_i + sum_{j not in {own_i, partner_i}} log(1 - P_ij) ].
    Each row's exponents are shifted by their largest (a factor that cancels in every P_ij, as upstream has none):
    exp(s_ij / T) overflowed float32 from T below 1/88, and the loss was NaN at the first step."""
    rows = torch.arange(similarities.shape[0], device=similarities.device)
    others = at_least_float32(similarities)
    others = others.index_put((rows, own), others.new_tensor(float("-inf")))
    scores = torch.exp((others - others.max(dim=1, keepdim=True).values.detach()) / temperature)
    probabilities = scores / scores.sum(dim=1, keepdim=True)
    negatives = torch.log1p(-probabilities).index_put((rows, partner), scores.new_zeros(())).sum(dim=1)
    return -(torch.log(probabilities[rows, partner]) + negatives).mean()


def ue_loss(logits: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
    """Unification entropy (Super-AND's UE loss): q_i = softmax(O_i) with, when `own` is given, the row's own
    logit set to -10 first; L = -1/R sum_i sum_j q_ij log q_ij. The masked entropy is the paper's loss and what
    super-AND's main.py computes at the pinned commit 5a0e5ca (in the rows of both views; EmbedUL's copy too).
    `own=None`, the unmasked entropy, exists only in super-AND's first commit 05ce30f, where a leftover line
    overwrote the masked value; the next commit, eab79e5, removed it.

    The gradient is written out: with H_i the row's entropy, dL/dO_ij = -q_ij (log q_ij + H_i) / R, and 0 at a
    masked own logit (a constant). Fewer R x N buffers and passes than autograd's chain of masking,
    log-softmax, exponential and product (bench/RESULTS.md, "Super-AND's UE loss")."""
    with torch.autocast(logits.device.type, enabled=False):
        return _UnificationEntropy.apply(at_least_float32(logits), own)


class _UnificationEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, own):
        if own is not None:
            logits = logits.scatter(1, own[:, None], UE_OWN_LOGIT)
        log_q = F.log_softmax(logits, dim=1)
        # q may reuse the masked copy's memory, never the caller's logits.
        q = torch.exp(log_q, out=logits) if own is not None else log_q.exp()
        entropy = -(q * log_q).sum(dim=1)  # a sum, not bmm: bmm's 60k-long float32 dot drifts 1e-4
        ctx.save_for_backward(q, log_q, entropy, own)
        return entropy.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        q, log_q, entropy, own = ctx.saved_tensors
        grad = torch.add(log_q, entropy[:, None]).mul_(q).mul_(-grad_loss / q.shape[0])
        if own is not None:
            grad.scatter_(1, own[:, None], 0.0)
        return grad, None
