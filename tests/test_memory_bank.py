"""The memory bank of NPID and Super-AND (ops/memory_bank.py).

- initialisation: uniform in [-sqrt(3/d), sqrt(3/d)], not normalised, a function of the seed only;
- update = a naive per-row loop v <- normalise(m v + (1 - m) f) (1e-6), rows outside the batch untouched (exact);
- duplicates: every candidate comes from the bank before the step and the last position wins (exact against the
  loop), so Super-AND's [view 1; view 2] layout keeps view 2;
- 2 gloo processes, each with half the batch (and each holding [view 1; view 2] of its own half), end with the bank
  one process gets from the full batch, bit for bit;
- the bank is a plain tensor in the state dict, loadable with weights_only.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from clusterlab.ops.memory_bank import MemoryBank, last_occurrence
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

N, D, M = 20, 6, 0.5


def naive_update(bank: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, momentum: float) -> torch.Tensor:
    """Row by row, in order; candidates from the old bank; a later position overwrites an earlier one."""
    old, new = bank.clone(), bank.clone()
    for i, f in zip(indices.tolist(), features):
        v = momentum * old[i] + (1 - momentum) * f
        new[i] = v / math.sqrt(float((v * v).sum()))
    return new


def features(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_initialisation_is_uniform_unnormalised_and_seeded():
    bank = MemoryBank(5000, 128, M, seed=3).weight
    bound = math.sqrt(3 / 128)
    assert bank.shape == (5000, 128) and bank.abs().max() <= bound
    assert abs(bank.min().item() + bound) < 1e-3 and abs(bank.max().item() - bound) < 1e-3
    norms = bank.norm(dim=1)
    assert abs(norms.mean().item() - 1) < 0.01 and norms.std() > 0.01  # about 1 on average, not normalised
    assert torch.equal(bank, MemoryBank(5000, 128, M, seed=3).weight)
    assert not torch.equal(bank, MemoryBank(5000, 128, M, seed=4).weight)


def test_update_matches_a_per_row_loop_and_leaves_other_rows():
    memory = MemoryBank(N, D, M, seed=0)
    before = memory.weight.clone()
    indices, f = torch.tensor([3, 17, 0, 9]), features(4, 1)
    memory.update(indices, f)
    torch.testing.assert_close(memory.weight, naive_update(before, indices, f, M), rtol=0, atol=1e-6)
    others = torch.ones(N, dtype=torch.bool)
    others[indices] = False
    assert torch.equal(memory.weight[others], before[others])
    torch.testing.assert_close(memory.weight[indices].norm(dim=1), torch.ones(4), rtol=0, atol=1e-6)


def test_duplicates_last_position_wins():
    memory = MemoryBank(N, D, 0.3, seed=0)
    before = memory.weight.clone()
    indices, f = torch.tensor([5, 2, 5, 7, 2, 5]), features(6, 2)
    memory.update(indices, f)
    expected = naive_update(before, indices, f, 0.3)
    torch.testing.assert_close(memory.weight, expected, rtol=0, atol=1e-6)
    # Row 5 took position 5's feature, computed from the old row (not from position 0's or 2's update).
    alone = MemoryBank(N, D, 0.3, seed=0)
    alone.update(torch.tensor([5]), f[5:6])
    assert torch.equal(memory.weight[5], alone.weight[5])


def test_last_occurrence():
    rows, last = last_occurrence(torch.tensor([4, 1, 4, 4, 0, 1]))
    assert rows.tolist() == [0, 1, 4] and last.tolist() == [4, 5, 3]


@pytest.mark.parametrize("copies", [1, 2, 3])
def test_last_occurrence_of_indices_each_present_a_known_number_of_times(copies):
    """Training's bank updates (each index once, twice with Super-AND's two views): a stable sort gives what
    torch.unique does, without reading the data back (it runs on the meta device, which holds none)."""
    generator = torch.Generator().manual_seed(copies)
    for _ in range(20):
        distinct = torch.randperm(50, generator=generator)[:12]
        indices = torch.cat([distinct[torch.randperm(12, generator=generator)] for _ in range(copies)])
        expected = last_occurrence(indices)
        assert all(torch.equal(a, b) for a, b in zip(last_occurrence(indices, copies), expected))
    rows, last = last_occurrence(torch.empty(12 * copies, dtype=torch.long, device="meta"), copies)
    assert rows.shape == last.shape == (12,)


def test_state_dict_holds_a_plain_tensor():
    memory = MemoryBank(N, D, M, seed=0)
    memory.update(torch.tensor([1, 2]), features(2, 0))
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert list(state) == ["weight", "written"] and torch.equal(state["weight"], memory.weight)
    assert state["written"].tolist() == [False, True, True] + [False] * (N - 3)
    fresh = MemoryBank(N, D, M, seed=9)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, memory.weight) and torch.equal(fresh.written, memory.written)
    # a checkpoint from before the mask: every row taken as written
    older = MemoryBank(N, D, M, seed=9)
    older.load_state_dict({"weight": state["weight"]})
    assert torch.equal(older.weight, memory.weight) and bool(older.written.all())


# ---- 2 processes, each with half of every batch = 1 process with the whole batch -------------------------------------

STEPS, BATCH = 3, 8


def two_view_batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(indices, view 1 features, view 2 features) of global batches that share some indices across steps."""
    g = torch.Generator().manual_seed(5)
    return [(torch.randperm(N, generator=g)[:BATCH], features(BATCH, 10 + s), features(BATCH, 20 + s))
            for s in range(STEPS)]


def run_bank(rank: int, world: int) -> torch.Tensor:
    memory = MemoryBank(N, D, M, seed=0)
    share = BATCH // world
    for indices, view1, view2 in two_view_batches():
        mine = slice(rank * share, (rank + 1) * share)
        # Super-AND's layout on every rank: [view 1; view 2] of its own samples.
        memory.update(torch.cat([indices[mine], indices[mine]]), torch.cat([view1[mine], view2[mine]]))
    return memory.weight


def _bank_worker(rank: int, world: int) -> torch.Tensor:
    return run_bank(rank, world)


def test_two_processes_equal_one_process():
    one = run_bank(0, 1)
    two = run_distributed(_bank_worker, 2)
    for bank in two:
        assert torch.equal(bank, one)
    # ... and both kept view 2 of every sample (the last position), as the naive loop on [view 1; view 2] does.
    expected = MemoryBank(N, D, M, seed=0).weight
    for indices, view1, view2 in two_view_batches():
        expected = naive_update(expected, torch.cat([indices, indices]), torch.cat([view1, view2]), M)
    torch.testing.assert_close(one, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_momentum_extremes(momentum):
    memory = MemoryBank(N, D, momentum, seed=0)
    before = memory.weight.clone()
    f = features(1, 7)
    memory.update(torch.tensor([4]), f)
    expected = f[0] if momentum == 0 else F.normalize(0.9 * before[4] + 0.1 * f[0], dim=0)
    torch.testing.assert_close(memory.weight[4], expected, rtol=0, atol=1e-6)
