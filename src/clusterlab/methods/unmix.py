"""Un-Mix on SwAV (Shen et al., "Un-Mix: Rethinking Image Mixtures for Unsupervised Visual Representation
Learning", AAAI 2022, arXiv:2003.05438): SwAV plus the swapped prediction between each image's second view and a
mixture of its first view with the image at the mirrored batch position. Upstream code: szq0214/Un-Mix@0911f77
UnMix_SwAV/for_CIFAR/main_swav_unmix.py (`train`, `rand_bbox`, `swav_loss`).

Per iteration one r ~ U(0, 1) and one lam ~ Beta(beta, beta), drawn from the method's own generator so that all
ranks draw the same: r < unmix_prob gives global mixup, otherwise CutMix (lam then becomes the kept area). The
three views [x0, x1, mixture] go through the network in one pass, as upstream. The batch reversal pairs samples
within each rank's batch, as upstream's per-GPU code does. Only the two-crop setting of the CIFAR recipes is
supported (upstream's ImageNet multi-crop mixing is not). The queue, when on, holds the original views only:
upstream computes its loss three times a step and pushes into the queue each time, mixtures included, and its
module-level `swav_loss` reads a `model` that only exists inside `main()`, so it fails with a NameError as soon
as the queue is used.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from ..config import positive_float, probability
from ..data.mixing import cutmix, cutmix_box, mixup
from ..errors import ConfigError
from ..losses.unmix import UNMIX_MODES, unmix_loss
from .base import Batch, DataInfo, Progress
from .swav import SwAV


class UnMix(SwAV):
    name = "unmix"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        SwAV.add_args(parser)
        group = parser.add_argument_group("unmix")
        group.add_argument("--unmix_prob", type=probability, default=0.5, help="probability of global mixup vs CutMix")
        group.add_argument("--unmix_beta", type=positive_float, default=1.0, help="lam ~ Beta(beta, beta)")
        group.add_argument("--unmix_mode", choices=UNMIX_MODES, default="faithful",
                           help="faithful: the upstream code's loss; paper: the objective as the paper states it")

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        super().__init__(args, info, device)
        if list(args.nmb_crops) != [2] or list(args.crops_for_assign) != [0, 1]:
            raise ConfigError(f"unmix supports --nmb_crops 2 with --crops_for_assign 0 1 (got {args.nmb_crops}, "
                              f"{args.crops_for_assign})")
        # one stream shared by all ranks (same seed), so every rank mixes with the same lam and box
        self.mixing = np.random.Generator(np.random.PCG64(args.seed + 1))

    @torch.no_grad()
    def prepare(self, batch: Batch):
        x0, x1 = self.augment(batch.images, batch.global_size, batch.offset)
        draw, lam = self.mixing.random(), float(self.mixing.beta(self.args.unmix_beta, self.args.unmix_beta))
        if draw < self.args.unmix_prob:
            mixture = mixup(x0, lam)
        else:
            height, width = x0.shape[-2:]
            centre = int(self.mixing.integers(height)), int(self.mixing.integers(width))
            mixture, lam = cutmix(x0, cutmix_box(height, width, lam, *centre))
        return [x0, x1, mixture], lam

    def forward(self, inputs, batch: Batch, progress: Progress):
        crops, lam = inputs
        z, scores = self.embed(crops)
        n = crops[0].shape[0]
        (z0, z1, zm), (s0, s1, sm) = z.split(n), scores.split(n)
        q0, q1 = self.codes(0, s0, z0), self.codes(1, s1, z1)
        qm = self.codes(0, sm, zm, push=False)
        if self.queue is not None:
            self.queue.advance(n)
        loss, terms = unmix_loss(s0, s1, sm, q0, q1, qm, lam, self.args.temperature, self.args.unmix_mode)
        return loss, {**terms, "lam": torch.tensor(lam)}

    def random_state(self) -> dict:
        return {**super().random_state(), "mixing": self.mixing.bit_generator.state}

    def load_random_state(self, state: dict) -> None:
        super().load_random_state(state)
        self.mixing.bit_generator.state = state["mixing"]
