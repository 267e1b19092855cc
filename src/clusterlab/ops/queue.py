"""SwAV's queue of past embeddings, one global length shared by all ranks.

Each rank keeps a FIFO of its own last `global_length / world` embeddings for every assignment crop. The queue's
scores are recomputed with the current prototypes and put in front of the batch's scores before the Sinkhorn;
because the Sinkhorn all-reduces its sums, the union of the ranks' queues acts as one global queue, so the result
does not depend on how the same samples are spread over ranks. A global length that is not a multiple of the
global batch is refused (upstream silently rounds it down, which turned the CIFAR recipes' 120 into 0).

For checkpoints the ranks' queues are gathered into one global tensor, so a run can resume on another world size.
"""
from __future__ import annotations

import torch

from .. import distributed
from ..errors import ConfigError


class EmbeddingQueue:
    def __init__(self, num_crops: int, global_length: int, dim: int, global_batch: int, world_size: int,
                 device: torch.device):
        if global_length <= 0 or global_length % global_batch:
            raise ConfigError(f"--queue_length {global_length} must be a positive multiple of the global batch "
                             f"{global_batch} (for example {max(1, global_length // global_batch + 1) * global_batch})")
        self.local_length = global_length // world_size
        self.embeddings = torch.zeros(num_crops, self.local_length, dim, device=device)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.local_length

    def scores(self, crop: int, prototypes: torch.Tensor) -> torch.Tensor:
        return self.embeddings[crop] @ prototypes.t()

    @torch.no_grad()
    def push(self, crop: int, embeddings: torch.Tensor) -> None:
        """Newest first: shift the queue by the batch and write the batch at the front."""
        count = embeddings.shape[0]
        queue = self.embeddings[crop]
        queue[count:] = queue[:-count].clone()
        queue[:count] = embeddings.detach().to(queue.dtype)

    def advance(self, count: int) -> None:
        self.filled = min(self.local_length, self.filled + count)

    def state_dict(self) -> dict:
        """The global queue (all ranks' rows in rank order); collective: every rank must call it."""
        gathered = distributed.all_gather_cat(self.embeddings.transpose(0, 1).contiguous()).transpose(0, 1)
        return {"embeddings": gathered.cpu(), "filled": self.filled * distributed.world_size()}

    def load_state_dict(self, state: dict) -> None:
        embeddings = state["embeddings"]
        expected = self.local_length * distributed.world_size()
        if embeddings.shape[1] != expected or embeddings.shape[0] != self.embeddings.shape[0]:
            raise ConfigError(f"the checkpoint's queue holds {tuple(embeddings.shape)} rows, this run expects "
                             f"({self.embeddings.shape[0]}, {expected}, ...): --queue_length or crops changed")
        start = distributed.rank() * self.local_length
        self.embeddings.copy_(embeddings[:, start: start + self.local_length])
        self.filled = min(int(state["filled"]) // distributed.world_size(), self.local_length)
