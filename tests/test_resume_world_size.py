"""Resuming on another number of processes: what a checkpoint carries over must mean the same at the new world size."""
from __future__ import annotations

import types

import pytest
import torch

from clusterlab.methods.cluster_base import ClusterMethod


def head_losses():
    """ClusterMethod's loss bookkeeping on an object without a model (as tests/test_distributed.py does)."""
    def __init__(self):
        self.device, self._loss_sums, self._loss_count = torch.device("cpu"), None, 0
        self.last_head_losses, self.pretrained_from = [], None

    cls = type("HeadLosses", (), {**{name: value for name, value in vars(ClusterMethod).items()
                                     if isinstance(value, types.FunctionType)}, "__init__": __init__})
    return cls()


@pytest.mark.parametrize("saved_world", [2, 4])
def test_an_epoch_resumed_on_one_process_weighs_every_step_alike(saved_world):
    """A checkpoint written by W ranks mid-epoch holds W rows (each rank's sums over the steps so far, count = steps);
    resumed on 1 process, every later step adds one row's worth. The epoch's mean must weigh each step once, as an
    uninterrupted run on either world size does: the steps before the stop used to count W times, those after once."""
    before, after, heads = 5, 7, 3
    g = torch.Generator().manual_seed(0)
    # per step, per rank, per head: high losses before the stop, low ones after (a head's loss falls over an epoch)
    early = 3 + torch.rand(before, saved_world, heads, generator=g)
    late = 1 + torch.rand(after, 1, heads, generator=g)
    rows = torch.cat([early.sum(dim=0), torch.full((saved_world, 1), float(before))], dim=1)  # what extra_state saves
    resumed = head_losses()
    resumed.load_extra_state({"last_head_losses": [], "epoch_loss_totals": rows})
    for losses in late[:, 0]:
        resumed.record_head_losses(list(losses))
    resumed.on_epoch_end(0)
    per_step = torch.cat([early.mean(dim=1), late[:, 0]])  # each step's loss over the global batch
    expected = per_step.mean(dim=0).tolist()
    assert resumed.last_head_losses == pytest.approx(expected, rel=1e-5)


def means_resumed_on_two_ranks(saved: torch.Tensor, late: torch.Tensor) -> list[float]:
    """The epoch's per-head means after `saved` (extra_state's epoch_loss_totals) is loaded on each of 2 ranks and
    each adds its `late[:, rank]` losses: what on_epoch_end's all-gather adds up."""
    import clusterlab.distributed as distributed

    ranks = []
    for rank in range(2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(distributed, "world_size", lambda: 2)
            mp.setattr(distributed, "rank", lambda: rank)
            method = head_losses()
            method.load_extra_state({"last_head_losses": [], "epoch_loss_totals": saved})
        for losses in late[:, rank]:
            method.record_head_losses(list(losses))
        ranks.append(torch.cat([method._loss_sums, torch.tensor([float(method._loss_count)])]))
    totals = torch.stack(ranks).sum(dim=0)
    return (totals[:-1] / totals[-1]).tolist()


def test_an_epoch_resumed_on_more_processes_weighs_every_step_alike():
    """1 -> 2: rank 0 carries the single row; both ranks then add their own."""
    g = torch.Generator().manual_seed(1)
    early = 3 + torch.rand(5, 1, 2, generator=g)
    late = 1 + torch.rand(7, 2, 2, generator=g)
    rows = torch.cat([early.sum(dim=0), torch.full((1, 1), 5.0)], dim=1)
    expected = torch.cat([early[:, 0], late.mean(dim=1)]).mean(dim=0).tolist()
    assert means_resumed_on_two_ranks(rows, late) == pytest.approx(expected, rel=1e-5)


def test_sums_saved_before_each_rank_kept_its_row_are_not_rescaled():
    """An older checkpoint holds one row, already the sum over the ranks that wrote it (how many it does not say):
    resumed on as many, every step still counts once, as it did before the rescaling."""
    g = torch.Generator().manual_seed(1)
    early = 3 + torch.rand(5, 2, 2, generator=g)
    late = 1 + torch.rand(7, 2, 2, generator=g)
    summed = torch.cat([early.sum(dim=(0, 1)), torch.tensor([10.0])])
    expected = torch.cat([early.mean(dim=1), late.mean(dim=1)]).mean(dim=0).tolist()
    assert means_resumed_on_two_ranks(summed, late) == pytest.approx(expected, rel=1e-5)
