"""Shared numerical building blocks, written once: Sinkhorn-Knopp, the SwAV queue, the memory bank."""
