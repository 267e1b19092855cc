"""Un-Mix's image mixtures (Shen et al., "Un-Mix: Rethinking Image Mixtures for Unsupervised Visual Representation
Learning", AAAI 2022, arXiv:2003.05438; upstream `train` and `rand_bbox` in UnMix_SwAV/for_CIFAR/main_swav_unmix.py
at szq0214/Un-Mix@0911f77): each image mixed with the image at the mirrored position of its batch.

Global mixup: m = lam x + (1 - lam) x_rev. CutMix: a box of side ratio sqrt(1 - lam) centred uniformly at random
and clipped to the image is pasted from x_rev, and lam becomes 1 - box area / image area (what the mixture
really holds of x).
"""
from __future__ import annotations

import math

import torch


def mixup(images: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * images + (1 - lam) * images.flip(0)


def cutmix_box(height: int, width: int, lam: float, centre_y: int, centre_x: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pasted box: sides int(size sqrt(1 - lam)) around the centre, clipped."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    top, bottom = min(max(centre_y - cut_h // 2, 0), height), min(max(centre_y + cut_h // 2, 0), height)
    left, right = min(max(centre_x - cut_w // 2, 0), width), min(max(centre_x + cut_w // 2, 0), width)
    return top, bottom, left, right


def cutmix(images: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, float]:
    """The images with `box` taken from the reversed batch, and the share of each image left (the new lam)."""
    top, bottom, left, right = box
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
    height, width = images.shape[-2:]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
