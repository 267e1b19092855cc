"""Sinkhorn-Knopp (ops/sinkhorn.py) against a naive float64 reference, and 2 gloo processes against 1.

Tolerances: float32 path vs the float64 reference 2e-6 absolute on codes in [0, 1] (2e-4 for scores near 50,
whose float32 logits near 1000 round at 6e-5); float64 path 1e-7 (the output is float32 by contract);
2 processes vs 1 process 1e-6.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clusterlab.ops.sinkhorn import sinkhorn
from conftest import HostCopies
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

EPS = 0.05


def naive_sinkhorn(scores: torch.Tensor, epsilon: float = EPS, iterations: int = 3) -> torch.Tensor:
    """SwAV's 2021 reference (main_swav.py distributed_sinkhorn) in float64, one process, no max subtraction,
    explicit loops."""
    q = torch.exp(scores.double() / epsilon).t().clone()  # K x B
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row] = q[row] / q[row].sum() / k
        for col in range(b):
            q[:, col] = q[:, col] / q[:, col].sum() / b
    return (q * b).t()


def cosine_scores(batch: int, prototypes: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """What SwAV feeds the Sinkhorn: cosine similarities of unit embeddings and unit prototypes."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return z @ c.t()


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_matches_naive_reference(iterations):
    scores = cosine_scores(24, 7)
    expected = naive_sinkhorn(scores, iterations=iterations)
    codes = sinkhorn(scores, EPS, iterations)
    assert codes.dtype == torch.float32 and codes.shape == (24, 7)
    torch.testing.assert_close(codes.double(), expected, rtol=0, atol=2e-6)


def test_float64_path_matches_reference_tightly():
    scores = cosine_scores(30, 5, seed=1)
    codes = sinkhorn(scores, EPS, 3, dtype=torch.float64)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.double(), naive_sinkhorn(scores), rtol=0, atol=1e-7)


def test_rows_sum_to_one_and_columns_approach_equipartition():
    batch, k = 32, 10
    scores = cosine_scores(batch, k, seed=2)
    deviations = []
    for iterations in (1, 3, 10, 30, 200):
        codes = sinkhorn(scores, EPS, iterations, dtype=torch.float64)
        torch.testing.assert_close(codes.sum(1), torch.ones(batch), rtol=0, atol=1e-6)
        assert (codes >= 0).all()
        deviations.append(((codes.sum(0) / (batch / k)) - 1).abs().max().item())
    # Each prototype column sums to about B/K: loosely after the default 3 iterations, more tightly with more.
    assert deviations[1] < 0.75
    assert all(later < earlier for earlier, later in zip(deviations, deviations[1:]))
    assert deviations[-1] < 1e-4


def test_invariant_to_a_constant_added_to_all_scores():
    """In float64: float32 scores + 3 lose low bits, and the two float32 results then differ by about 1e-6, more or
    less depending on the CPU's kernels."""
    scores = cosine_scores(16, 6, seed=3).double()
    base = sinkhorn(scores, dtype=torch.float64)
    for shift in (-0.7, 3.0):
        torch.testing.assert_close(sinkhorn(scores + shift, dtype=torch.float64), base, rtol=0, atol=1e-12)


def test_large_scores_do_not_overflow():
    """Scores around 50 (logits around 50 / eps = 1000): exp overflows even in float64 without the max shift."""
    scores = 50.0 + cosine_scores(16, 6, seed=4)
    assert not torch.isfinite(torch.exp(scores.double() / EPS)).all()  # the naive form would break
    # float32 logits near 1000 carry an absolute rounding error of about 6e-5, hence its looser tolerance.
    for dtype, atol in ((torch.float32, 2e-4), (torch.float64, 2e-6)):
        codes = sinkhorn(scores, EPS, 3, dtype=dtype)
        assert torch.isfinite(codes).all()
        torch.testing.assert_close(codes.double(), naive_sinkhorn(scores - 50.0), rtol=0, atol=atol)


def test_detached_and_no_graph():
    scores = cosine_scores(8, 4).requires_grad_()
    codes = sinkhorn(scores)
    assert not codes.requires_grad


# ---- distributed: every rank holds part of the global batch ---------------------------------------------------------

SPLITS = {"even": (12, 12), "uneven": (9, 15)}


def _sinkhorn_worker(rank, world, scores, splits):
    out = {}
    for name, sizes in splits.items():
        start = sum(sizes[:rank])
        local = scores[start: start + sizes[rank]]
        out[name] = {"f32": sinkhorn(local, EPS, 3), "f64": sinkhorn(local, EPS, 3, dtype=torch.float64),
                     "shifted": sinkhorn(local + 50.0, EPS, 3)}
    return out


@pytest.fixture(scope="module")
def two_process_codes():
    scores = cosine_scores(24, 5, seed=5)
    return scores, run_distributed(_sinkhorn_worker, 2, scores, SPLITS)


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_two_processes_equal_one_process_on_the_concatenated_batch(two_process_codes, split):
    scores, results = two_process_codes
    for key, dtype in (("f32", torch.float32), ("f64", torch.float64)):
        one = sinkhorn(scores, EPS, 3, dtype=dtype)
        two = torch.cat([results[0][split][key], results[1][split][key]])
        torch.testing.assert_close(two, one, rtol=0, atol=1e-6)
    # ... and both equal the naive single-process reference.
    torch.testing.assert_close(torch.cat([r[split]["f32"] for r in results]).double(), naive_sinkhorn(scores),
                               rtol=0, atol=2e-6)


def test_two_processes_with_large_scores(two_process_codes):
    """All scores shifted by +50 (logits around 1000) on both ranks: finite, and the same codes as unshifted."""
    scores, results = two_process_codes
    for split in SPLITS:
        got = torch.cat([r[split]["shifted"] for r in results])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), naive_sinkhorn(scores), rtol=0, atol=2e-4)  # float32, as above


def test_sinkhorn_on_a_device_never_waits_for_it():
    scores = torch.empty(64, 30, device="meta")  # stands for a GPU: copies from the host counted, reads fail
    with HostCopies() as copies:
        codes = sinkhorn(scores)
    assert copies.blocking == 0 and codes.shape == scores.shape
