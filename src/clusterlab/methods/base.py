"""What every method shares: the batch it is given, where training stands, and the small interface it implements.

A method is an nn.Module that owns its backbone, heads, augmentation and any state that lives across steps
(queues, memory banks, an EMA teacher). The engine calls, per step: `before_step`, `prepare` (augmentation, outside
autocast), `forward` (the loss, inside autocast and DDP), backward, `after_backward` (gradients are there, weights
not yet updated), `takes_the_step` (whether the optimiser applies them), the optimiser and scaler step,
`after_step` (weights updated; before any checkpoint can be written). `param_groups` gives the optimiser its groups; `extra_state` / `random_state` what a checkpoint keeps
beyond parameters and buffers. A new method is a module with a subclass of Method and a line in METHODS.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .. import cli, distributed
from ..data.augment import ColorSpec, EvalView, MultiCrop, crop_specs, refuse_oversized
from ..config import (area_fraction, finite_float, non_negative_float, non_negative_int, positive_float, positive_int,
                      probability)
from ..errors import ConfigError
from ..models import INITS
from ..models.heads import unit_rows


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about its training data."""

    channels: int
    image_size: int
    num_samples: int
    num_classes: int
    mean: tuple
    std: tuple
    fingerprint: str = ""  # ImageSet.fingerprint of the training set ("": a checkpoint written before it was kept)

    @classmethod
    def of(cls, images, mean=None, std=None) -> "DataInfo":
        """`mean` / `std` (the --mean / --std flags) replace the dataset's normalisation when given."""
        mean, std = tuple(mean or images.mean), tuple(std or images.std)
        if len(mean) != images.channels or len(std) != images.channels:
            raise ConfigError(f"--mean {list(mean)} / --std {list(std)} need one value per channel "
                              f"({images.channels} for {images.name})")
        if 0 in std:  # (the flag takes positive numbers only: the data's own statistics)
            raise ConfigError(f"the images of {images.name} have a constant channel (std {list(std)}): normalising "
                              f"would divide by 0; give --std a positive value for every channel")
        return cls(images.channels, images.image_size, len(images), images.num_classes, mean, std, images.fingerprint)


@dataclass
class Batch:
    images: torch.Tensor   # uint8 (n, C, H, W) on the training device; image files: CutCrops (augment.py)
    labels: torch.Tensor   # used by monitors only, never by a loss
    indices: torch.Tensor  # positions in the training set (memory banks, pseudo-labels)
    global_size: int       # samples in the global batch
    offset: int            # where this rank's samples start inside it


@dataclass
class Progress:
    epoch: int
    step: int
    global_step: int
    steps_per_epoch: int


