"""Self-Classifier (Amrani, Karlinsky and Bronstein, "Self-Supervised Classification Network", ECCV 2022,
arXiv:2103.10994; upstream code elad-amrani/self-classifier@3935138 src/train.py, src/model.py, src/loss.py, and for
v1 the same repository at 635972b, the last commit with CIFAR code: src/train_cifar.py, src/loss.py).

backbone -> MLP head (`--num_hidden` linear layers, optional BN, LeakyReLU) -> L2 normalisation = z -> classifier
heads of `--head_classes` classes -> logits; the loss (losses/selfclassifier.py) makes every view predict the classes
of the others under a uniform class prior, over the global batch.

Two generations, `--sc_version`:
- v2 (the ECCV code): weight-normalised heads W = g V / ||V|| (rows), g initialised to 1 and trained
  unless `--freeze_heads`; a row temperature and a column temperature; uniform-prior normalisation; all view pairs
  except local-local.
- v1 (the only CIFAR code): fixed random orthonormal heads (QR of a Gaussian, rows normalised at use),
  so the logits are cosines; one temperature (`--row_tau` = `--col_tau`, 0.3 upstream); no prior normalisation.
  It is the same head module with V orthonormal, g = 1 and nothing trained.

Distributed: the logits of every view and head are gathered from all ranks in one differentiable all-gather, so
the batch softmax and the prior normalisation cover the global batch as on one process; a rank's loss is the mean
over its own rows and DDP's gradient average makes the step that of the global-batch loss. The loss runs in
float32 outside autocast, as upstream.

Nearest-neighbour queue (`--queue_length L`, v2's ImageNet recipe; 0 = off, the CIFAR setting; ops/neighbour_queue.py):
the last L view-1 embeddings of the global batch; once it has been filled, view 1's embedding is replaced by its
nearest neighbour in the queue, so no gradient flows through view 1's own embedding then. Not reproduced: the
NN-accuracy monitor (it needs the labels).
"""
from __future__ import annotations

import argparse
import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..config import bool_flag, class_count, non_negative_int, positive_float, positive_int
from ..errors import ConfigError
from ..losses.selfclassifier import self_classifier_loss
from ..models import build_backbone
from ..models.heads import float32_embedding
from ..ops.neighbour_queue import NearestNeighbourQueue
from .base import Batch, DataInfo, Progress, backbone_features, build_multicrop
from .cluster_base import ClusterMethod

