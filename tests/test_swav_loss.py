"""SwAV's swapped-prediction loss (losses/swav.py) against a naive double loop over crops and samples.

Tolerances: loss value 1e-6 relative (float32 vs a float64 loop), gradients 1e-5 absolute.
"""
from __future__ import annotations

import math

import pytest
import torch

from clusterlab.losses.swav import code_cross_entropy, swav_loss
from dist_utils import single_thread  # noqa: F401 - autouse fixture: one intra-op thread

TAU = 0.1


def naive_swav_loss(scores, codes, temperature=TAU):
    """SwAV's loss (main_swav.py `train`) written out: mean over assignment crops c of the mean over crops v != c of
    -1/B sum_b sum_k q_c[b, k] log softmax(s_v[b] / tau)_k, softmax by hand, float64, one sample at a time."""
    total = 0.0
    for c, q in codes.items():
        per_crop = 0.0
        others = [v for v in range(len(scores)) if v != c]
        for v in others:
            s = scores[v].double() / temperature
            batch, k = s.shape
            ce = 0.0
            for b in range(batch):
                log_norm = torch.log(sum(torch.exp(s[b, j]) for j in range(k)))
                for j in range(k):
                    ce = ce - q[b, j].double() * (s[b, j] - log_norm)
            per_crop = per_crop + ce / batch
        total = total + per_crop / len(others)
    return total / len(codes)


def make_inputs(crops=4, batch=6, k=5, assign=(0, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = [(2 * torch.rand(batch, k, generator=g) - 1).requires_grad_() for _ in range(crops)]
    codes = {c: torch.softmax(3 * torch.randn(batch, k, generator=g), dim=1) for c in assign}
    return scores, codes


@pytest.mark.parametrize("crops,assign", [(2, (0, 1)), (4, (0, 1)), (3, (1,)), (4, (0, 2, 3))])
def test_value_equals_naive_double_loop(crops, assign):
    scores, codes = make_inputs(crops=crops, assign=assign)
    got = swav_loss(scores, codes, TAU)
    expected = naive_swav_loss(scores, codes)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-6)


def test_gradient_equals_autograd_of_naive_form_and_closed_form():
    scores, codes = make_inputs(crops=4, batch=5, k=4, assign=(0, 1), seed=1)
    grads = torch.autograd.grad(swav_loss(scores, codes, TAU), scores)
    naive_grads = torch.autograd.grad(naive_swav_loss(scores, codes), scores)
    # Closed form: d l(v, c) / d s_v = (softmax(s_v / tau) - q_c) / (tau B), averaged over the other crops of each
    # assignment crop and over the assignment crops.
    batch = scores[0].shape[0]
    for v, (g, ng) in enumerate(zip(grads, naive_grads)):
        torch.testing.assert_close(g.double(), ng.double(), rtol=0, atol=1e-5)
        closed = sum((torch.softmax(scores[v].detach().double() / TAU, 1) - q.double()) / (TAU * batch)
                     / (len(scores) - 1) for c, q in codes.items() if c != v) / len(codes)
        torch.testing.assert_close(g.double(), torch.as_tensor(closed, dtype=torch.float64).expand_as(g),
                                   rtol=0, atol=1e-5)


def test_the_loss_is_a_plain_cross_entropy_in_the_codes():
    """swav_loss itself detaches nothing: its gradient with respect to the codes is the cross-entropy's, so that the
    codes' being targets is the caller's doing (the method computes them without a graph, under no_grad)."""
    scores, codes = make_inputs()
    codes = {c: q.requires_grad_() for c, q in codes.items()}
    loss = swav_loss(scores, codes, TAU)
    grad_codes = torch.autograd.grad(loss, list(codes.values()))
    # d loss / d q_c = -log softmax(s_v / tau) / (B (V - 1) |A|) summed over v: a plain cross-entropy, no detach trap.
    batch = scores[0].shape[0]
    for (c, q), g in zip(codes.items(), grad_codes):
        expected = -sum(torch.log_softmax(scores[v].detach() / TAU, 1) for v in range(len(scores)) if v != c)
        torch.testing.assert_close(g, expected / (batch * (len(scores) - 1) * len(codes)), rtol=1e-5, atol=1e-7)


def test_code_cross_entropy_equals_one_hot_nll():
    g = torch.Generator().manual_seed(2)
    scores, targets = torch.randn(7, 6, generator=g), torch.randint(0, 6, (7,), generator=g)
    one_hot = torch.nn.functional.one_hot(targets, 6).float()
    torch.testing.assert_close(code_cross_entropy(scores, one_hot, TAU),
                               torch.nn.functional.cross_entropy(scores / TAU, targets), rtol=1e-6, atol=1e-6)


def test_half_precision_scores_are_computed_in_float32():
    scores, codes = make_inputs(seed=3)
    half = [s.detach().bfloat16() for s in scores]
    got = swav_loss(half, codes, TAU)
    assert got.dtype == torch.float32
    expected = naive_swav_loss([s.float() for s in half], codes)
    assert math.isclose(got.item(), expected.item(), rel_tol=1e-6)
