"""Un-Mix's loss on top of SwAV's.

- Paper: Zhiqiang Shen, Zechun Liu, Zhuang Liu, Marios Savvides, Trevor Darrell and Eric Xing, "Un-Mix: Rethinking
  Image Mixtures for Unsupervised Visual Representation Learning", AAAI 2022, arXiv:2003.05438.
- Upstream code: szq0214/Un-Mix@0911f77 UnMix_SwAV/for_CIFAR/main_swav_unmix.py `train` (the mixed loss) and
  `swav_loss`.

With l(a -> q(b)) = "a's scores predict b's codes" (losses.swav.code_cross_entropy), x1 the second view, m the
mixture of the first view with its reversed batch, and `rev` the batch reversal:

    L = L_swav(x0, x1) + lam / 2 [l(x1 -> q(m)) + l(m -> q(x1))] + (1 - lam) / 2 [l(x1 -> q(rev m)) + R]

paper:    R = l(rev m -> q(x1)), the mixture's other component predicts its own view's code;
faithful: R = l(m -> q(x1)), what the upstream code computes (it reverses only the codes in the reverse call),
          so l(m -> q(x1)) carries weight 1 and l(rev m -> q(x1)) never appears.
"""
from __future__ import annotations

import torch

from .swav import code_cross_entropy, swav_loss

UNMIX_MODES = ("faithful", "paper")


def unmix_loss(scores_x0: torch.Tensor, scores_x1: torch.Tensor, scores_mix: torch.Tensor, codes_x0: torch.Tensor,
               codes_x1: torch.Tensor, codes_mix: torch.Tensor, lam: float, temperature: float,
               mode: str = "faithful") -> tuple[torch.Tensor, dict]:
    """The total loss and its three parts (original, mixture, reversed mixture)."""
    if mode not in UNMIX_MODES:
        raise ValueError(f"unknown Un-Mix mode {mode!r} (choose one of: {', '.join(UNMIX_MODES)})")
    original = swav_loss([scores_x0, scores_x1], {0: codes_x0, 1: codes_x1}, temperature)
    mixture = 0.5 * (code_cross_entropy(scores_x1, codes_mix, temperature)
                     + code_cross_entropy(scores_mix, codes_x1, temperature))
    reverse_predictor = scores_mix.flip(0) if mode == "paper" else scores_mix
    reverse = 0.5 * (code_cross_entropy(scores_x1, codes_mix.flip(0), temperature)
                     + code_cross_entropy(reverse_predictor, codes_x1, temperature))
    total = original + lam * mixture + (1 - lam) * reverse
    return total, {"swav": original.detach(), "mix": mixture.detach(), "mix_rev": reverse.detach()}
