"""The memory bank of NPID and Super-AND: one slowly moving L2-normalised embedding per training sample.

M (N x d) starts i.i.d. uniform in [-sqrt(3/d), sqrt(3/d)] (expected row norm about 1, not normalised), as
upstream's banks do (zhirongw/lemniscate.pytorch@f7cfe29 lib/LinearAverage.py and lib/NCEAverage.py,
super-AND/super-AND@5a0e5ca lib/non_parametric_classifier.py). After every step the rows of the batch's samples
move towards their new features: v_i <- normalise(m v_i + (1 - m) f_i).

Every rank updates with the indices and features of all ranks (gathered in rank order), so all ranks hold the same
bank and the bank does not depend on how a global batch is split.

Duplicates (Super-AND's two views of one image, or an index repeated in a batch): every candidate row is computed
from the bank as it was before the step, and the one at the **last** position of the gathered order is written.
Upstream writes them with one `index_copy_` of duplicated indices, so one of them wins, which one unspecified;
"last" makes it deterministic and keeps upstream's one-update-per-step size. With each rank holding [view 1; view 2]
of its own samples, the last position is a sample's last view whatever the world size.

The bank is a registered buffer: it travels in the model's state dict as a plain tensor. So does `written`, which
rows a step has updated: training takes full batches only, so the images left out of the first epoch keep their
random rows until an epoch takes them (upstream's loaders keep the partial batch, so every row is written in the
first epoch). Such a row holds no embedding of its image: it is no Super-AND anchor and votes in no memory-bank
kNN. A checkpoint from before the mask loads as written throughout.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed


class MemoryBank(nn.Module):
    def __init__(self, size: int, dim: int, momentum: float, seed: int = 0):
        super().__init__()
        self.momentum = momentum
        bound = math.sqrt(3.0 / dim)
        # A generator of its own, so the initial bank depends on the seed only, not on what else drew numbers.
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.rand(size, dim, generator=generator).mul_(2 * bound).sub_(bound))
        self.register_buffer("written", torch.zeros(size, dtype=torch.bool))

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor, copies: int | None = None) -> torch.Tensor:
        """Move the rows of `indices` (this rank's, gathered with all ranks') towards `features`; collective.

        Returns the gathered indices (in the order that decided duplicates).
        """
        indices = distributed.all_gather_cat(indices.reshape(-1))
        features = distributed.all_gather_cat(features.detach().to(self.weight.dtype))
        rows, last = last_occurrence(indices, copies)
        updated = self.weight.index_select(0, rows).mul_(self.momentum).add_(features[last], alpha=1 - self.momentum)
        self.weight.index_copy_(0, rows, F.normalize(updated, dim=1))
        self.written[rows] = True
        return indices

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "written", torch.ones_like(self.written))  # a checkpoint before the mask
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def last_occurrence(indices: torch.Tensor, copies: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct values, position of each one's last occurrence in `indices`). `copies`: every value is known to
    occur exactly that many times (training batches): a stable sort then gives both without a host read."""
    if copies is not None:
        order = torch.sort(indices, stable=True)
        return order.values[copies - 1::copies], order.indices[copies - 1::copies]
    rows, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(indices.numel(), device=indices.device)
    last = torch.full_like(rows, -1).scatter_reduce_(0, inverse, positions, reduce="amax")
    return rows, last
