"""SeLa, self-labelling (Yuki M. Asano, Christian Rupprecht and Andrea Vedaldi, "Self-labelling via simultaneous
clustering and representation learning", ICLR 2020, arXiv:1911.05371; upstream code yukimasano/self-label@3891e37:
cifar.py for CIFAR, main.py for ImageNet, sinkhornknopp.py for the labelling).

A backbone with H = `--num_heads` linear heads of `--head_classes` classes each (upstream's `--hc` and `--ncl`) is
trained with cross-entropy to pseudo-labels, one per head and training image: L = 1/H sum_h CE(head_h(x), L_h[index
of x]). At `--nopts` moments of the run the labels are re-solved on the whole training set: every rank computes the
heads' logits of its share of the images, and the whole-dataset Sinkhorn-Knopp (ops/sinkhorn.sela_sinkhorn) turns
them into equipartitioned hard labels of all N.

Schedule, in samples seen = global step x batch size; relabelling k happens at the first step that reaches t_k, at
most one per step, as upstream's training loops do:
  linear (CIFAR code):       t_k = (epochs + 1.0001) N k / (nopts - 1); only head (epoch mod H) is relabelled;
  quadratic (ImageNet code): t_k = (epochs + 1.01) N (k / (nopts - 1))^2; every head is relabelled.
t_0 = 0, so the first labels come from the random network at the first step; until then they are a random balanced
assignment (i mod K, permuted per head). The index of the next relabelling is checkpointed with the labels.

The labelling pass (choices):
- `--label_view train` (default, upstream's quirk): the model in train mode (batch statistics, dropout) on the
  training augmentation; `--label_view eval`: eval mode on the test view.
- Images go through in global chunks of `--label_batch_size` shuffled dataset positions (a permutation of their own
  per labelling), each split over the ranks in contiguous shares (the first ranks one more where it does not split
  evenly), as upstream's labelling reads its shuffled training loader: in a class-sorted image folder, chunks of
  consecutive positions would each hold one class, and train-mode batch statistics would remove what tells the classes
  apart. With synchronised BN the batch statistics of a chunk, and so the labels, are those of one process; the crops
  come from a generator of their own with parameters drawn per dataset position, so they depend neither on the world
  size nor on the chunk size, and the training crops are not disturbed. Unreadable image files are limited as in
  evaluation (data/loader.py).
- BN running statistics are restored afterwards. Upstream's pass updates them too, but training never reads them;
  restoring keeps the statistics evaluation uses equal to what the training batches produced.
- The backbone features of this rank's share (AlexNet: fc7) stay on the device; each relabelled head's logits are
  computed from them, solved, and the labels gathered with their dataset positions and scattered back explicitly
  (upstream's multi-GPU path puts them back with an indexed assignment whose right-hand side aliases its left;
  not reproduced).
- `--label_dtype float64` (default) forms those logits, features W^T + b, in float64, as upstream's CPU code (the
  CIFAR code always; ImageNet with --cpu) multiplies float64 copies of the features by the head's weights;
  `float32` is its multi-GPU path (the product in float32, cast to float64 after).
- Runs in float32 outside autocast (before_step is called outside it). Rank 0 prints the time of every pass.
"""
from __future__ import annotations

import argparse
import bisect
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed
from ..config import class_count, positive_float, positive_int
from ..data import loader as data_loader
from ..data.augment import eval_view
from ..errors import ConfigError
from ..models import build_backbone
from ..models.batchnorm import share_norm_statistics
from ..ops import rows_per_chunk
from ..ops.sinkhorn import SelaSolution, sela_sinkhorn
from .base import Batch, DataInfo, Progress, build_multicrop
from .cluster_base import ClusterMethod

SCHEDULES = ("linear", "quadratic")
# Upstream's margins beyond `epochs` in the schedule formulas (cifar.py, main.py).
SCHEDULE_MARGIN = {"linear": 1.0001, "quadratic": 1.01}
# Offsets from --seed for the generators this method owns (the training augmentation uses --seed itself).
LABELS_SEED, LABEL_VIEW_SEED, LABEL_ORDER_SEED = 1, 2, 3
LABEL_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def relabel_times(schedule: str, epochs: int, num_samples: int, nopts: int) -> list[float]:
    """Samples-seen counts t_0 = 0 < t_1 < ... < t_{nopts-1} at which the labels are re-solved."""
    power = 1 if schedule == "linear" else 2
    span = (epochs + SCHEDULE_MARGIN[schedule]) * num_samples
    return [span * (k / (nopts - 1)) ** power for k in range(nopts)]


def heads_to_relabel(schedule: str, epoch: int, heads: int) -> list[int]:
    """linear: head `epoch mod heads` only (upstream's rule; not a strict round robin, so with about one relabelling
    per epoch a head can be skipped or repeated); quadratic: every head."""
    return [epoch % heads] if schedule == "linear" else list(range(heads))


