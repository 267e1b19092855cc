"""NPID / Instance Discrimination (Wu, Xiong, Yu and Lin, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", CVPR 2018, arXiv:1805.01978; upstream code zhirongw/lemniscate.pytorch@f7cfe29: cifar.py and
main.py, lib/LinearAverage.py, lib/NCEAverage.py, lib/NCECriterion.py).

Backbone -> Linear(embed_dim) -> L2 normalisation gives f; every training image is its own class, scored against a
memory bank M of past embeddings (ops/memory_bank.py). `--nce_k 0`: full softmax over the N entries; `--nce_k K`:
NCE with K noise entries drawn uniformly per sample (the own entry may be drawn too, as upstream) and the
normaliser Z estimated once, on the first batch, then kept (a buffer, so it is in the checkpoint).

With several ranks each rank scores its own samples against the whole bank, the loss is the mean over its samples
(DDP averages the gradients), and the bank update gathers every rank's indices and features. The noise indices
are drawn for the whole global batch from one generator all ranks share, and Z's mean covers the global batch, so
a step does not depend on how the batch is split. The head, the normalisation and the bank products run in
float32 outside autocast (only the backbone uses bf16 / fp16).
"""
from __future__ import annotations

import argparse

import torch

from .. import distributed
from ..config import non_negative_int
from ..errors import ConfigError
from ..losses.npid import instance_softmax_loss, nce_loss, nce_scores
from .base import Batch, DataInfo, Progress
from .memory_bank_base import MemoryBankMethod, add_memory_args

# Offset from --seed for the NCE noise draws (the augmentation uses --seed, the bank BANK_SEED).
NOISE_SEED = 2


class NPID(MemoryBankMethod):
    name = "npid"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("npid")
        add_memory_args(group, "nce")
        # 0 by default: the README's CIFAR command (upstream's flag default, 4096, is the ImageNet setting).
        group.add_argument("--nce_k", type=non_negative_int, default=0,
                           help="noise samples per sample for NCE (0: the full softmax over the memory bank)")
        parser.set_defaults(arch="resnet18_cifar", optimizer="sgd", lr=0.03, schedule="step", lr_drops=[120, 160],
                            lr_gamma=0.1, warmup_epochs=0, weight_decay=5e-4, momentum=0.9, nesterov=False,
                            epochs=200, batch_size=128, nmb_crops=[1], size_crops=[0], min_scale_crops=[0.2],
                            max_scale_crops=[1.0], brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4,
                            jitter_p=1.0, grey_p=0.2, blur_p=0.0, flip_p=0.0, init="default")

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        if args.nce_k >= info.num_samples:
            raise ConfigError(f"--nce_k {args.nce_k} must be below the number of training samples "
                              f"({info.num_samples}); 0 gives the full softmax")
        super().__init__(args, info, device)
        if self.augment.num_crops != 1:
            raise ConfigError(f"npid trains on one view per image: --nmb_crops {args.nmb_crops} must be [1]")
        # Z < 0: not estimated yet (upstream's params[2] = -1); estimated once on the first NCE batch.
        self.register_buffer("nce_z", torch.tensor(-1.0))
        self.nce_z_known = False  # read from the buffer once (a resumed run's comes with its weights), not every step
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "nce_z_known", False))
        self.noise = torch.Generator().manual_seed(args.seed + NOISE_SEED)

    # ---- training ----
    def non_finite_hint(self) -> str:
        # NCE takes exp(similarity / T) without a shift, as upstream (its Z is estimated from those values): beyond
        # float32's range for a similarity near 1 once T < 1/88
        if self.args.nce_k and self.args.bank_t < 1 / 88:
            return (f"--bank_t {self.args.bank_t:g} makes NCE's exp(similarity / bank_t) overflow float32: raise it "
                    f"(above 1/88), or train the full softmax (--nce_k 0)")
        return ""

    def forward(self, crops, batch: Batch, progress: Progress):
        f = self.embedding(crops[0])
        with torch.autocast(self.device.type, enabled=False):
            if self.args.nce_k == 0:
                loss = instance_softmax_loss(f, self.memory.weight, batch.indices, self.args.bank_t)
                name = "softmax"
            else:
                loss = self.nce(f, batch)
                name = "nce"
        self.remember(batch.indices, f)
        return loss, {name: loss.detach()}

    def nce(self, f: torch.Tensor, batch: Batch) -> torch.Tensor:
        columns = torch.cat([batch.indices[:, None], self.draw_noise(batch)], dim=1)
        similarities = torch.bmm(self.memory.weight[columns], f[:, :, None]).squeeze(2)
        if not self.nce_z_known:
            self.nce_z.copy_(torch.where(self.nce_z < 0, self.estimate_z(similarities), self.nce_z))
        self.nce_z_known = True
        return nce_loss(nce_scores(similarities, self.args.bank_t, self.nce_z), self.info.num_samples)

    def draw_noise(self, batch: Batch) -> torch.Tensor:
        """This rank's rows (n x K) of the uniform noise indices drawn for the whole global batch."""
        # Drawn into page-locked memory for a GPU: a non-blocking copy from ordinary memory may wait for the GPU's
        # queued work (8 MB a step at 4096 noise entries for 256 samples); torch's pinned-memory cache reuses the
        # block only once the copy has read it.
        noise = torch.empty(batch.global_size, self.args.nce_k, dtype=torch.long,
                            pin_memory=self.device.type == "cuda")
        torch.randint(self.info.num_samples, noise.shape, generator=self.noise, out=noise)
        return noise[batch.offset: batch.offset + batch.indices.shape[0]].to(self.device, non_blocking=True)

    @torch.no_grad()
    def estimate_z(self, similarities: torch.Tensor) -> torch.Tensor:
        """Z = N * mean(exp(v . f / T)) over the K + 1 columns of the whole global batch (Wu et al. sec. 3.2)."""
        values = torch.exp(similarities.float() / self.args.bank_t)
        totals = distributed.all_reduce_sum(torch.stack([values.sum(), values.new_full((), float(values.numel()))]))
        return self.info.num_samples * totals[0] / totals[1]

    # ---- state ----
    def random_state(self) -> dict:
        return {**super().random_state(), "noise": self.noise.get_state()}

    def load_random_state(self, state: dict) -> None:
        super().load_random_state(state)
        self.noise.set_state(state["noise"])
