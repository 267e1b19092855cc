"""Self-Classifier's nearest-neighbour queue: a ring buffer of recent embeddings that stand in for a view.

It holds the last `length` view-1 embeddings of the global batch and their dataset indices (elad-amrani/
self-classifier@3935138 src/utils.py `NNQueue`, used by src/train.py). Every step the batch's detached embeddings
and indices are gathered from all ranks and written at the pointer, wrapping around, so every rank holds the same
queue. Once it has been filled, each view-1 embedding is replaced by its most similar queued embedding (dot
product, ops/knn), or by the second most similar where the first is the same image, looked up before the batch is
pushed, as upstream.

Why it does not share code with ops/queue.py (SwAV's queue): that queue is sharded, each rank keeping a FIFO of
its own samples whose scores enter a Sinkhorn that all-reduces its sums, so the union acts as one global queue;
its length must be a multiple of the global batch and it stores no indices. A nearest-neighbour lookup is not a
sum over the queue: every rank needs every row, so this queue is replicated, of any length not below the global
batch, with the dataset index of each row (to skip the query's own image). The checkpoint holds its tensors and
pointer (upstream pickles the queue object).
"""
from __future__ import annotations

import torch

from .. import distributed
from .knn import topk_neighbours


class NearestNeighbourQueue:
    """The last `length` embeddings of the global batch and their dataset indices, the same on every rank."""

    def __init__(self, length: int, dim: int, device: torch.device):
        self.embeddings = torch.zeros(length, dim, device=device)
        self.indices = torch.full((length,), -1, dtype=torch.long, device=device)
        self.ptr, self.full = 0, False

    def neighbours(self, queries: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The most similar queued embedding (dot product) of each query, the second one where the first is the
        query's own image."""
        top = topk_neighbours(queries, self.embeddings, 2).indices
        chosen = torch.where(self.indices[top[:, 0]] == indices, top[:, 1], top[:, 0])
        return self.embeddings[chosen]

    def push(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        length = len(self.indices)
        slots = (self.ptr + torch.arange(len(indices), device=self.indices.device)) % length
        self.embeddings[slots] = embeddings
        self.indices[slots] = indices
        self.full = self.full or self.ptr + len(indices) >= length
        self.ptr = (self.ptr + len(indices)) % length

    def step(self, z: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """This rank's view-1 embeddings, replaced by their neighbours once the queue is full; then the global
        batch's own (detached) embeddings are pushed."""
        query = z.detach().float()
        out = self.neighbours(query, indices).to(z.dtype) if self.full else z
        # training batches split evenly over the ranks: no exchange of sizes, which the host would wait for
        self.push(distributed.all_gather_cat(query), distributed.all_gather_cat(indices))
        return out

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.cpu(), "indices": self.indices.cpu(), "ptr": self.ptr,
                "full": self.full}

    def load_state_dict(self, state: dict) -> None:
        if state["embeddings"].shape != self.embeddings.shape:
            raise ValueError(f"its queue is {tuple(state['embeddings'].shape)}, this model's "
                             f"{tuple(self.embeddings.shape)}")
        self.embeddings.copy_(state["embeddings"])
        self.indices.copy_(state["indices"])
        self.ptr, self.full = int(state["ptr"]), bool(state["full"])
