"""Shared numerical building blocks, written once: Sinkhorn-Knopp, the SwAV queue, the memory bank, the
nearest-neighbour search (knn.py) and Self-Classifier's nearest-neighbour queue."""

# Work that grows with N x K (similarities, logits, log-probabilities) runs over row chunks of at most this many
# values, whatever N is: 64 MiB in float32, 128 MiB in float64.
CHUNK_ELEMENTS = 1 << 24


def rows_per_chunk(row_length: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """How many rows of `row_length` values make one chunk (at least one row, however long)."""
    return max(1, chunk_elements // max(1, row_length))
