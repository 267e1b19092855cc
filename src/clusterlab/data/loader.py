"""Global batches: the order of a run's samples depends on (seed, epoch) only, never on the world size.

Each epoch is a permutation of the dataset drawn from (seed, epoch); step s takes the s-th global batch of it and
rank r keeps the r-th contiguous slice. One process with the global batch therefore sees exactly the samples that
W processes see together, and a run resumed in the middle of an epoch continues with the same batches.
"""
from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

from ..errors import ConfigError
from .registry import FileImages, ImageSet


class GlobalBatches:
    def __init__(self, num_samples: int, global_batch: int, world_size: int, rank: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch % world_size:
            raise ConfigError(f"--batch_size {global_batch} (global) is not a multiple of the world size {world_size}")
        if drop_last and num_samples < global_batch:
            raise ConfigError(f"--batch_size {global_batch} is larger than the dataset ({num_samples} samples)")
        self.num_samples, self.global_batch, self.world_size, self.rank = num_samples, global_batch, world_size, rank
        self.local_batch = global_batch // world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (0 if self.drop_last or rest == 0 else 1)

    @property
    def epoch_samples(self) -> int:
        """Samples one epoch uses (drop_last leaves the remainder out)."""
        return min(self.num_samples, len(self) * self.global_batch)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation, drawn once per epoch: every step of the epoch slices the same tensor."""
        if self._order_epoch != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.num_samples, generator=generator)
            else:
                self._order = torch.arange(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def global_indices(self, epoch: int, step: int) -> torch.Tensor:
        return self.order(epoch)[step * self.global_batch: (step + 1) * self.global_batch]

    def local_indices(self, epoch: int, step: int) -> tuple[torch.Tensor, int, int]:
        """This rank's indices of step `step`, the global batch size and this rank's offset inside it."""
        batch = self.global_indices(epoch, step)
        share = -(-len(batch) // self.world_size)
        start = min(self.rank * share, len(batch))
        return batch[start: start + share], len(batch), start

    def plan(self, epoch: int, start_step: int = 0) -> list[tuple[torch.Tensor, int, int]]:
        """`local_indices` of every step from `start_step` to the end of the epoch: O(N) for the whole epoch."""
        return [self.local_indices(epoch, step) for step in range(start_step, len(self))]


def _stack(batch: list, shape: tuple) -> torch.Tensor:
    """Collate decoded images; a rank can get none (the last global batch, or a shard of an empty range), and
    default_collate fails on []."""
    return torch.stack(batch) if batch else torch.empty((0, *shape), dtype=torch.uint8)


def iterate(images: ImageSet, batches: GlobalBatches, epoch: int, start_step: int = 0, workers: int = 0
            ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int, int]]:
    """Yield (step, uint8 images, labels, dataset indices, global batch size, offset) from `start_step` on."""
    steps = range(start_step, len(batches))
    plan = batches.plan(epoch, start_step)
    if images.in_memory:
        for step, (idx, total, offset) in zip(steps, plan):
            yield step, images.images[idx], images.labels[idx], idx, total, offset
        return
    source = FileImages(images.files, images.image_size, images.channels)
    loader = torch.utils.data.DataLoader(source, batch_sampler=[idx.tolist() for idx, _, _ in plan],
                                         num_workers=workers, persistent_workers=False, pin_memory=False,
                                         collate_fn=partial(_stack, shape=(images.channels, images.image_size,
                                                                           images.image_size)))
    for step, (idx, total, offset), batch in zip(steps, plan, loader):
        yield step, batch, images.labels[idx], idx, total, offset


def sequential(images: ImageSet, indices: torch.Tensor, batch_size: int, workers: int = 0
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images, dataset indices) over `indices` in order (for feature extraction)."""
    chunks = list(torch.split(indices, batch_size))
    if images.in_memory:
        for idx in chunks:
            yield images.images[idx], idx
        return
    source = FileImages(images.files, images.image_size, images.channels)
    loader = torch.utils.data.DataLoader(source, batch_sampler=[c.tolist() for c in chunks], num_workers=workers,
                                         collate_fn=partial(_stack, shape=(images.channels, images.image_size,
                                                                           images.image_size)))
    yield from zip(loader, chunks)
