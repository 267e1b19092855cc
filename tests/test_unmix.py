"""Un-Mix: mixtures against naive per-pixel code, the loss in both modes against the formulas written out."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clusterlab.data.mixing import cutmix, cutmix_box, mixup
from clusterlab.losses.unmix import unmix_loss


def test_mixup_pairs_each_image_with_its_mirror():
    x = torch.randn(5, 3, 4, 4)
    lam = 0.3
    out = mixup(x, lam)
    for i in range(5):
        assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[4 - i])


def naive_box(height, width, lam, cy, cx):
    """The CutMix reference's arithmetic, written with numpy as the original code does."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    return (int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height)),
            int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width)))


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.37, 0.5, 0.93, 1.0])
def test_cutmix_box_clipping_and_lambda_from_area(lam):
    rng = np.random.default_rng(0)
    for _ in range(50):
        height, width = int(rng.integers(4, 40)), int(rng.integers(4, 40))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        box = cutmix_box(height, width, lam, cy, cx)
        assert box == naive_box(height, width, lam, cy, cx)
        top, bottom, left, right = box
        assert 0 <= top <= bottom <= height and 0 <= left <= right <= width
        x = torch.arange(3 * 2 * height * width, dtype=torch.float32).reshape(3, 2, height, width)
        mixed, new_lam = cutmix(x, box)
        for i in range(3):  # naive: pixel by pixel, inside the box from the mirrored image
            for h in range(height):
                for w in range(width):
                    source = 2 - i if (top <= h < bottom and left <= w < right) else i
                    assert torch.equal(mixed[i, :, h, w], x[source, :, h, w])
        replaced = ((mixed != x).any(dim=1)[0]).float().mean().item()  # sample 0 differs exactly inside the box
        assert math.isclose(new_lam, 1 - replaced, abs_tol=1e-6)
        assert math.isclose(new_lam, 1 - (bottom - top) * (right - left) / (height * width))


def naive_term(predictor, codes, temperature):
    total = 0.0
    for i in range(predictor.shape[0]):
        logp = predictor[i] / temperature - torch.logsumexp(predictor[i] / temperature, dim=0)
        total = total - (codes[i] * logp).sum()
    return total / predictor.shape[0]


def naive_unmix(s0, s1, sm, q0, q1, qm, lam, t, mode):
    n = s0.shape[0]
    rev = list(range(n - 1, -1, -1))
    original = 0.5 * (naive_term(s1, q0, t) + naive_term(s0, q1, t))
    mixture = 0.5 * (naive_term(s1, qm, t) + naive_term(sm, q1, t))
    reversed_codes = qm[rev]
    if mode == "paper":  # the reversed mixture (holding x_i with weight 1 - lam) predicts x1_i's code
        second = naive_term(sm[rev], q1, t)
    else:  # upstream: the mixture itself, unreversed, predicts x1's code again
        second = naive_term(sm, q1, t)
    reverse = 0.5 * (naive_term(s1, reversed_codes, t) + second)
    return original + lam * mixture + (1 - lam) * reverse


@pytest.mark.parametrize("mode", ["faithful", "paper"])
def test_unmix_loss_matches_the_written_out_formula(mode):
    torch.manual_seed(0)
    n, k, t, lam = 6, 7, 0.1, 0.35
    scores = [torch.randn(n, k, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    codes = [torch.softmax(torch.randn(n, k, dtype=torch.float64), dim=1) for _ in range(3)]
    loss, parts = unmix_loss(*scores, *codes, lam, t, mode)
    expected = naive_unmix(*scores, *codes, lam, t, mode)
    assert torch.allclose(loss, expected, atol=1e-12)
    grads = torch.autograd.grad(loss, scores)
    naive_grads = torch.autograd.grad(naive_unmix(*scores, *codes, lam, t, mode), scores)
    for ours, theirs in zip(grads, naive_grads):
        assert torch.allclose(ours, theirs, atol=1e-12)
    assert set(parts) == {"swav", "mix", "mix_rev"}


def test_faithful_and_paper_differ_only_in_the_reversed_predictor():
    torch.manual_seed(1)
    n, k = 5, 4
    s0, s1, sm = (torch.randn(n, k) for _ in range(3))
    q0, q1, qm = (F.softmax(torch.randn(n, k), 1) for _ in range(3))
    faithful, _ = unmix_loss(s0, s1, sm, q0, q1, qm, 0.6, 0.1, "faithful")
    paper, _ = unmix_loss(s0, s1, sm, q0, q1, qm, 0.6, 0.1, "paper")
    gap = 0.4 * 0.5 * (naive_term(sm.flip(0), q1, 0.1) - naive_term(sm, q1, 0.1))
    assert torch.allclose(paper - faithful, gap, atol=1e-5)
    symmetric = torch.cat([sm[:2], sm[2:3], sm[:2].flip(0)])  # equal to its own reversal: the modes agree
    assert torch.allclose(unmix_loss(s0, s1, symmetric, q0, q1, qm, 0.6, 0.1, "faithful")[0],
                          unmix_loss(s0, s1, symmetric, q0, q1, qm, 0.6, 0.1, "paper")[0])