class Method(nn.Module):
    name: ClassVar[str] = ""
    # "pretrain": trained by main_pretrain.py; "cluster": by main_cluster.py, has heads. Also the checkpoint's kind.
    program_kind: ClassVar[str] = "pretrain"
    # Flags that must match to resume, beyond engine.RESUME_KEYS.
    extra_resume_keys: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        """Add the method's own flags and set the defaults of shared flags that differ for it."""

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        super().__init__()
        self.args, self.info, self.device = args, info, device

    def attach_data(self, train_set) -> None:
        """The training set, for methods that look at all of it (SeLa's labelling); most ignore it."""

    # ---- per step ----
    def on_epoch_start(self, epoch: int) -> None:
        pass

    def before_step(self, progress: Progress) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        """After the last step of an epoch, before its checkpoint (collective)."""

    @torch.no_grad()
    def prepare(self, batch: Batch):
        return self.augment(batch.images, batch.global_size, batch.offset)

    def forward(self, inputs, batch: Batch, progress: Progress) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_backward(self, progress: Progress) -> None:
        pass

    def takes_the_step(self) -> bool:
        """Whether the optimiser applies this step's gradients; every rank must answer alike. Always, by default
        (without waiting for the device)."""
        return True

    def after_step(self, progress: Progress) -> None:
        pass

    def param_groups(self) -> list[dict]:
        """The optimiser's groups: dicts with "params" and, optionally, "weight_decay" and "lr_scale" (the
        schedule's learning rate is multiplied by it). Default: every trainable parameter, with biases and norm
        weights in a group without weight decay when --no_decay_bias_norm is on."""
        return split_decay(self.named_parameters(), self.args.no_decay_bias_norm)

    def whole_run_settings(self, steps_per_epoch: int) -> list[str]:
        """Settings whose length covers the whole run (told on one line each at start): a length given in
        iterations means more or less on another dataset's size."""
        return []

    def recorded(self) -> dict:
        """Entries config.yaml records beside the flags (where a run's weights started from)."""
        return {}

    # ---- state beyond parameters and buffers ----
    def extra_state(self) -> dict:
        """Collective: called on every rank before rank 0 writes a checkpoint."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def random_state(self) -> dict:
        return {"augment": self.augment.state_dict()}

    def load_random_state(self, state: dict) -> None:
        self.augment.load_state_dict(state["augment"])

    # ---- evaluation ----
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of normalised test views (what kNN, k-means and the linear probe use)."""
        return self.backbone(images)

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The method's own L2-normalised embedding; the backbone features where it has none."""
        return unit_rows(self.features(images))

    @property
    def monitor_temperature(self) -> float:
        """The kNN monitor's vote temperature: the method's own where it has one (the memory bank's), else 0.1."""
        return 0.1

    @property
    def eval_size(self) -> int:
        return test_view_size(self.args.eval_crop, self.args.size_crops, self.info.image_size)

    def non_finite_hint(self) -> str:
        """A flag of this run that may have made its loss non-finite, named for the stop's message ('' for none)."""
        return ""

    def check_training_settings(self) -> None:
        """Settings no run can train with, refused before anything is written (training starts only: evaluations
        rebuild the methods of runs that older code trained). Crops or a test view above MAX_UPSCALE times the
        images' size (data/augment.refuse_oversized), or smaller than the backbone takes (AlexNet's pools need 63 px;
        they failed at the first step, deep inside a pooling layer); more than MAX_CROPS crops of an image; a hue
        jitter that
        --color_strength scales past half the colour circle (it wraps; torchvision refuses it); a kNN monitor on a
        memory bank the method does not keep (it failed at the first epoch's end)."""
        args = self.args
        refuse_oversized({"--size_crops": max(args.size_crops), "--eval_crop": args.eval_crop,
                          "--eval_resize": args.eval_resize}, self.info.image_size)
        if sum(args.nmb_crops) > MAX_CROPS:  # sizes have a bound of their own; counts ran out of memory as well
            raise ConfigError(f"--nmb_crops {' '.join(map(str, args.nmb_crops))} is {sum(args.nmb_crops)} crops of "
                              f"each image; use at most {MAX_CROPS} in all")
        smallest = getattr(self.backbone, "min_input_size", 1)
        given = min(*(size or self.info.image_size for size in args.size_crops), self.eval_size)
        if given < smallest:
            raise ConfigError(f"--arch {args.arch} takes images of {smallest} px or more; this run gives it "
                              f"{given} px (--size_crops {' '.join(map(str, args.size_crops))}, a test view of "
                              f"{self.eval_size} px): ask for larger --size_crops / --eval_crop, or another --arch")
        for strength in per_group(args, "color_strength", len(args.nmb_crops)):
            if strength * args.hue > 0.5:
                raise ConfigError(f"--color_strength {strength:g} x --hue {args.hue:g} is a hue jitter of "
                                  f"{strength * args.hue:g}; the product must be at most 0.5")
        if args.knn_monitor_every and args.knn_monitor_features == "memory_bank" and not hasattr(self, "memory_bank"):
            raise ConfigError(f"--knn_monitor_features memory_bank: {args.method} keeps no memory bank (NPID and "
                              f"Super-AND do); give recomputed or auto")

    @property
    def eval_view(self) -> EvalView:
        return EvalView.of(self.eval_size, self.args.eval_resize)


# More crops of each image than this is a slip of the keyboard (multi-crop recipes use 2 to 14): a batch of them ran
# out of memory with a traceback.
MAX_CROPS = 64


def test_view_size(eval_crop: int, size_crops: list[int], image_size: int) -> int:
    """The test view's size: --eval_crop, else the largest training crop (a --size_crops 0: the images' size)."""
    return eval_crop or max(size or image_size for size in size_crops)


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The flags main_pretrain.py and main_cluster.py share: data, backbone, optimisation, augmentation, runtime."""
    cli.add_data_args(parser)
    parser.add_argument("--train_split", default="train", help="split to train on (stl10: train+unlabeled too)")
    parser.add_argument("--arch", default="resnet18_cifar", help="backbone (see clusterlab.models.BACKBONES)")
    parser.add_argument("--width", type=positive_int, default=64, help="backbone width (64: the standard ResNet-18)")
    parser.add_argument("--init", choices=INITS, default="kaiming",
                        help="backbone initialisation: kaiming-normal convolutions (fan_out; SwAV, SeLa), PyTorch's "
                             "default, or legacy: PyTorch's default before 1.2, batch-norm weights U(0, 1) (what "
                             "NPID's PyTorch 0.4 and EmbedUL's 1.1.0 drew: their CIFAR recipes take it)")
    cli.add_optim_args(parser)
    add_augmentation_args(parser)
    cli.add_runtime_args(parser)
    cli.add_run_args(parser)


def split_decay(named_parameters, exclude_bias_and_norm: bool) -> list[dict]:
    """Trainable parameters as one group, or as two when 1-D parameters (biases, norm weights) get no decay."""
    trainable = [(name, p) for name, p in named_parameters if p.requires_grad]
    if not exclude_bias_and_norm:
        return [{"params": [p for _, p in trainable]}]
    return [{"params": [p for _, p in trainable if p.ndim > 1]},
            {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0}]


def backbone_features(backbone: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
    """Backbone features of all crops, concatenated in crop order; consecutive crops of one resolution go through
    the backbone as one batch (as SwAV's and Self-Classifier's code do, so BN sees them together)."""
    features, start = [], 0
    while start < len(crops):
        end = start + 1
        while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
            end += 1
        features.append(backbone(torch.cat(crops[start:end])))
        start = end
    return torch.cat(features)


def two_view_columns(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows [view 1; view 2] of n images on each rank, gathered in rank order: each local row's own column
    and its other view's column (the `own` and `partner` of losses.superand.aug_loss; Super-AND and EmbedUL)."""
    local = torch.arange(2 * n, device=device)
    start = distributed.rank() * 2 * n
    return start + local, start + (local + n) % (2 * n)


