"""SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020,
arXiv:2006.09882): online clustering by swapped prediction of Sinkhorn codes. Upstream code:
facebookresearch/swav@06b1b7c main_swav.py (the CIFAR recipes follow its copy in szq0214/Un-Mix@0911f77
UnMix_SwAV/for_CIFAR/main_swav_unmix.py run with --run_swav true).

Per step: every crop goes through backbone -> projection MLP -> L2 normalisation -> prototypes; for each
assignment crop the Sinkhorn turns its scores (behind the queue's, when the queue is full) into codes, and every
other crop predicts them (losses/swav.py). Prototypes are re-normalised before every step and receive no gradient
for the first `freeze_prototypes_niters` iterations.
"""
from __future__ import annotations

import argparse

import torch

from .. import distributed
from ..config import (declare_alternatives, non_negative_float, non_negative_int, positive_float, positive_int,
                      prototype_count)
from ..errors import ConfigError
from ..losses.swav import swav_loss
from ..models import Prototypes, build_backbone, projection_mlp
from ..models.heads import float32_embedding
from ..ops.queue import EmbeddingQueue, check_queue_length
from ..ops.sinkhorn import sinkhorn
from .base import Batch, DataInfo, Method, Progress, backbone_features, build_multicrop

SINKHORN_DTYPES = {"float32": torch.float32, "float64": torch.float64}


SMALL_EPSILON = 0.01  # below this, a non-finite loss may be the Sinkhorn's underflow (non_finite_hint)


