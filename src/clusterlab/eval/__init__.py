"""Evaluation: feature extraction, weighted kNN, k-means, clustering metrics, the linear probe, plots."""
