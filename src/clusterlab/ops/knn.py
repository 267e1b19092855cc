"""Nearest-neighbour search over a bank of features: the one chunked top-k that every method and evaluation uses.

The similarity of a query q and a bank row b is their dot product q . b, the cosine when both are L2-normalised
(a memory bank's rows that no step has updated yet are not, and are then scored by the plain dot product, as the
upstream code does). For each query the k largest similarities are returned with their bank indices, most similar
first. Users: weighted kNN classification (eval/knn.py), Super-AND's anchor neighbours, Self-Classifier's
nearest-neighbour queue, and neighbour mining over a whole dataset (`dataset_neighbours`, as SCAN needs).

Memory: the queries are processed in chunks of at most `chunk_elements // bank_size` rows, so the similarity
matrix held at once has at most `chunk_elements` entries (64 MiB of float32 by default) whatever the sizes.

Ties: torch.topk does not say which of several equal similarities it keeps. Here equal similarities are ordered
by bank index, the lower first, both inside the k returned and at the boundary (of several rows tied for the k-th
place, the lowest indices are kept), so the result is exactly that of a stable sort of each row by decreasing
similarity, truncated to k. Up to ARGMAX_K neighbours (Self-Classifier's queue: 2 at every step) they are found by
passes of argmax, which give the same order without asking the device which rows tie.

Several processes (`split_over_ranks=True`): every rank passes the same queries and the same bank; the chunks
lie on a grid that does not depend on the world size, each rank computes a contiguous share of them, and the
shares are gathered in rank order. Every rank then holds the whole result, and each row was computed in the same
chunk (same matrix shapes, so the same floating-point sums) as a single process computes it: 2 processes return
exactly what 1 returns. Without it each rank searches its own queries alone (no communication).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import distributed
from . import CHUNK_ELEMENTS, rows_per_chunk

# Up to this k (and without excluded rows), k passes of argmax find the neighbours: they read nothing back from the
# device, where top_k_rows asks which rows tie; Self-Classifier's neighbour queue searches at every training step.
ARGMAX_K = 2


class Neighbours(NamedTuple):
    similarities: torch.Tensor  # (Q, k) q . b of the neighbours, most similar first
    indices: torch.Tensor       # (Q, k) int64 bank rows


def query_chunks(num_queries: int, bank_size: int, chunk_elements: int = CHUNK_ELEMENTS,
                 split_over_ranks: bool = False) -> list[range]:
    """The row ranges in which `num_queries` queries against `bank_size` rows are processed: consecutive chunks of
    at most max(1, chunk_elements // bank_size) rows; with `split_over_ranks`, only this rank's contiguous share of
    those chunks (the chunks themselves do not depend on the world size)."""
    rows = rows_per_chunk(bank_size, chunk_elements)
    chunks = [range(start, min(start + rows, num_queries)) for start in range(0, num_queries, rows)]
    if not split_over_ranks:
        return chunks
    mine = distributed.shard_range(len(chunks))
    return chunks[mine.start: mine.stop]


def top_k_rows(similarity: torch.Tensor, k: int) -> Neighbours:
    """The k largest entries of every row, most similar first, equal values ordered by column (the lower first).

    torch.topk's order is unique where the k + 1 largest values of a row are all different. The rows where two
    of them are equal (a tie inside the k, or across the k-th place) are sorted whole, stably, instead.
    """
    count = min(k + 1, similarity.shape[1])
    values, columns = similarity.topk(count, dim=1)
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero().squeeze(1)
    if len(tied):
        exact = similarity[tied].sort(dim=1, descending=True, stable=True)
        values[tied], columns[tied] = exact.values[:, :count], exact.indices[:, :count]
    return Neighbours(values[:, :k], columns[:, :k])


def top_k_by_argmax(similarity: torch.Tensor, k: int) -> Neighbours:
    """top_k_rows for finite similarities: k passes of argmax, which returns the first (lowest) column of equal
    maxima, as torch documents; each pass's column is then taken out (set to -inf, in `similarity` itself)."""
    rows = torch.arange(similarity.shape[0], device=similarity.device)
    values, columns = [], []
    for _ in range(k):
        column = similarity.argmax(dim=1)
        values.append(similarity[rows, column])
        columns.append(column)
        similarity[rows, column] = float("-inf")
    return Neighbours(torch.stack(values, dim=1), torch.stack(columns, dim=1))


@torch.no_grad()
def topk_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int, exclude: torch.Tensor | None = None,
                    chunk_elements: int = CHUNK_ELEMENTS, split_over_ranks: bool = False) -> Neighbours:
    """For each query (Q x d), the k rows of `bank` (N x d) with the largest dot product, most similar first;
    equal similarities ordered by bank index (module docstring).

    `exclude` (Q,) names one bank row per query that is never returned (its own row: Super-AND's anchors are
    entries of the bank they search); then k must be below N. `split_over_ranks`: collective, every rank passes the
    same queries and bank and gets the whole result (module docstring).
    """
    available = bank.shape[0] - (exclude is not None)
    if not 0 < k <= available:
        raise ValueError(f"k = {k} neighbours asked among {available} bank rows")
    parts = [Neighbours(bank.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=bank.device))]
    # In the inputs' precision also under autocast (Self-Classifier's queue searches inside the training step):
    # bf16 similarities would rank a few percent of the neighbours wrongly and tie many.
    with torch.autocast(bank.device.type, enabled=False):
        for rows in query_chunks(queries.shape[0], bank.shape[0], chunk_elements, split_over_ranks):
            similarity = queries[rows.start: rows.stop] @ bank.t()
            if exclude is not None:
                own = exclude[rows.start: rows.stop].to(similarity.device)
                similarity[torch.arange(len(rows), device=similarity.device), own] = float("-inf")
            parts.append(top_k_by_argmax(similarity, k) if k <= ARGMAX_K and exclude is None
                         else top_k_rows(similarity, k))
    found = Neighbours(*(torch.cat(column) for column in zip(*parts)))
    if not split_over_ranks:
        return found
    return Neighbours(*(distributed.all_gather_uneven(column) for column in found))