def labelling_logits(features: torch.Tensor, head: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """One head's logits features W^T + b (N_local x K) for the labelling pass, the product computed in `dtype`,
    chunk by chunk into one N_local x K matrix (the chunks and their concatenation held it twice)."""
    weight, bias = head.weight.detach().to(dtype).t(), head.bias.detach().to(dtype)
    rows = rows_per_chunk(features.shape[1])
    logits = features.new_empty((features.shape[0], weight.shape[1]), dtype=dtype)
    for start in range(0, features.shape[0], rows):
        torch.matmul(features[start: start + rows].to(dtype), weight, out=logits[start: start + rows])
    return logits.add_(bias)


def initial_labels(heads: int, num_samples: int, classes: int, seed: int) -> torch.Tensor:
    """heads x N int64: per head the balanced assignment i mod K in a random order of its own."""
    generator = torch.Generator().manual_seed(seed)
    balanced = torch.arange(num_samples) % classes
    return torch.stack([balanced[torch.randperm(num_samples, generator=generator)] for _ in range(heads)])


class SeLa(ClusterMethod):
    name = "sela"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("sela")
        group.add_argument("--num_heads", "--hc", type=positive_int, default=10, help="number of heads")
        group.add_argument("--head_classes", "--ncl", type=class_count, default=128, help="classes of every head")
        group.add_argument("--lamb", type=positive_float, default=10.0,
                           help="Sinkhorn's lambda, the power of P (10 CIFAR, 25 ImageNet)")
        group.add_argument("--nopts", type=positive_int, default=400,
                           help="label optimisations over the run (at least 2)")
        group.add_argument("--sela_schedule", choices=SCHEDULES, default="linear",
                           help="spacing of the optimisations: linear, one head each (CIFAR) or quadratic, "
                                "all heads (ImageNet)")
        group.add_argument("--sk_tol", type=positive_float, default=0.01,
                           help="Sinkhorn stopping error (0.01 CIFAR, 0.1 ImageNet)")
        group.add_argument("--label_view", choices=("train", "eval"), default="train",
                           help="labelling pass: train mode on training crops (upstream) or eval mode on test views")
        group.add_argument("--label_dtype", choices=sorted(LABEL_DTYPES), default="float64",
                           help="precision of the heads' logits in the labelling pass: float64 as upstream's CPU code "
                                "(CIFAR), float32 as its multi-GPU ImageNet path")
        group.add_argument("--label_batch_size", type=positive_int, default=512,
                           help="images per forward pass of the labelling over all ranks (at least one per rank)")
        # The recipe of upstream's scripts/cifar.sh and cifar.py: one crop of scale 0.2-1, jitter (0.4 x 4) always.
        parser.set_defaults(epochs=400, batch_size=128, optimizer="sgd", lr=0.03, momentum=0.9, weight_decay=5e-4,
                            schedule="step", lr_drops=[240, 320], warmup_epochs=0, nmb_crops=[1], size_crops=[0],
                            min_scale_crops=[0.2], max_scale_crops=[1.0], hue=0.4, jitter_p=1.0)

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        super().__init__(args, info, device)
        if args.nopts < 2:
            raise ConfigError(f"--nopts {args.nopts} must be at least 2 (the first optimisation is at step 0)")
        self.backbone = build_backbone(args.arch, info.channels, args.width, args.init)
        self.heads = nn.ModuleList(nn.Linear(self.backbone.out_dim, args.head_classes) for _ in range(args.num_heads))
        for head in self.heads:  # upstream's initialisation of every linear layer
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        self.augment = build_multicrop(args, info)
        if self.augment.num_crops != 1:
            raise ConfigError(f"--nmb_crops {args.nmb_crops} must be [1] for sela (one view per image and step)")
        self.label_augment = build_multicrop(args, info)
        self.label_augment.generator.manual_seed(args.seed + LABEL_VIEW_SEED)
        self.labels = initial_labels(args.num_heads, info.num_samples, args.head_classes,
                                     args.seed + LABELS_SEED).to(device)
        self.times = relabel_times(args.sela_schedule, args.epochs, info.num_samples, args.nopts)
        self.next_relabel = 0
        self.schedule_changed = False  # resumed under other --epochs / --nopts / --sela_schedule (load_extra_state)
        self.train_set = None

    def attach_data(self, train_set) -> None:
        self.train_set = train_set

    # ---- heads ----
    @property
    def head_sizes(self) -> list[int]:
        return [self.args.head_classes] * self.args.num_heads

    def head_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The heads in float32 also under autocast (only the backbone runs in bf16 / fp16, as in every method)."""
        features = self.backbone(images)
        with torch.autocast(features.device.type, enabled=False):
            return [head(features.float()) for head in self.heads]

    # ---- training ----
    def whole_run_settings(self, steps_per_epoch: int) -> list[str]:
        """The relabellings the run reaches: its clock counts the samples of full batches (as upstream's does), so
        a batch size that leaves many images out of every epoch reaches fewer of them than the --nopts the recipe
        plans (those beyond `epochs` whole epochs of images lie beyond any run, by upstream's design)."""
        args, images = self.args, self.info.num_samples
        # (the clock at the run's last step, and where it would stand with every image in every epoch)
        reached = sum(time <= (args.epochs * steps_per_epoch - 1) * args.batch_size for time in self.times)
        planned = sum(time <= args.epochs * images - args.batch_size for time in self.times)
        # (a batch's remainder costs one at times: CIFAR's 128 leave 80 of 50,000 images out, 398 of 399 reached)
        if reached >= planned or steps_per_epoch * args.batch_size >= 0.9 * images:
            return []
        return [f"sela: {reached} of --nopts {args.nopts} relabellings fall inside the run, where {planned} would with "
                f"every image in every epoch: full batches of {args.batch_size} take "
                f"{steps_per_epoch * args.batch_size} of the {images} images an epoch, and the relabelling schedule "
                f"counts the samples seen"]

    def schedule_flags(self) -> list:
        return [self.args.sela_schedule, self.args.epochs, self.args.nopts]

    def before_step(self, progress: Progress) -> None:
        if self.schedule_changed:
            # Upstream's resume keeps the new schedule's times still ahead (cifar.py L221-L222): the saved index
            # counts the old schedule's relabellings, and would skip the new ones or fire one at every step.
            self.schedule_changed = False
            # the times the last step run had not reached (a time between it and this step is due now)
            reached = (progress.global_step - 1) * self.args.batch_size
            self.next_relabel = bisect.bisect_right(self.times, reached) if progress.global_step else 0
            if distributed.rank() == 0:
                print(f"sela: the relabelling schedule changed on resume ({' '.join(map(str, self.schedule_flags()))}"
                      f"): {len(self.times) - self.next_relabel} of its {len(self.times)} relabellings lie ahead",
                      flush=True)
        due = self.next_relabel < len(self.times)
        if due and progress.global_step * self.args.batch_size >= self.times[self.next_relabel]:
            self.next_relabel += 1
            heads = heads_to_relabel(self.args.sela_schedule, progress.epoch, self.args.num_heads)
            start = time.time()
            solutions = self.relabel(heads)
            if distributed.rank() == 0:
                used = [int(self.labels[h].unique().numel()) for h in heads]
                print(f"sela: labels of head(s) {heads} solved before step {progress.step + 1}/"
                      f"{progress.steps_per_epoch} of epoch {progress.epoch + 1} ({self.next_relabel}/"
                      f"{len(self.times)}) in {time.time() - start:.1f} s; Sinkhorn iterations "
                      f"{[s.iterations for s in solutions]}, error {max(s.error for s in solutions):.2g}, "
                      f"classes used {used} of {self.args.head_classes}", flush=True)

    def forward(self, crops, batch: Batch, progress: Progress):
        losses = [F.cross_entropy(logits, self.labels[h, batch.indices])
                  for h, logits in enumerate(self.head_logits(crops[0]))]
        self.record_head_losses(losses)
        loss = torch.stack(losses).mean()
        return loss, {"ce": loss.detach()}

    # ---- labelling ----
    @torch.no_grad()
    def relabel(self, heads: list[int]) -> list[SelaSolution]:
        """Re-solve the labels of `heads` on the whole training set (collective: every rank calls it)."""
        features, positions = self.label_features()
        positions = distributed.all_gather_uneven(positions.to(self.device))
        solutions = []
        for h in heads:
            # one head's N_local x K at a time, solved in its own storage (the largest thing a labelling holds)
            solution = sela_sinkhorn(labelling_logits(features, self.heads[h], LABEL_DTYPES[self.args.label_dtype]),
                                     self.args.lamb, self.args.sk_tol, overwrite_scores=True)
            self.require_solved(solution, h)
            self.labels[h, positions] = distributed.all_gather_uneven(solution.labels)
            solutions.append(solution)
        return solutions

    def require_solved(self, solution: SelaSolution, head: int) -> None:
        """A ConfigError naming --lamb (on every rank: `solved` is the same on all) where the Sinkhorn did not solve:
        every image went to one class under a report of error 0."""
        if not solution.solved:
            raise ConfigError(f"--lamb {self.args.lamb:g}: SeLa's Sinkhorn found no labels for head {head} (P^lambda "
                              f"underflows to 0 in float64 for some images or classes, and its scalings are not "
                              f"finite); use a smaller --lamb (10 in upstream's CIFAR recipe, 25 in its ImageNet one)")

    def check_training_settings(self) -> None:
        super().check_training_settings()
        if self.args.head_classes > self.info.num_samples:
            raise ConfigError(f"--head_classes {self.args.head_classes} (--ncl) asks for more clusters than the "
                              f"{self.info.num_samples} training images: use at most {self.info.num_samples}")
        if self.args.label_batch_size < distributed.world_size():
            raise ConfigError(f"--label_batch_size {self.args.label_batch_size} is below the "
                              f"{distributed.world_size()} processes: give every process at least one image per "
                              f"labelling pass")

    @torch.no_grad()
    def label_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of this rank's share of the training set and the dataset positions they belong to."""
        args, images = self.args, self.train_set
        chunks = data_loader.GlobalBatches(len(images), args.label_batch_size, distributed.world_size(),
                                           distributed.rank(), seed=args.seed + LABEL_ORDER_SEED, drop_last=False)
        plan = chunks.plan(self.next_relabel)
        positions = torch.cat([idx for idx, _, _ in plan])
        # The images each batch-norm pass normalises over: the whole chunk with synchronised batch norm, else each
        # process's share of it.
        normalised_over = ([total for _, total, _ in plan] if args.sync_bn and distributed.world_size() > 1
                           else [len(idx) for idx, _, _ in plan])
        train_view = args.label_view == "train"
        params = self.label_augment.sample(len(images))[0] if train_view else None
        crop = self.label_augment.crops[0]
        size = crop.size if train_view else self.eval_size
        # Image files: the workers cut the crop (from these parameters) or the test view.
        files_crop = (crop, params.uniforms[positions]) if train_view and not images.in_memory else None
        if not train_view:
            share_norm_statistics(self)  # eval mode normalises every rank's share alike
        saved = {name: buffer.clone() for name, buffer in self.named_buffers()}
        was_training = self.training
        self.train(train_view)
        features = []
        tally = data_loader.BadFiles.limited(images, self.device)
        try:
            # This rank's share of every chunk (--label_batch_size is at least the world size: only the last chunk
            # can leave a rank none).
            shares = [len(idx) for idx, _, _ in plan if len(idx)]
            for chunk, (batch, idx) in enumerate(data_loader.sequential(images, positions, shares, args.workers,
                                                                        self.device, self.eval_view, files_crop,
                                                                        tally)):
                if train_view:
                    chunk_params = params.take(idx)
                    views = (self.label_augment.apply(batch, chunk_params, size) if images.in_memory
                             else self.label_augment.apply_cut(batch, chunk_params))
                else:
                    views = eval_view(batch, size, self.info.mean, self.info.std)
                features.append(self.labelling_pass(views, train_view, normalised_over[chunk]))
            # A rank whose share of the last chunk is empty still runs it: synchronised BN all-reduces per pass. (So
            # does a rank whose pass ended at a file no run can use, before every rank stops at the check.)
            for chunk in range(len(features), len(chunks)):
                empty = torch.zeros(0, self.info.channels, size, size, device=self.device)
                features.append(self.labelling_pass(empty, train_view, normalised_over[chunk]))
            tally.check_pass(images)
        finally:
            self.train(was_training)
            for name, buffer in self.named_buffers():
                buffer.copy_(saved[name])
        return torch.cat(features), positions

    def labelling_pass(self, views: torch.Tensor, train_view: bool, normalised_over: int) -> torch.Tensor:
        """Backbone features of one chunk's share. Train-mode batch norm over a single image has no variance where a
        layer sees one value per channel (an FC layer's, a last 1x1 map's): every feature would be that layer's
        bias whatever the image. A lone image (a chunk of one, or with unsynchronised BN a share of one) is normalised
        with the running statistics instead (as this pass has moved them so far), on every rank of its pass, so
        that synchronised BN runs no collective on any."""
        self.backbone.train(train_view and normalised_over > 1)
        return self.backbone(views).float()

    # ---- state ----
    def extra_state(self) -> dict:
        return {**super().extra_state(), "labels": self.labels.cpu(), "next_relabel": self.next_relabel,
                "schedule": self.schedule_flags()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "labels" not in state:
            return
        labels = state["labels"]
        if labels.shape != self.labels.shape:
            raise ValueError(f"its labels are {tuple(labels.shape)} (heads x images), this model's "
                             f"{tuple(self.labels.shape)}")
        self.labels = labels.to(self.device, torch.long)
        self.next_relabel = int(state["next_relabel"])
        self.schedule_changed = state.get("schedule", self.schedule_flags()) != self.schedule_flags()

    def random_state(self) -> dict:
        return {**super().random_state(), "label_augment": self.label_augment.state_dict()}

    def load_random_state(self, state: dict) -> None:
        super().load_random_state(state)
        self.label_augment.load_state_dict(state["label_augment"])
