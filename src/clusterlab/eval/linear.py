"""The linear probe: a linear classifier trained on a frozen backbone, as szq0214/Un-Mix@0911f77
UnMix_SwAV/for_CIFAR/eval_linear.py (SwAV's eval_linear.py for CIFAR) trains it.

`LinearProbe` is a Method, so the engine trains it with everything runs get (exact resume, signals, NaN guard,
logs). The backbone stays in eval mode (BN uses its running statistics) and receives no gradient. Two protocols:
`augmented` (upstream's: RandomResizedCrop with scale 0.08-1 and a flip on every step, the backbone run each time)
and `cached` (features of the unaugmented train images extracted once; minutes instead of hours, a different
protocol, recorded as such).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.augment import ColorSpec, CropSpec, MultiCrop
from ..methods.base import Batch, DataInfo, Method, Progress


class FeatureSet:
    """Precomputed features standing in for images, so the engine's batching serves the cached protocol."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = features, labels
        self.in_memory = True
        self.cache = {}  # the loader's copy on the training device

    def __len__(self) -> int:
        return len(self.labels)


# The flags of a probe's optimisation: with batch_size and seed (engine.RESUME_KEYS), they define its result.
# (`optimizer` is a resume key of every run too; a probe checks it here as well, where it names the probe folder.)
OPTIMISATION_FLAGS = ("epochs", "optimizer", "lr", "final_lr", "schedule", "warmup_epochs", "start_warmup", "lr_drops",
                      "lr_gamma", "schedule_period", "momentum", "nesterov", "weight_decay", "no_decay_bias_norm",
                      "lars_trust", "lars_exclude_bias_norm")


class LinearProbe(Method):
    name = "linear"
    # the weights it probes (a run's checkpoint.pth moves on, or is replaced by hand), the protocol and the whole
    # optimisation
    extra_resume_keys = ("probed_epoch", "probed_step", "probed_weights", "cached_features", *OPTIMISATION_FLAGS)

    def __init__(self, args: argparse.Namespace, backbone: nn.Module, info: DataInfo, feature_dim: int,
                 num_classes: int, crop_size: int, cached: bool, device: torch.device):
        super().__init__(args, info, device)
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.cached = cached
        self.augment = MultiCrop([CropSpec(1, crop_size, 0.08, 1.0)], ColorSpec(jitter_p=0.0, grey_p=0.0, flip_p=0.5),
                                 info.mean, info.std, info.image_size, seed=args.seed)
        self.best = {"top1": -1.0, "epoch": -1}

    def non_finite_hint(self) -> str:
        # a linear layer's cross-entropy on a frozen backbone's finite features (checked when extracted) turns
        # non-finite only through its own optimisation
        return (f"the probe is one linear layer on a frozen backbone, so its optimisation diverged: lower --lr "
                f"(here {self.args.lr:g})")

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: batch norm keeps its running statistics
        return self

    @torch.no_grad()
    def prepare(self, batch: Batch):
        if self.cached:
            return batch.images
        return self.augment(batch.images, batch.global_size, batch.offset)[0]

    def forward(self, inputs, batch: Batch, progress: Progress):
        if not self.cached:
            with torch.no_grad():
                inputs = self.backbone(inputs)
        with torch.autocast(inputs.device.type, enabled=False):  # the classifier in float32, as every method's heads
            loss = F.cross_entropy(self.head(inputs.float()), batch.labels)
        return loss, {"ce": loss.detach()}

    def state_dict(self, *args, **kwargs):
        """The head only: the backbone is the run's, loaded from its own checkpoint each time."""
        return self.head.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.head.load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_state(self) -> dict:
        return {"best": dict(self.best)}

    def load_extra_state(self, state: dict) -> None:
        self.best = dict(state.get("best", self.best))


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    labels = labels.to(top.device)
    return {"top1": float((top[:, 0] == labels).float().mean()),
            "top5": float((top == labels[:, None]).any(1).float().mean())}