@torch.no_grad()
def dataset_neighbours(features: torch.Tensor, k: int, include_self: bool = False,
                       chunk_elements: int = CHUNK_ELEMENTS, split_over_ranks: bool = False) -> Neighbours:
    """For every row i of `features` (N x d, one per sample of a dataset), its k nearest rows among the same N.

    include_self False: the k nearest other rows. include_self True: row i itself first (for L2-normalised rows
    its own similarity, 1, is the largest possible), then its k - 1 nearest other rows, so that a duplicate of a
    sample never takes the sample's own place. Ties and `split_over_ranks` as `topk_neighbours`.
    """
    if k < 1:
        raise ValueError(f"k = {k}: at least one neighbour")
    everyone = torch.arange(features.shape[0], device=features.device)
    own = Neighbours((features * features).sum(dim=1, keepdim=True), everyone[:, None])
    if include_self and k == 1:
        return own
    found = topk_neighbours(features, features, k - include_self, exclude=everyone, chunk_elements=chunk_elements,
                            split_over_ranks=split_over_ranks)
    if not include_self:
        return found
    return Neighbours(*(torch.cat(pair, dim=1) for pair in zip(own, found)))


def neighbour_label_agreement(own: torch.Tensor, theirs: torch.Tensor) -> float:
    """The share of (sample, neighbour) pairs, both labelled, of one label, from the samples' labels `own` (A,) and
    their neighbours' `theirs` (A, K): labels -1 (images whose label is unknown) agree on nothing; nan without such
    a pair. A monitor only (SCAN's mined neighbours, Super-AND's anchors); no loss uses labels."""
    own = own[:, None].expand_as(theirs)
    labelled = (theirs >= 0) & (own >= 0)
    return float((theirs == own)[labelled].float().mean()) if labelled.any() else float("nan")
