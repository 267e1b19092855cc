"""SCAN stage 2, clustering by the neighbours of a pre-trained embedding (Van Gansbeke, Vandenhende, Georgoulis,
Proesmans and Van Gool, "SCAN: Learning to Classify Images without Labels", ECCV 2020, arXiv:2005.12320; upstream
code wvangansbeke/Unsupervised-Classification@952ec31 scan.py, utils/train_utils.py `scan_train`,
data/custom_dataset.py `NeighborsDataset`, utils/memory.py `mine_nearest_neighbors`).

`--pretrained` is any run of this suite with a backbone (SwAV, Un-Mix, NPID, Super-AND, ...). Before the first step
the backbone's features of every training image, L2-normalised, give each image its K = `--num_neighbours` nearest
others by cosine (ops/knn.dataset_neighbours); with the image itself they form its K + 1 candidates, as upstream's
search of K + 1 includes the sample. The images are seen as the pre-trained run saw its test view (its size, from
its `--size_crops` / `--eval_crop` / `--eval_resize`), which is where its embedding was trained and scored:
upstream mines at the end of the pretext stage, with the pretext's validation transform; `--mining_crop N` mines on
the whole images at N px instead. (SwAV on digits trains 16 px crops of the 8 px images: mined on this run's own
8 px view, 54 % of the neighbour pairs shared their label, on its 16 px test view 74 %. On Fashion-MNIST, 20 px
crops of 28 px images, the images' own size did a little better: docs/methods/scan.md.) The neighbours are kept in
the checkpoint, so a resumed run draws from the same lists.

Per step each anchor a of the batch is paired with one candidate n(a) drawn uniformly among its K + 1 (itself
possible, as upstream); both get the strong augmentation (data/randaugment.py) and go through the backbone in two
passes. On the backbone sit `--num_heads` linear heads of `--head_classes` classes, each trained with
losses/scan.scan_loss; the step's loss is the sum over the heads, as upstream's. The whole network is trained
(upstream's `update_cluster_head_only: False`). The head reported is the one with the lowest mean of consistency -
entropy (upstream's selection formula, entropy weight 1 whatever the training's) over the last epoch's training
steps (upstream evaluates that formula on the test split's neighbours).
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn as nn

from .. import distributed
from ..checkpoint import non_finite_rows
from ..config import class_count_or_dataset, non_negative_float, non_negative_int, positive_int
from ..data.augment import MAX_UPSCALE, EvalView, refuse_oversized
from ..data.loader import resident
from ..data.randaugment import StrongAugment
from ..errors import CheckpointError, ConfigError
from ..losses.scan import scan_loss
from ..models import build_backbone, training_mode
from ..ops.knn import dataset_neighbours, neighbour_label_agreement
from .base import Batch, DataInfo, Progress, test_view_size
from .cluster_base import ClusterMethod
from .scan_base import add_strong_augment_args, require_in_memory

# Offset from --seed of the generator that picks each anchor's neighbour (the augmentation uses --seed itself).
PICK_SEED = 1


class SCAN(ClusterMethod):
    name = "scan"
    starts_from = "an embedding run (SwAV, Un-Mix, NPID...), whose features give the neighbours"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("scan")
        group.add_argument("--num_heads", type=positive_int, default=1,
                           help="clustering heads (1 in upstream's CIFAR and STL-10 recipes, 10 for ImageNet)")
        group.add_argument("--head_classes", type=class_count_or_dataset, default=0,
                           help="classes of every head (0: the dataset's)")
        group.add_argument("--num_neighbours", "--num_neighbors", type=positive_int, default=20,
                           help="K nearest neighbours mined for every training image")
        group.add_argument("--entropy_weight", type=non_negative_float, default=5.0,
                           help="weight of the entropy of the mean prediction")
        group.add_argument("--mining_crop", type=non_negative_int, default=0,
                           help="size in px of the whole-image view the neighbours are mined on (0: the pre-trained "
                                "run's test view, where its embedding was trained and scored)")
        add_strong_augment_args(group)
        # upstream configs/scan/scan_cifar10.yml
        parser.set_defaults(optimizer="adam", lr=1e-4, weight_decay=1e-4, schedule="constant", warmup_epochs=0,
                            epochs=50, batch_size=128)

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        super().__init__(args, info, device)
        if args.num_neighbours >= info.num_samples:
            raise ConfigError(f"--num_neighbours {args.num_neighbours} needs more training images than the "
                              f"{info.num_samples} there are (use at most {info.num_samples - 1})")
        self.backbone = build_backbone(args.arch, info.channels, args.width, args.init)
        classes = args.head_classes or info.num_classes
        self.heads = nn.ModuleList(nn.Linear(self.backbone.out_dim, classes) for _ in range(args.num_heads))
        self.augment = StrongAugment(args.strong_ops, args.cutout, info.mean, info.std, args.seed)
        self.pick = torch.Generator().manual_seed(args.seed + PICK_SEED)
        self.neighbours: torch.Tensor | None = None  # (N, K + 1): each image, then its K nearest others
        self.pretrained_view: EvalView | None = None  # the pre-trained run's test view
        self.mined_on: EvalView | None = None  # the view the neighbours were mined on, once they are (checkpointed)
        self.train_set = None

    def attach_data(self, train_set) -> None:
        require_in_memory(train_set, self.name)
        self.train_set = train_set

    @property
    def head_sizes(self) -> list[int]:
        return [head.out_features for head in self.heads]

    def head_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        features = self.backbone(images)
        return [head(features) for head in self.heads]

    # ---- neighbours ----
    def load_pretrained(self, source: str, path, state: dict) -> str:
        loaded = super().load_pretrained(source, path, state)
        saved = state.get("args", {})
        if "size_crops" in saved:
            size = test_view_size(saved.get("eval_crop", 0), saved["size_crops"], self.info.image_size)
            limit = MAX_UPSCALE * self.info.image_size
            if size > limit and not self.args.mining_crop:  # (a run of larger images: a batch ran out of memory)
                raise ConfigError(f"--pretrained {source!r} scores its embedding on {size} px views, more than "
                                  f"{MAX_UPSCALE} times this dataset's {self.info.image_size} px images, on which "
                                  f"the neighbours would be mined: give --mining_crop (at most {limit})")
            self.pretrained_view = EvalView.of(size, saved.get("eval_resize", 0))
        return loaded

    @property
    def neighbours_view(self) -> EvalView:
        """The view the neighbours were mined on; before they are: --mining_crop, else the pre-trained run's test
        view, else (no --pretrained) this run's. A resumed run keeps the first start's, whatever --mining_crop says
        now (its neighbours come from the checkpoint)."""
        if self.mined_on is not None:
            return self.mined_on
        return EvalView.of(self.args.mining_crop) if self.args.mining_crop else self.pretrained_view or self.eval_view

    def check_training_settings(self) -> None:
        super().check_training_settings()
        refuse_oversized({"--mining_crop": self.args.mining_crop}, self.info.image_size)
        smallest = getattr(self.backbone, "min_input_size", 1)
        if 0 < self.args.mining_crop < smallest:
            raise ConfigError(f"--mining_crop {self.args.mining_crop}: --arch {self.args.arch} takes images of "
                              f"{smallest} px or more; ask for {smallest} or more, or 0 (the pre-trained run's test "
                              f"view)")

    def recorded(self) -> dict:
        return {**super().recorded(), "neighbours_mined_on": dataclasses.asdict(self.neighbours_view)}

    @torch.no_grad()
    def mine_neighbours(self) -> torch.Tensor:
        """Collective: each training image and its K nearest others by the cosine of the backbone's features of
        `neighbours_view` (eval mode), (N, K + 1) int64."""
        from ..eval.features import extract  # eval.features imports the methods package: import it when used

        with training_mode(self, False):
            features = extract(self.backbone, self.train_set, self.neighbours_view, self.info.mean, self.info.std,
                               self.device, workers=self.args.workers)
        overflowing = non_finite_rows(features)
        if overflowing:  # (every rank holds the gathered features: every rank raises)
            origin = f"--pretrained {self.args.pretrained!r}" if self.args.pretrained else "the run's checkpoint"
            raise CheckpointError(f"the backbone of {origin} gives non-finite features for {overflowing} of "
                                  f"{len(features)} training images (its weights are finite but overflow: the run "
                                  f"diverged): no neighbours to mine; start from an earlier checkpoint of it")
        found = dataset_neighbours(features, self.args.num_neighbours + 1, include_self=True, split_over_ranks=True)
        self.mined_on = self.neighbours_view
        return found.indices

    def before_step(self, progress: Progress) -> None:
        if self.neighbours is not None:
            return
        self.neighbours = self.mine_neighbours().to(self.device)
        if distributed.rank() == 0:
            labels = self.train_set.labels.to(self.device)
            agree = neighbour_label_agreement(labels, labels[self.neighbours[:, 1:]])
            view = self.neighbours_view
            print(f"scan: {self.args.num_neighbours} neighbours of {len(self.neighbours)} images mined on "
                  f"{view.crop} px views; {100 * agree:.2f}% of the labelled pairs share their image's label (a "
                  f"monitor, never used)", flush=True)

    # ---- training ----
    @torch.no_grad()
    def prepare(self, batch: Batch):
        n = len(batch.indices)
        choice = torch.randint(self.neighbours.shape[1], (batch.global_size,), generator=self.pick)
        choice = choice[batch.offset: batch.offset + n].to(self.device, non_blocking=True)
        partners = self.neighbours[batch.indices, choice]
        pixels, _ = resident(self.train_set, self.device)
        partner_images = pixels[partners.to(pixels.device)].to(self.device)
        anchors = self.augment(batch.images, batch.global_size, batch.offset)
        partner_views = self.augment(partner_images, batch.global_size, batch.offset)
        return anchors, partner_views

    def forward(self, inputs, batch: Batch, progress: Progress):
        anchors, partners = inputs
        anchor_features, partner_features = self.backbone(anchors), self.backbone(partners)
        totals, consistencies, entropies = [], [], []
        with torch.autocast(self.device.type, enabled=False):
            for head in self.heads:
                total, consistency, entropy = scan_loss(head(anchor_features.float()),
                                                        head(partner_features.float()), self.args.entropy_weight)
                totals.append(total)
                consistencies.append(consistency.detach())
                entropies.append(entropy.detach())
        # The head is chosen on consistency - entropy, upstream's selection formula (its entropy weight is 1 there
        # whatever the training's): the training weight of 5 would favour a balanced head that fits its neighbours
        # worse.
        self.record_head_losses([c - e for c, e in zip(consistencies, entropies)])
        terms = {"scan": torch.stack(totals).detach().mean(), "consistency": torch.stack(consistencies).mean(),
                 "entropy": torch.stack(entropies).mean()}
        return torch.stack(totals).sum(), terms

    # ---- state ----
    def extra_state(self) -> dict:
        neighbours = None if self.neighbours is None else self.neighbours.cpu()
        view = self.neighbours_view  # (the one the neighbours were mined on, or, before they are, will be)
        return {**super().extra_state(), "neighbours": neighbours, "mining_view": [view.crop, view.resize]}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        view = state.get("mining_view")
        self.mined_on = None if view is None else EvalView(*view)
        neighbours = state.get("neighbours")
        if neighbours is not None:
            expected = (self.info.num_samples, self.args.num_neighbours + 1)
            if tuple(neighbours.shape) != expected:
                raise ValueError(f"its neighbours are {tuple(neighbours.shape)}, this run needs {expected}")
            self.neighbours = neighbours.to(self.device, torch.long)
            asked = EvalView.of(self.args.mining_crop) if self.args.mining_crop else None
            if asked not in (None, self.mined_on) and distributed.rank() == 0:
                print(f"note: --mining_crop {self.args.mining_crop}: this run's neighbours were mined on "
                      f"{self.mined_on.crop} px views at its first start and are kept (its heads learnt from them); "
                      f"mining on other views takes a new --output_dir", flush=True)

    def random_state(self) -> dict:
        return {"augment": self.augment.state_dict(), "pick": self.pick.get_state()}

    def load_random_state(self, state: dict) -> None:
        self.augment.load_state_dict(state["augment"])
        self.pick.set_state(state["pick"])
