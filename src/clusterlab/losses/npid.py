"""NPID's instance-discrimination losses on a memory bank.

- Paper: Zhirong Wu, Yuanjun Xiong, Stella X. Yu and Dahua Lin, "Unsupervised Feature Learning via Non-Parametric
  Instance Discrimination", CVPR 2018, arXiv:1805.01978 (eq. 2 and 5-7).
- Upstream code: zhirongw/lemniscate.pytorch@f7cfe29 lib/LinearAverage.py (full softmax, with
  nn.CrossEntropyLoss), lib/NCEAverage.py (the scores and Z), lib/NCECriterion.py (the NCE loss).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

NCE_EPS = 1e-7


def instance_softmax_loss(features: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """Full non-parametric softmax (Wu et al. eq. 2): with logits s = f M^T / tau (B x N, M the memory bank),
    L = -1/B sum_b log( exp(s[b, i_b]) / sum_j exp(s[b, j]) ), i_b the sample's own index.

    The gradient, dL/df = (softmax(s) M - M[i]) / (B tau), is written out: the B x N logits turn into the
    probabilities in place and are the only N-wide buffer of the step, where autograd's chain (product, division,
    cross-entropy) allocates and sweeps several (bench/RESULTS.md, "NPID's full softmax"). M is a constant: the
    bank is updated from the embeddings, never by gradient."""
    if bank.requires_grad:
        raise ValueError("instance_softmax_loss: the memory bank must not require a gradient")
    # In the bank's precision also under autocast, where the backward's product would meet bf16 probabilities.
    with torch.autocast(features.device.type, enabled=False):
        return _InstanceSoftmax.apply(features.to(bank.dtype), bank, indices, temperature)


class _InstanceSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, bank, indices, temperature):
        logits = torch.mm(features, bank.t()).div_(temperature)
        own = logits.gather(1, indices[:, None])
        peak = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        total = probs.sum(dim=1, keepdim=True)
        loss = (total.log() + peak - own).mean()
        ctx.save_for_backward(probs.div_(total), bank, indices)
        ctx.temperature = temperature
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        probs, bank, indices = ctx.saved_tensors
        scale = grad_loss / (indices.shape[0] * ctx.temperature)
        return (torch.mm(probs, bank) - bank[indices]) * scale, None, None, None


def nce_scores(similarities: torch.Tensor, temperature: float, z: torch.Tensor) -> torch.Tensor:
    """P(i | v) ~ exp(v . f / tau) / Z (Wu et al. eq. 5-6) for the K + 1 columns (own index first)."""
    return torch.exp(similarities.float() / temperature) / z


def nce_loss(scores: torch.Tensor, num_samples: int) -> torch.Tensor:
    """NCE (Wu et al. eq. 7, as NCECriterion): with K = columns - 1 noise samples drawn uniformly, P_n = 1/N and
    h(P) = P / (P + K P_n + 1e-7),
    L = -1/B [ sum_b log h(P_b0) + sum_b sum_{k=1..K} log(K P_n / (P_bk + K P_n + 1e-7)) ],
    the second term being log(1 - h(P_bk)) written as upstream computes it."""
    k = scores.shape[1] - 1
    noise = k / num_samples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + NCE_EPS))
    negative = torch.log(noise / (scores[:, 1:] + noise + NCE_EPS))
    return -(positive.sum() + negative.sum()) / scores.shape[0]
