"""SCAN stage 3, self-labelling (Van Gansbeke et al., "SCAN: Learning to Classify Images without Labels", ECCV
2020, arXiv:2005.12320, section 3.2; upstream code wvangansbeke/Unsupervised-Classification@952ec31 selflabel.py,
utils/train_utils.py `selflabel_train`, losses/losses.py `ConfidenceBasedCE`, utils/ema.py `EMA`).

`--pretrained` is a scan run: its backbone and its chosen head (the lowest mean consistency - entropy of its last
epoch, methods/scan.py) become this model's backbone and single head, as upstream's get_model keeps only the best head. Per step each
image gives a weak view (the test view, upstream's validation transform) and a strong one (data/randaugment.py).
Without gradient, the weak view's softmax gives a pseudo-label wherever its largest probability exceeds
`--confidence_threshold`; the strong view is trained towards it with the class-balanced cross-entropy of
losses/scan.confident_cross_entropy. Both passes run in train mode, as upstream's (batch norm's running
statistics see the weak view too).

`--ema true` (upstream's `use_ema`, on in its ImageNet recipes, off for CIFAR and STL-10): after every optimiser
step, in `after_step`, the shadow copy s of the parameters moves to s <- alpha s + (1 - alpha) w and the whole
shadow state is loaded back into the model, as upstream's EMA.update_params then apply_shadow. The shadow is taken
from the model before the first step, buffers included; only its parameters are ever updated, so loading it back
also returns the buffers (batch norm's running statistics) to their values from the scan run at every step, as
upstream's code does. The shadow is part of the checkpoint, so a run resumed in the middle of an epoch ends
bit-identical to an uninterrupted one.

A global batch without a confident weak view has nothing to learn from (its loss is 0): its optimiser step is
skipped, as Adam's would still move every weight, by its moments and by the L2 weight decay, which alone gives
each weight a step of about the learning rate (upstream raises an error at such a batch). An epoch without a
confident view anywhere stops the run with one line naming the highest confidence seen: its weights did not
change, so every later epoch would be the same.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from .. import distributed
from ..config import bool_flag, class_count_or_dataset, probability
from ..data.augment import eval_view
from ..data.randaugment import StrongAugment
from ..errors import ConfigError
from ..losses.scan import confident_cross_entropy
from ..models import build_backbone
from .base import Batch, DataInfo, Progress
from .cluster_base import ClusterMethod, lowest_loss_head
from .scan_base import add_strong_augment_args, require_in_memory


def ema_fraction(text: str) -> float:
    value = probability(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an EMA rate (use a value from 0 to below 1)")
    return value


class SCANSelfLabel(ClusterMethod):
    name = "scan_selflabel"
    pretrained_parts = ("backbone", "head")
    starts_from = "a scan run, whose chosen head gives the first labels"

    @staticmethod
    def add_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("scan_selflabel")
        group.add_argument("--head_classes", type=class_count_or_dataset, default=0,
                           help="classes of the head (0: the dataset's; the scan run's head must have as many)")
        group.add_argument("--confidence_threshold", type=probability, default=0.99,
                           help="a weak view's largest probability must exceed it for a pseudo-label")
        group.add_argument("--class_balance", "--apply_class_balancing", type=bool_flag, default=True,
                           help="weight each class n / n_c in the cross-entropy (upstream's apply_class_balancing)")
        group.add_argument("--ema", "--use_ema", type=bool_flag, default=False,
                           help="replace the weights by their exponential moving average after every step")
        group.add_argument("--ema_alpha", type=ema_fraction, default=0.999, help="the EMA's rate alpha")
        add_strong_augment_args(group)
        # upstream configs/selflabel/selflabel_cifar10.yml
        parser.set_defaults(optimizer="adam", lr=1e-4, weight_decay=1e-4, schedule="constant", warmup_epochs=0,
                            epochs=200, batch_size=1000)

    def __init__(self, args: argparse.Namespace, info: DataInfo, device: torch.device):
        super().__init__(args, info, device)
        self.backbone = build_backbone(args.arch, info.channels, args.width, args.init)
        self.head = nn.Linear(self.backbone.out_dim, args.head_classes or info.num_classes)
        self.augment = StrongAugment(args.strong_ops, args.cutout, info.mean, info.std, args.seed)
        self.shadow: dict[str, torch.Tensor] | None = None
        self.confident_now: torch.Tensor | None = None  # the global batch's confident views
        self.epoch_steps_taken = 0
        self.epoch_top_confidence: torch.Tensor | None = None  # this rank's largest weak-view probability

    def attach_data(self, train_set) -> None:
        require_in_memory(train_set, self.name)

    def pretrained_weights(self, source: str, state: dict) -> dict:
        """The scan run's backbone, and its chosen head renamed `head`."""
        if state.get("method") != "scan":
            raise ConfigError(f"--pretrained {source!r} was trained by method {state.get('method')!r}; scan_selflabel "
                              f"starts from a scan run (main_cluster.py --method scan)")
        model, losses = state["model"], state.get("method_state", {}).get("last_head_losses", [])
        if not losses:
            raise ConfigError(f"--pretrained {source!r} holds no head losses to choose a head by (saved before the "
                              f"scan run's first epoch ended); start from a checkpoint of a later epoch")
        chosen = lowest_loss_head(losses)  # SCAN's heads are of one size
        prefix = f"heads.{chosen}."
        if not any(key.startswith(prefix) for key in model):
            raise ConfigError(f"--pretrained {source!r} holds no head {chosen} (method {state.get('method')!r}); "
                              f"scan_selflabel starts from a scan run")
        heads = {f"head.{key[len(prefix):]}": value for key, value in model.items() if key.startswith(prefix)}
        if heads["head.weight"].shape != self.head.weight.shape:
            raise ConfigError(f"--pretrained {source!r}: its head has {heads['head.weight'].shape[0]} classes, this "
                              f"run {self.head.out_features} (--head_classes)")
        return {**{key: value for key, value in model.items() if key.startswith("backbone.")}, **heads}

    @property
    def head_sizes(self) -> list[int]:
        return [self.head.out_features]

    def head_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.head(self.backbone(images))]

    # ---- training ----
    @torch.no_grad()
    def prepare(self, batch: Batch):
        weak = eval_view(batch.images, self.eval_size, self.info.mean, self.info.std)
        return weak, self.augment(batch.images, batch.global_size, batch.offset)

    def forward(self, inputs, batch: Batch, progress: Progress):
        weak, strong = inputs
        with torch.no_grad():
            weak_features = self.backbone(weak)
        strong_features = self.backbone(strong)
        # The head in float32 too (as stage 2's): bf16 logits would move views across the confidence threshold.
        with torch.autocast(self.device.type, enabled=False):
            with torch.no_grad():
                weak_logits = self.head(weak_features.float())
            strong_logits = self.head(strong_features.float())
            loss, confident = confident_cross_entropy(weak_logits, strong_logits, self.args.confidence_threshold,
                                                      self.args.class_balance)
        self.record_head_losses([loss])
        top = weak_logits.softmax(dim=1).max()
        self.epoch_top_confidence = top if self.epoch_top_confidence is None \
            else torch.maximum(self.epoch_top_confidence, top)
        self.confident_now = confident
        return loss, {"ce": loss.detach(), "confident": confident / batch.global_size}

    def takes_the_step(self) -> bool:
        """Only where the global batch has a confident view (a wait for the device; module docstring)."""
        learns = bool(self.confident_now > 0)
        self.epoch_steps_taken += learns
        return learns

    def top_confidence(self) -> float | None:
        """Collective: the largest weak-view probability of the epoch so far over every rank (None before a step)."""
        top = self.epoch_top_confidence
        return None if top is None else float(distributed.all_reduce_max(top.clone()))

    def on_epoch_end(self, epoch: int) -> None:
        super().on_epoch_end(epoch)
        top = self.top_confidence()
        taken, self.epoch_steps_taken, self.epoch_top_confidence = self.epoch_steps_taken, 0, None
        if not taken:
            raise ConfigError(f"epoch {epoch + 1}: no weak view's largest probability exceeded --confidence_threshold "
                              f"{self.args.confidence_threshold:g} (the highest was {top:.4f}), so no step had a "
                              f"self-label to learn from and the weights did not change; lower the threshold, or start "
                              f"from a scan run whose heads are more confident")

    def before_step(self, progress: Progress) -> None:
        if self.args.ema and self.shadow is None:
            self.shadow = {key: value.detach().clone() for key, value in self.state_dict().items()}

    @torch.no_grad()
    def after_step(self, progress: Progress) -> None:
        if not self.args.ema:
            return
        alpha = self.args.ema_alpha
        for name, parameter in self.named_parameters():
            self.shadow[name].copy_(alpha * self.shadow[name] + (1 - alpha) * parameter)
        self.load_state_dict(self.shadow)

    # ---- state ----
    def extra_state(self) -> dict:
        shadow = None if self.shadow is None else {key: value.cpu() for key, value in self.shadow.items()}
        return {**super().extra_state(), "ema_shadow": shadow, "epoch_steps_taken": self.epoch_steps_taken,
                "epoch_top_confidence": self.top_confidence()}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.epoch_steps_taken = int(state.get("epoch_steps_taken", 0))
        top = state.get("epoch_top_confidence")
        self.epoch_top_confidence = None if top is None else torch.tensor(top, device=self.device)
        shadow = state.get("ema_shadow")
        self.shadow = None if shadow is None else {key: value.to(self.device) for key, value in shadow.items()}