VERSIONS = ("v1", "v2")


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, num_hidden: int, use_bn: bool, leaky: bool,
             truncated_normal: bool = True) -> nn.Module:
    """`num_hidden` linear layers (v2's name for their count; v1's `--num-hidden` counts the hidden layers, one
    fewer): 0 none, 1 Linear(in, out), n >= 2 Linear(in, hidden) [BN] act, (n - 2) x [Linear(hidden, hidden) [BN]
    act], Linear(hidden, out); act is LeakyReLU(0.01) or ReLU. `truncated_normal`: Linear weights truncated normal
    with std 0.02, biases 0 (v2's src/model.py); else PyTorch's default (v1 sets none)."""
    if num_hidden == 0:
        return nn.Identity()
    layers = []
    dims = [in_dim] + [hidden_dim] * (num_hidden - 1)
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), *([nn.BatchNorm1d(b)] if use_bn else []),
                   nn.LeakyReLU(inplace=True) if leaky else nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-1], out_dim))
    for layer in layers:
        if truncated_normal and isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class NormalizedClassifier(nn.Module):
    """Bias-free linear classifier with weight W = g V / ||V|| (each class row normalised, as
    torch.nn.utils.weight_norm of a Linear). V starts as nn.Linear's weight (v2) or a random orthonormal matrix
    (v1: nn.init.orthogonal_, the QR of a Gaussian); the gain g starts at 1."""

    def __init__(self, dim: int, classes: int, orthogonal: bool = False):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(classes, dim))
        if orthogonal:
            nn.init.orthogonal_(self.weight_v)
        else:
            nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(classes, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """In float32 also under autocast: the loss divides these logits by temperatures of 0.05 to 0.1."""
        with torch.autocast(z.device.type, enabled=False):
            return F.linear(z.float(), self.weight_g * F.normalize(self.weight_v, dim=1))


def head_sizes(head_classes: list[int], num_heads: int) -> list[int]:
    """One size repeated --num_heads times (v1: 30 heads of 30), or one size per head (v2: 1000 2000 4000 8000)."""
    if len(head_classes) == 1:
        return list(head_classes) * num_heads
    if num_heads not in (1, len(head_classes)):
        raise ConfigError(f"--num_heads {num_heads} does not match the {len(head_classes)} sizes of --head_classes "
                          f"{head_classes} (give one size, or one per head)")
    return list(head_classes)


def gather_views(logits: list[torch.Tensor], num_views: int) -> list[list[torch.Tensor]]:
    """Per head, the logits of every view over the global batch, in one differentiable all-gather.

    `logits[h]` is head h's (V n) x C_h output for this rank's n samples, views one after the other.
    """
    n = logits[0].shape[0] // num_views
    per_sample = [x.float().reshape(num_views, n, -1).transpose(0, 1).reshape(n, -1) for x in logits]
    gathered = distributed.all_gather_with_grad(torch.cat(per_sample, dim=1))
    out, start = [], 0
    for x in logits:
        width = num_views * x.shape[1]
        block = gathered[:, start: start + width].reshape(len(gathered), num_views, x.shape[1])
        out.append(list(block.unbind(1)))
        start += width
    return out


class SelfClassifier(ClusterMethod):
    name = "selfclassifier"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("selfclassifier")
        group.add_argument("--sc_version", choices=VERSIONS, default="v2",
                           help="v2: ECCV loss, learnable weight-normalised heads; v1: the CIFAR code's fixed "
                                "orthonormal heads, one temperature, no prior normalisation")
        group.add_argument("--head_classes", "--cls_size", type=class_count, nargs="+", default=[1000],
                           help="classes of each head (one size: repeated --num_heads times)")
        group.add_argument("--num_heads", "--num_cls", type=positive_int, default=1,
                           help="number of heads of one --head_classes size")
        group.add_argument("--embed_dim", "--dim", type=positive_int, default=128, help="embedding size (MLP output)")
        group.add_argument("--hidden_dim", type=positive_int, default=4096, help="MLP hidden size")
        group.add_argument("--num_hidden", type=non_negative_int, default=2,
                           help="linear layers of the MLP (0: none, the embedding is the backbone feature; v1's "
                                "--num-hidden N counts hidden layers: N + 1 here)")
        group.add_argument("--use_bn", type=bool_flag, default=True, help="BN after each hidden linear layer")
        group.add_argument("--leaky", type=bool_flag, default=True, help="LeakyReLU in the MLP (false: ReLU)")
        group.add_argument("--freeze_heads", "--fixed_cls", type=bool_flag, default=False,
                           help="freeze the v2 heads (v1 heads are always fixed)")
        group.add_argument("--row_tau", type=positive_float, default=0.1,
                           help="temperature of the softmax over classes (v1: its one temperature, 0.3)")
        group.add_argument("--col_tau", type=positive_float, default=0.05,
                           help="temperature of the softmax over the batch (v1: equal to --row_tau)")
        group.add_argument("--eps", type=positive_float, default=1e-12,
                           help="added inside the log of the prior-normalised prediction")
        group.add_argument("--queue_length", "--queue_len", type=non_negative_int, default=0,
                           help="nearest-neighbour queue length (0: off)")
        # The optimisation of upstream's scripts/train_100ep.sh to train_400ep.sh (v2).
        parser.set_defaults(optimizer="lars", lr=4.8, start_warmup=0.3, final_lr=0.0048, warmup_epochs=10,
                            schedule="cosine", weight_decay=1e-6)

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        super().__init__(args, info, device)
        self.v1 = args.sc_version == "v1"
        if self.v1 and args.row_tau != args.col_tau:
            raise ConfigError(f"--sc_version v1 has one temperature: --row_tau {args.row_tau} and --col_tau "
                              f"{args.col_tau} must be equal (0.3 upstream)")
        sizes = head_sizes(args.head_classes, args.num_heads)
        self.backbone = build_backbone(args.arch, info.channels, args.width, args.init)
        self.mlp = mlp_head(self.backbone.out_dim, args.hidden_dim, args.embed_dim, args.num_hidden, args.use_bn,
                            args.leaky, truncated_normal=not self.v1)
        embed_dim = args.embed_dim if args.num_hidden else self.backbone.out_dim
        self.heads = nn.ModuleList(NormalizedClassifier(embed_dim, size, orthogonal=self.v1) for size in sizes)
        if self.v1 or args.freeze_heads:
            self.heads.requires_grad_(False)
        self.augment = build_multicrop(args, info)
        if self.augment.num_crops < 2:
            raise ConfigError(f"--nmb_crops {args.nmb_crops} gives {self.augment.num_crops} view(s); "
                              f"selfclassifier needs at least 2")
        if args.queue_length and args.queue_length < max(2, args.batch_size):
            raise ConfigError(f"--queue_length {args.queue_length} must be 0 (off) or at least --batch_size "
                              f"{args.batch_size} (and 2): the global batch is pushed whole every step")
        self.queue = NearestNeighbourQueue(args.queue_length, embed_dim, device) if args.queue_length else None

    def whole_run_settings(self, steps_per_epoch: int) -> list[str]:
        args, notes = self.args, super().whole_run_settings(steps_per_epoch)
        # it replaces view 1 only once full: from the step after it holds queue_length embeddings
        filling, total = math.ceil(args.queue_length / args.batch_size), args.epochs * steps_per_epoch
        if args.queue_length and total <= filling:
            notes.append(f"the nearest-neighbour queue never takes part: it is full after {filling} iterations "
                         f"(--queue_length {args.queue_length} / batch {args.batch_size}), the run has {total}")
        return notes

    # ---- the model ----
    def embed(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """z of every crop. v2 sends the crops of one size through the backbone together and all of them through the
        MLP at once (its batch norms' statistics cover every view), as upstream's v2; v1's upstream model runs each
        view through backbone and MLP on its own (batch statistics of that view alone; 635972b src/model.py
        L71-L74)."""
        if self.v1:
            return [float32_embedding(self.mlp, self.backbone(crop)) for crop in crops]
        z = float32_embedding(self.mlp, backbone_features(self.backbone, crops), eps=1e-7)
        return list(z.split(crops[0].shape[0]))

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed([images])[0]

    @property
    def head_sizes(self) -> list[int]:
        return [head.weight_v.shape[0] for head in self.heads]

    def head_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        z = self.embedding(images)
        return [head(z) for head in self.heads]

    @property
    def num_global_crops(self) -> int:
        """The crops of the leading groups of the first group's size: `--nmb_crops 2 6` and, with each global crop's
        own colour settings as upstream's, `--nmb_crops 1 1 6 --size_crops 224 224 96` both give 2."""
        groups = self.augment.crops
        return sum(g.count for g in itertools.takewhile(lambda g: g.size == groups[0].size, groups))

    # ---- training ----
    def forward(self, crops, batch: Batch, progress: Progress):
        z = self.embed(crops)
        if self.queue is not None:
            z[0] = self.queue.step(z[0], batch.indices)
        z = torch.cat(z)
        logits = [head(z) for head in self.heads]
        args, n = self.args, crops[0].shape[0]
        with torch.autocast(self.device.type, enabled=False):
            views = gather_views(logits, len(crops))
            rows = slice(batch.offset, batch.offset + n)
            losses = [self_classifier_loss(v, rows, args.row_tau, args.col_tau, self.num_global_crops,
                                           uniform_prior=not self.v1, eps=args.eps) for v in views]
        self.record_head_losses(losses)
        loss = torch.stack(losses).mean()
        return loss, {"sc": loss.detach()}

    # ---- state ----
    def extra_state(self) -> dict:
        return {**super().extra_state(), "queue": self.queue.state_dict() if self.queue is not None else None}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        saved = state.get("queue")
        if saved is not None and self.queue is None:
            # (the queue would be dropped without a word, and with it the nearest neighbours that replace view 1)
            raise ValueError(f"its nearest-neighbour queue holds {saved['embeddings'].shape[0]} embeddings, this "
                             f"command has --queue_length 0")
        if self.queue is not None and saved is not None:
            self.queue.load_state_dict(saved)
