"""Shared numerical building blocks, written once: Sinkhorn-Knopp, the SwAV queue, the memory bank, the
nearest-neighbour search (knn.py) and Self-Classifier's nearest-neighbour queue."""
