"""SwAV's queue of past embeddings, one global length shared by all ranks.

Each rank keeps a FIFO of its own last `global_length / world` embeddings for every assignment crop. The queue's
scores are recomputed with the current prototypes and put in front of the batch's scores before the Sinkhorn;
because the Sinkhorn all-reduces its sums, the union of the ranks' queues acts as one global queue, so the result
does not depend on how the same samples are spread over ranks. A global length that is not a multiple of the
global batch is refused (upstream silently rounds it down, which turned the CIFAR recipes' 120 into 0).

For checkpoints the ranks' queues are gathered into one global tensor, so a run can resume on another world size.
Its rows are in the order one process fed the same global batches would hold them: newest global batch first, each
global batch in rank order. Every rank then evicts its share of the oldest global batch, whatever the world size.
"""
from __future__ import annotations

import torch

from .. import distributed
from ..errors import ConfigError


def check_queue_length(global_length: int, global_batch: int) -> None:
    """Refuse a length the queue cannot hold whole global batches of (at start, not when the queue starts)."""
    if global_length <= 0 or global_length % global_batch:
        raise ConfigError(f"--queue_length {global_length} must be a positive multiple of the global batch "
                          f"{global_batch} (for example {max(1, global_length // global_batch + 1) * global_batch})")


class EmbeddingQueue:
    def __init__(self, num_crops: int, global_length: int, dim: int, global_batch: int, world_size: int,
                 device: torch.device):
        check_queue_length(global_length, global_batch)
        self.local_length = global_length // world_size
        self.local_batch = global_batch // world_size
        self.embeddings = torch.zeros(num_crops, self.local_length, dim, device=device)
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled >= self.local_length

    def scores(self, crop: int, prototypes: torch.Tensor) -> torch.Tensor:
        """In float32 also under autocast, as the batch's own scores (models/heads.Prototypes)."""
        with torch.autocast(self.embeddings.device.type, enabled=False):
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
        """The global queue, as one process would hold it (see the module's docstring); collective.

        Each rank's queue is a stack of its batches; the global queue interleaves them batch by batch, so that it
        is the queue of one process fed the concatenated batches (plain rank order would put rank 0's oldest
        rows before rank 1's newest, and a run resumed on fewer ranks would evict the wrong rows).
        """
        crops, length, dim = self.embeddings.shape
        blocks = self.embeddings.reshape(1, crops, length // self.local_batch, self.local_batch, dim)
        gathered = distributed.all_gather_cat(blocks)  # (world, crops, batches, local batch, dim)
        embeddings = gathered.permute(1, 2, 0, 3, 4).reshape(crops, -1, dim)
        return {"embeddings": embeddings.cpu(), "filled": self.filled * distributed.world_size()}

    def load_state_dict(self, state: dict) -> None:
        embeddings = state["embeddings"]
        expected = self.local_length * distributed.world_size()
        if embeddings.shape[1] != expected or embeddings.shape[0] != self.embeddings.shape[0]:
            raise ConfigError(f"the checkpoint's queue holds {tuple(embeddings.shape)} rows, this run expects "
                             f"({self.embeddings.shape[0]}, {expected}, ...): --queue_length or crops changed")
        crops, _, dim = self.embeddings.shape
        mine = embeddings.reshape(crops, -1, distributed.world_size(), self.local_batch, dim)[:, :, distributed.rank()]
        self.embeddings.copy_(mine.reshape(crops, self.local_length, dim))
        self.filled = min(int(state["filled"]) // distributed.world_size(), self.local_length)