class SwAV(Method):
    name = "swav"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("swav")
        group.add_argument("--hidden_dim", "--hidden_mlp", type=non_negative_int, default=2048,
                           help="projection MLP hidden size (0: one linear layer)")
        group.add_argument("--embed_dim", "--feat_dim", type=non_negative_int, default=128,
                           help="embedding size (0: no projection, the backbone features)")
        group.add_argument("--nmb_prototypes", type=prototype_count, default=3000)
        group.add_argument("--temperature", type=positive_float, default=0.1)
        group.add_argument("--epsilon", type=positive_float, default=0.05, help="Sinkhorn entropic regularisation")
        group.add_argument("--sinkhorn_iterations", type=positive_int, default=3)
        group.add_argument("--sinkhorn_dtype", choices=sorted(SINKHORN_DTYPES), default="float32")
        group.add_argument("--crops_for_assign", type=non_negative_int, nargs="+", default=[0, 1])
        group.add_argument("--queue_length", type=non_negative_int, default=0, help="global queue length (0: no queue)")
        group.add_argument("--epoch_queue_starts", type=non_negative_int, default=15)
        group.add_argument("--freeze_prototypes_niters", type=non_negative_int, default=313,
                           help="iterations during which the prototypes get no gradient")
        group.add_argument("--freeze_prototypes_epochs", type=non_negative_float, default=None,
                           help="the same length in epochs, rounded to the nearest iteration, halves to even, as "
                                "--warmup_epochs (replaces --freeze_prototypes_niters; the number of iterations an "
                                "epoch has depends on the dataset's size); whichever of the two a config file or the "
                                "command line names last applies (both in one of them: refused)")
        declare_alternatives(parser, "freeze_prototypes_niters", "freeze_prototypes_epochs")
        parser.set_defaults(optimizer="lars", lr=4.8, final_lr=0.0, warmup_epochs=10, schedule="cosine",
                            weight_decay=1e-6, arch="resnet18_cifar")

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        super().__init__(args, info, device)
        self.backbone = build_backbone(args.arch, info.channels, args.width, args.init)
        self.projection = projection_mlp(self.backbone.out_dim, args.hidden_dim, args.embed_dim)
        self.prototypes = Prototypes(args.embed_dim or self.backbone.out_dim, args.nmb_prototypes)
        self.augment = build_multicrop(args, info)
        num_crops = self.augment.num_crops
        bad = [c for c in args.crops_for_assign if not 0 <= c < num_crops]
        if bad or num_crops < 2:
            raise ConfigError(f"--crops_for_assign {args.crops_for_assign} must name crops among the "
                             f"{num_crops} of --nmb_crops {args.nmb_crops} (at least 2 crops)")
        if args.queue_length:
            check_queue_length(args.queue_length, args.batch_size)
        self.queue: EmbeddingQueue | None = None

    # ---- the model ----
    def embed(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised embeddings and prototype scores of all crops, concatenated in crop order."""
        z = float32_embedding(self.projection, backbone_features(self.backbone, crops))
        return z, self.prototypes(z)

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        return float32_embedding(self.projection, self.backbone(images))

    # ---- training ----
    def on_epoch_start(self, epoch: int) -> None:
        args = self.args
        if args.queue_length > 0 and epoch >= args.epoch_queue_starts:
            if self.queue is None:
                self.queue = self.empty_queue()
        else:  # a resume that moved --epoch_queue_starts past its epoch: no queue before it, as the flag says
            self.queue = None

    def empty_queue(self) -> EmbeddingQueue:
        """An empty queue of --queue_length embeddings for each crop of --crops_for_assign (each rank its share)."""
        args = self.args
        return EmbeddingQueue(len(args.crops_for_assign), args.queue_length, self.prototypes.weight.shape[1],
                              args.batch_size, distributed.world_size(), self.device)

    def before_step(self, progress: Progress) -> None:
        self.prototypes.normalize_()

    def forward(self, crops, batch: Batch, progress: Progress):
        z, scores = self.embed(crops)
        n = crops[0].shape[0]
        z_per_crop, scores_per_crop = z.split(n), scores.split(n)
        codes = {crop: self.codes(position, scores_per_crop[crop], z_per_crop[crop])
                 for position, crop in enumerate(self.args.crops_for_assign)}
        if self.queue is not None:
            self.queue.advance(n)
        loss = swav_loss(scores_per_crop, codes, self.args.temperature)
        return loss, {"swav": loss.detach()}

    def non_finite_hint(self) -> str:
        # exp(scores / epsilon), each iteration's sums and quotients: in float32 they underflow from an epsilon of a
        # few thousandths on (a NaN loss at the first step), in float64 far later
        if self.args.epsilon < SMALL_EPSILON and self.args.sinkhorn_dtype == "float32":
            return (f"--epsilon {self.args.epsilon:g} is small enough for the Sinkhorn to underflow in float32: raise "
                    f"it, or compute it with --sinkhorn_dtype float64")
        return ""

    @torch.no_grad()
    def codes(self, position: int, scores: torch.Tensor, z: torch.Tensor, push: bool = True) -> torch.Tensor:
        """Sinkhorn codes of one assignment crop; with a full queue its scores are solved together."""
        out = scores.detach()
        if self.queue is not None:
            if self.queue.full:
                out = torch.cat([self.queue.scores(position, self.prototypes.weight), out])
            if push:
                self.queue.push(position, z)
        q = sinkhorn(out, self.args.epsilon, self.args.sinkhorn_iterations, SINKHORN_DTYPES[self.args.sinkhorn_dtype])
        return q[-scores.shape[0]:]

    def after_backward(self, progress: Progress) -> None:
        if progress.global_step < self.freeze_steps(progress.steps_per_epoch):
            for p in self.prototypes.parameters():
                p.grad = None

    def freeze_steps(self, steps_per_epoch: int) -> int:
        epochs = self.args.freeze_prototypes_epochs
        return self.args.freeze_prototypes_niters if epochs is None else round(epochs * steps_per_epoch)

    def whole_run_settings(self, steps_per_epoch: int) -> list[str]:
        args, total = self.args, self.args.epochs * steps_per_epoch
        notes = []
        if self.freeze_steps(steps_per_epoch) >= total:
            notes.append(f"the prototypes stay frozen for the whole run ({self.freeze_steps(steps_per_epoch)} "
                         f"freezing iterations >= {total} in {args.epochs} epochs of {steps_per_epoch}; "
                         f"--freeze_prototypes_epochs sets the length in epochs)")
        if args.queue_length and args.epoch_queue_starts >= args.epochs:
            notes.append(f"the queue never starts (--epoch_queue_starts {args.epoch_queue_starts} >= --epochs "
                         f"{args.epochs})")
        elif args.queue_length:
            # Its scores join the Sinkhorn only once it is full: at the step after it holds queue_length embeddings.
            filling = args.queue_length // args.batch_size
            remaining = (args.epochs - args.epoch_queue_starts) * steps_per_epoch
            if remaining <= filling:
                notes.append(f"the queue never takes part: it is full after {filling} iterations (--queue_length "
                             f"{args.queue_length} / batch {args.batch_size}), the run has {remaining} from "
                             f"--epoch_queue_starts {args.epoch_queue_starts} on ({steps_per_epoch} an epoch)")
        return notes

    # ---- state ----
    def extra_state(self) -> dict:
        return {"queue": self.queue.state_dict() if self.queue is not None else None}

    def load_extra_state(self, state: dict) -> None:
        if state.get("queue") is not None:
            args = self.args
            if not args.queue_length:  # (else refused as "--queue_length 0 must be a positive multiple ...")
                raise ValueError(f"its queue holds {state['queue']['embeddings'].shape[1]} embeddings per crop, this "
                                 f"command has --queue_length 0")
            self.queue = self.empty_queue()
            self.queue.load_state_dict(state["queue"])

