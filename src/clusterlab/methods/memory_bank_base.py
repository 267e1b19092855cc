"""What NPID and Super-AND share: an embedding trained against a memory bank of past embeddings.

backbone -> Linear(out_dim -> embed_dim) -> L2 normalisation (no MLP) gives f; the bank (ops/memory_bank.py)
holds one slowly moving f per training sample and takes the batch's embeddings after the backward pass. The bank's
temperature and momentum are --bank_t and --bank_m, spelled --nce_t / --nce_m in NPID's code and --npc_t / --npc_m
in Super-AND's (both spellings are accepted).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from ..config import finite_float, positive_float, positive_int
from ..errors import ConfigError
from ..models import build_backbone
from ..models.heads import float32_embedding
from ..ops.memory_bank import MemoryBank
from .base import DataInfo, Method, Progress, build_multicrop

# Offset from --seed for the bank's initial values (the augmentation uses --seed itself).
BANK_SEED = 1


def add_memory_args(group: argparse._ArgumentGroup, upstream_prefix: str) -> None:
    """--embed_dim, --bank_t and --bank_m (the embedding size and the bank's temperature and momentum), with the
    upstream code's spellings as aliases: --low_dim, --PREFIX_t, --PREFIX_m."""
    group.add_argument("--embed_dim", "--low_dim", type=positive_int, default=128,
                       help="embedding (and memory bank) size")
    group.add_argument("--bank_t", f"--{upstream_prefix}_t", type=positive_float, default=0.1,
                       help="memory bank temperature")
    group.add_argument("--bank_m", f"--{upstream_prefix}_m", type=finite_float, default=0.5,
                       help="memory bank momentum")


def check_momentum(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"--bank_m {value} must be in [0, 1) (the weight of a row's old value in the bank "
                          f"update)")


class MemoryBankMethod(Method):
    """What NPID and Super-AND share: backbone -> Linear(out_dim -> embed_dim) -> L2 normalisation (no MLP) and a
    memory bank that takes the batch's embeddings after the backward pass."""

    index_copies = 1  # times each dataset index occurs in a step's bank update (Super-AND: its 2 views)

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        check_momentum(args.bank_m)
        super().__init__(args, info, device)
        self.backbone = build_backbone(args.arch, info.channels, args.width, args.init)
        self.head = nn.Linear(self.backbone.out_dim, args.embed_dim)
        self.memory = MemoryBank(info.num_samples, args.embed_dim, args.bank_m, seed=args.seed + BANK_SEED)
        self.augment = build_multicrop(args, info)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def memory_bank(self) -> torch.Tensor:
        """The N x embed_dim bank (rows L2-normalised once updated): kNN's train features, as upstream."""
        return self.memory.weight

    @property
    def memory_bank_written(self) -> torch.Tensor:
        """(N,) bool: the rows a training step has updated (the others vote in no memory-bank kNN)."""
        return self.memory.written

    @property
    def monitor_temperature(self) -> float:
        return self.args.bank_t

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        return float32_embedding(self.head, self.backbone(images))

    def remember(self, indices: torch.Tensor, features: torch.Tensor) -> None:
        """Keep the batch's embeddings for the bank update, which waits until after the backward pass: the
        logits' backward needs the bank as it was in the forward pass."""
        self.pending = (indices, features.detach())

    def after_backward(self, progress: Progress) -> None:
        self.update_bank()

    def update_bank(self) -> torch.Tensor:
        """Collective: the bank update with the kept embeddings; returns the indices of all ranks, as gathered."""
        indices, features = self.pending
        self.pending = None
        return self.memory.update(indices, features, copies=self.index_copies)
