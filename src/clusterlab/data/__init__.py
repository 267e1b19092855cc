"""Datasets, batching and augmentation."""
from .registry import DATASETS, ImageSet, load

__all__ = ["DATASETS", "ImageSet", "load"]