def add_augmentation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("augmentation (per crop group: count, size, scale range; then colour)")
    group.add_argument("--nmb_crops", type=positive_int, nargs="+", default=[2], help="crops per group")
    group.add_argument("--size_crops", type=non_negative_int, nargs="+", default=[0],
                       help="crop size per group (0: image size; at most 8 times the images' size)")
    group.add_argument("--min_scale_crops", type=area_fraction, nargs="+", default=[0.14])
    group.add_argument("--max_scale_crops", type=area_fraction, nargs="+", default=[1.0])
    group.add_argument("--brightness", type=non_negative_float, default=0.4)
    group.add_argument("--contrast", type=non_negative_float, default=0.4)
    group.add_argument("--saturation", type=non_negative_float, default=0.4)
    group.add_argument("--hue", type=hue_range, default=0.1)
    group.add_argument("--jitter_p", type=probability, nargs="+", default=[0.8],
                       help="probability of colour jitter (one value, or one per crop group)")
    group.add_argument("--color_strength", type=non_negative_float, nargs="+", default=[1.0],
                       help="factor on brightness, contrast, saturation and hue (one value, or one per crop group)")
    group.add_argument("--grey_p", type=probability, nargs="+", default=[0.2],
                       help="probability of greyscale (one value, or one per crop group)")
    group.add_argument("--blur_p", type=probability, nargs="+", default=[0.0],
                       help="probability of Gaussian blur (0: none, as CIFAR; one value, or one per crop group)")
    group.add_argument("--solarize_p", type=probability, nargs="+", default=[0.0],
                       help="probability of solarisation (one value, or one per crop group)")
    group.add_argument("--flip_p", type=probability, default=0.5, help="probability of a horizontal flip")
    group.add_argument("--mean", type=finite_float, nargs="*", default=[],
                       help="normalisation mean (default: the dataset's)")
    group.add_argument("--std", type=positive_float, nargs="*", default=[], help="normalisation std (default: the dataset's)")


def hue_range(text: str) -> float:
    value = non_negative_float(text)
    if value > 0.5:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hue jitter (use a value from 0 to 0.5)")
    return value


PER_GROUP_COLOUR = ("color_strength", "jitter_p", "grey_p", "blur_p", "solarize_p")


def per_group(args: argparse.Namespace, flag: str, groups: int) -> list[float]:
    """One value of `flag` per crop group: a single value serves every group (a run recorded before the flag took
    lists holds a plain number, one recorded before the flag existed nothing)."""
    value = getattr(args, flag, None)
    values = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    values = values or [{"color_strength": 1.0, "solarize_p": 0.0}[flag]]
    if len(values) == 1:
        return values * groups
    if len(values) != groups:
        raise ConfigError(f"--{flag} {values}: give one value, or one per crop group ({groups} in --nmb_crops "
                          f"{args.nmb_crops})")
    return values


def build_multicrop(args: argparse.Namespace, info: DataInfo) -> MultiCrop:
    """Crop groups from --nmb_crops / --size_crops / --min_scale_crops / --max_scale_crops, each with its own colour
    settings where a PER_GROUP_COLOUR flag gives one value per group (BYOL-style asymmetric views)."""
    sizes = [s if s > 0 else info.image_size for s in args.size_crops]
    crops = crop_specs(args.nmb_crops, sizes, args.min_scale_crops, args.max_scale_crops)
    columns = zip(*(per_group(args, flag, len(crops)) for flag in PER_GROUP_COLOUR))
    colours = [ColorSpec(strength * args.brightness, strength * args.contrast, strength * args.saturation,
                         strength * args.hue, jitter_p, grey_p, blur_p, flip_p=args.flip_p, solarize_p=solarize_p)
               for strength, jitter_p, grey_p, blur_p, solarize_p in columns]
    crops = [dataclasses.replace(crop, color=colour) for crop, colour in zip(crops, colours)]
    return MultiCrop(crops, colours[0], info.mean, info.std, info.image_size, seed=args.seed)
