"""SeLa's whole-dataset Sinkhorn-Knopp (ops/sinkhorn.sela_sinkhorn) against a naive dense numpy version of the
self-label code's loop, and 2 gloo processes holding shards of the samples against 1 process.

Tolerances: beta and alpha agree with the naive float64 loop to 1e-9 relative (both are float64; only the order of
summation differs); the column marginals of Q are 1/N to 1e-12 relative (they are exact after the last beta
step); the row marginals approach 1/K as the tolerance shrinks (checked to 1e-6 at tol 1e-10). Labels and iteration
counts must be equal, exactly.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterlab.ops.sinkhorn import sela_sinkhorn
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture


def naive_sela(p_lambda: np.ndarray, tol: float, check_every: int = 10):
    """Upstream's loop (self-label's cifar.py optimize_L_sk) on a dense K x N matrix P^lambda: alpha, beta, labels,
    iterations, error."""
    classes, samples = p_lambda.shape
    beta = np.full(samples, 1.0 / samples)
    error, counter = math.inf, 0
    while error > tol:
        alpha = np.array([(1.0 / classes) / np.dot(p_lambda[k], beta) for k in range(classes)])
        new_beta = np.array([(1.0 / samples) / np.dot(p_lambda[:, n], alpha) for n in range(samples)])
        if counter % check_every == 0:
            error = float(np.nansum(np.abs(beta / new_beta - 1)))
        beta = new_beta
        counter += 1
    labels = np.array([int(np.argmax(alpha * p_lambda[:, n])) for n in range(samples)])
    return alpha, beta, labels, counter, error


def p_power(logits: torch.Tensor, lamb: float) -> np.ndarray:
    """P^lambda, K x N, from softmax probabilities the plain way (what upstream computes)."""
    return torch.softmax(logits.double(), dim=1).numpy().T ** lamb


def random_logits(samples: int, classes: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    return scale * torch.randn(samples, classes, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("lamb, tol", [(10.0, 0.01), (25.0, 0.1), (10.0, 1e-6)])
def test_matches_the_naive_loop(lamb, tol):
    logits = random_logits(240, 7)
    alpha, beta, labels, iterations, error = naive_sela(p_power(logits, lamb), tol)
    out = sela_sinkhorn(logits, lamb, tol)
    assert out.labels.dtype == torch.int64 and out.labels.tolist() == labels.tolist()
    assert out.iterations == iterations and math.isclose(out.error, error, rel_tol=1e-6, abs_tol=1e-15)
    np.testing.assert_allclose(out.beta.numpy(), beta, rtol=1e-9)
    np.testing.assert_allclose(out.log_alpha.exp().numpy(), alpha, rtol=1e-9)


def test_marginals_are_uniform():
    logits = random_logits(300, 9, seed=1)
    lamb = 10.0
    out = sela_sinkhorn(logits, lamb, tol=1e-10)
    log_p = lamb * torch.log_softmax(logits.double(), dim=1)
    q = torch.exp(out.log_alpha[None, :] + log_p) * out.beta[:, None]  # N x K
    torch.testing.assert_close(q.sum(1), torch.full((300,), 1 / 300, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(q.sum(0), torch.full((9,), 1 / 9, dtype=torch.float64), rtol=1e-6, atol=0)
    # The labels are argmax_k Q_nk (beta_n is constant along a row of Q here).
    assert out.labels.tolist() == q.argmax(1).tolist()


@pytest.mark.parametrize("check_every", [10, 3])
def test_stopping_rule_checks_on_iterations_1_then_every_check_every(check_every):
    logits = random_logits(120, 5, seed=2)
    counts = set()
    for tol in (1.0, 0.1, 1e-3, 1e-8):
        out = sela_sinkhorn(logits, 10.0, tol, check_every=check_every)
        assert out.iterations % check_every == 1 and out.error <= tol
        assert out.iterations == naive_sela(p_power(logits, 10.0), tol, check_every)[3]
        counts.add(out.iterations)
    assert len(counts) > 1


def test_max_iterations_caps_the_loop():
    out = sela_sinkhorn(random_logits(50, 4, seed=3), 10.0, tol=0.0, max_iterations=5)
    assert out.iterations == 5


def test_a_lambda_whose_power_underflows_says_it_did_not_solve():
    """Confident rows next to near-uniform ones at lambda 10000: the near-uniform rows' P^lambda is 0 in float64 even
    after the shift, the scalings turn infinite or NaN, and the stopping rule (a nansum, as upstream's) reads 0."""
    logits = torch.cat([random_logits(20, 5, scale=10.0, seed=6), random_logits(20, 5, scale=0.01, seed=7)])
    out = sela_sinkhorn(logits, 10_000.0, tol=0.01)
    assert out.error == 0 and not out.solved
    assert not (torch.isfinite(out.beta).all() and torch.isfinite(out.log_alpha).all())
    assert sela_sinkhorn(logits, 10.0, tol=0.01).solved


def test_near_uniform_probabilities_with_a_large_lambda_do_not_underflow():
    """lambda log K > 745: a random network's near-uniform P^lambda is 0 in float64 everywhere, upstream's loop
    divides by 0. The shifted form solves the same problem, which the naive loop solves once P^lambda is scaled."""
    logits = random_logits(200, 50, scale=0.01, seed=4)
    lamb = 200.0
    assert (p_power(logits, lamb) == 0).all()
    out = sela_sinkhorn(logits, lamb, tol=0.01)
    assert torch.isfinite(out.beta).all() and torch.isfinite(out.log_alpha).all() and out.solved
    log_p = lamb * torch.log_softmax(logits.double(), dim=1)
    scaled = torch.exp(log_p - log_p.max()).numpy().T  # P^lambda times one constant: same labels and beta
    _, beta, labels, iterations, _ = naive_sela(scaled, 0.01)
    assert out.labels.tolist() == labels.tolist() and out.iterations == iterations
    np.testing.assert_allclose(out.beta.numpy(), beta, rtol=1e-9)


# ---- distributed: each rank holds a shard of the samples ------------------------------------------------------------

SHARDS = {"uneven": (170, 130), "empty_rank": (300, 0)}


def _shard_worker(rank, world, logits, shards):
    out = {}
    for name, sizes in shards.items():
        start = sum(sizes[:rank])
        solution = sela_sinkhorn(logits[start: start + sizes[rank]], 10.0, 0.01)
        out[name] = solution._asdict()
    return out


@pytest.fixture(scope="module")
def two_process_solutions():
    logits = random_logits(300, 8, seed=5)
    return logits, run_distributed(_shard_worker, 2, logits, SHARDS)


@pytest.mark.parametrize("shards", sorted(SHARDS))
def test_two_processes_equal_one_process(two_process_solutions, shards):
    logits, results = two_process_solutions
    one = sela_sinkhorn(logits, 10.0, 0.01)
    parts = [r[shards] for r in results]
    assert torch.cat([p["labels"] for p in parts]).tolist() == one.labels.tolist()
    torch.testing.assert_close(torch.cat([p["beta"] for p in parts]), one.beta, rtol=1e-9, atol=0)
    for part in parts:
        assert part["iterations"] == one.iterations and part["solved"] is one.solved is True
        torch.testing.assert_close(part["log_alpha"], one.log_alpha, rtol=1e-9, atol=1e-12)


def test_the_iterations_stop_once_the_error_is_at_most_the_tolerance():
    """Upstream stops when err <= tol: a tolerance equal to the first check's error stops at that check."""
    scores = torch.randn(200, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first = sela_sinkhorn(scores, 10.0, tol=0.0, max_iterations=1)
    again = sela_sinkhorn(scores, 10.0, tol=first.error)
    assert again.iterations == 1 and again.error == first.error


@pytest.mark.parametrize("classes", [7, 3000])
def test_solving_in_the_scores_storage_gives_the_same_solution_to_the_bit(monkeypatch, classes):
    """`overwrite_scores` keeps one N x K float64 matrix (the log-softmax row chunk by row chunk, here chunks of a few
    rows): labels, beta, log alpha, iterations and error equal those of a copy; float32 scores are never written."""
    from clusterlab.ops import sinkhorn

    monkeypatch.setattr(sinkhorn, "rows_per_chunk", lambda row_length: 3)
    scores = torch.randn(257, classes, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    copied = sela_sinkhorn(scores, 10.0, 0.01)
    owned = scores.clone()
    in_place = sela_sinkhorn(owned, 10.0, 0.01, overwrite_scores=True)
    assert not torch.equal(owned, scores)  # its storage did the work
    for field in ("labels", "beta", "log_alpha"):
        assert torch.equal(getattr(in_place, field), getattr(copied, field)), field
    assert (in_place.iterations, in_place.error) == (copied.iterations, copied.error)
    single = scores.float()
    kept = single.clone()
    assert torch.equal(sela_sinkhorn(single, 10.0, 0.01, overwrite_scores=True).labels,
                       sela_sinkhorn(kept, 10.0, 0.01).labels) and torch.equal(single, kept)
