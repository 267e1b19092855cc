"""EmbedUL stage 2 (Han, Park, Park, Kim and Cha, "Mitigating Embedding and Class Assignment Mismatch in
Unsupervised Image Classification", ECCV 2020, no arXiv version; upstream code EmbedUL/EmbedUL@4027eab main.py,
models/resnet_cifar.py, lib/criterion.py): class-assignment heads on a Super-AND embedding.

The encoder is Super-AND's (backbone -> Linear -> L2 normalisation, `--pretrained` a superand run). On its 128-d
embedding f sit `--num_heads` normalized-FC heads, y = softmax(f normalise(W) / tau_c), W in R^{d x C} drawn from
N(0, 1). Per step, with two augmented views of each image,

    L = mean over heads of L_IIC(y, y') + lambda L_cp,

L_IIC the mutual-information loss (losses/iic.py) and L_cp the augmentation-invariance loss of Super-AND on the
embeddings of both views (losses/superand.aug_loss). The head reported is the one with the lowest training loss
(no labels); every head is scored by eval_cluster.py.

The heads are never optimised, in the code (only the encoder is given to SGD) as in the paper's supplementary
material; `--freeze_heads false` trains them, an extension of ours. The code's normalise(W) divides each row of the
d x C matrix, i.e. across classes for each feature (`--head_norm feature`, the default: it reproduces the logged
numbers), where the paper normalises each class vector (`--head_norm class`).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..config import bool_flag, class_count_or_dataset, non_negative_float, positive_float, positive_int
from ..errors import ConfigError
from ..losses.iic import iic_loss
from ..losses.superand import aug_loss
from ..models import build_backbone
from ..models.heads import float32_embedding
from .base import Batch, DataInfo, Progress, build_multicrop, two_view_columns
from .cluster_base import ClusterMethod


class EmbedUL(ClusterMethod):
    name = "embedul"
    pretrained_parts = ("backbone", "head")
    pretrained_flags = ("arch", "width", "embed_dim")  # the head is Super-AND's embedding layer
    starts_from = "a Super-AND run (EmbedUL's stage 1)"
    starts_from_methods = ("superand",)

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("embedul")
        group.add_argument("--embed_dim", "--low_dim", type=positive_int, default=128,
                           help="embedding size (Super-AND's)")
        group.add_argument("--num_heads", type=positive_int, default=5)
        group.add_argument("--head_classes", type=class_count_or_dataset, default=0,
                           help="classes of every head (0: the dataset's)")
        group.add_argument("--head_t", type=positive_float, default=0.1, help="tau_c of the normalized-FC heads")
        group.add_argument("--head_norm", choices=["feature", "class"], default="feature",
                           help="normalise W per feature across classes (upstream code) or per class (paper)")
        group.add_argument("--freeze_heads", type=bool_flag, default=True,
                           help="keep the heads fixed (upstream's code and paper) instead of optimising them (ours)")
        group.add_argument("--cp_weight", type=non_negative_float, default=1.0, help="lambda of L_cp")
        group.add_argument("--batch_t", type=positive_float, default=0.1, help="temperature of L_cp")
        parser.set_defaults(arch="resnet18_sobel", optimizer="sgd", nesterov=True, lr=0.01, momentum=0.9,
                            weight_decay=5e-4, schedule="step", lr_drops=[120, 160, 200, 240, 280], lr_gamma=0.1,
                            epochs=300, batch_size=128, nmb_crops=[2], min_scale_crops=[0.2], max_scale_crops=[1.0],
                            brightness=0.4, contrast=0.4, saturation=0.4, hue=0.4, jitter_p=1.0, grey_p=0.2,
                            flip_p=0.5, init="default")

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        super().__init__(args, info, device)
        self.backbone = build_backbone(args.arch, info.channels, args.width, args.init)
        self.head = nn.Linear(self.backbone.out_dim, args.embed_dim)
        classes = args.head_classes or info.num_classes
        self.heads = nn.ParameterList([nn.Parameter(torch.randn(args.embed_dim, classes),
                                                    requires_grad=not args.freeze_heads)
                                       for _ in range(args.num_heads)])
        self.augment = build_multicrop(args, info)
        if self.augment.num_crops != 2:
            raise ConfigError(f"embedul takes two views of each image (--nmb_crops 2), not {args.nmb_crops}")

    @property
    def head_sizes(self) -> list[int]:
        return [w.shape[1] for w in self.heads]

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        return float32_embedding(self.head, self.backbone(images))

    def normalized_heads(self) -> list[torch.Tensor]:
        axis = 1 if self.args.head_norm == "feature" else 0
        return [F.normalize(w, dim=axis) for w in self.heads]

    def head_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        f = self.embedding(images)
        return [f @ w / self.args.head_t for w in self.normalized_heads()]

    def forward(self, crops, batch: Batch, progress: Progress):
        n = crops[0].shape[0]
        f = self.embedding(torch.cat(crops))
        with torch.autocast(self.device.type, enabled=False):
            f = f.float()
            losses = []
            for w in self.normalized_heads():
                probs = F.softmax(f @ w / self.args.head_t, dim=1)
                losses.append(iic_loss(probs[:n], probs[n:]))
            self.record_head_losses(losses)
            assign = torch.stack(losses).mean()
            similarities = f @ distributed.all_gather_cat(f.detach()).t()
            consistency = aug_loss(similarities, *two_view_columns(n, f.device), self.args.batch_t)
        terms = {"iic": assign.detach(), "cp": consistency.detach(),
                 **{f"head{h}": loss.detach() for h, loss in enumerate(losses)}}
        return assign + self.args.cp_weight * consistency, terms
