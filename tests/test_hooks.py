"""The method hooks a new method is built from (methods/base.py, engine.py), shown with a method that lives only
here: a BYOL-like student and an EMA teacher updated in `after_step`, with its own optimiser groups.

- `after_step` runs after the optimiser and the scaler step, before anything can be checkpointed: the teacher
  follows the weights of the step just taken, and a run stopped mid-epoch and resumed ends bit-identical to an
  uninterrupted one, teacher included.
- `param_groups` gives per-group learning-rate scales and weight decay; `--no_decay_bias_norm` takes 1-D
  parameters out of weight decay.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from clusterlab import distributed, engine
from clusterlab.methods import METHODS, Method
from clusterlab.methods.base import DataInfo, build_multicrop
from clusterlab.models import build_backbone
from clusterlab.optim import set_lr
from clusterlab.programs.train import parse_args
from test_amp import images
from test_resume import assert_same_tensors


class EMATeacher(Method):
    name = "ema_teacher_test"

    @staticmethod
    def add_args(parser):
        parser.add_argument("--ema", type=float, default=0.9)
        parser.add_argument("--head_lr_scale", type=float, default=1.0)

    def __init__(self, args, info: DataInfo, device):
        super().__init__(args, info, device)
        self.backbone = build_backbone(args.arch, info.channels, args.width)
        self.head = nn.Linear(self.backbone.out_dim, 8)
        self.teacher = copy.deepcopy(nn.Sequential(self.backbone, self.head)).requires_grad_(False)
        self.augment = build_multicrop(args, info)
        self.steps_seen = []

    def forward(self, crops, batch, progress):
        student = F.normalize(self.head(self.backbone(crops[0])), dim=1)
        with torch.no_grad():
            target = F.normalize(self.teacher(crops[1]), dim=1)
        loss = (2 - 2 * (student * target).sum(1)).mean()
        return loss, {"byol": loss.detach()}

    def param_groups(self):
        backbone = [p for p in self.backbone.parameters()]
        return [{"params": backbone}, {"params": list(self.head.parameters()), "lr_scale": self.args.head_lr_scale,
                                       "weight_decay": 0.0}]

    @torch.no_grad()
    def after_step(self, progress):
        self.steps_seen.append(progress.global_step)
        student = dict(nn.Sequential(self.backbone, self.head).named_parameters())
        for name, teacher_param in self.teacher.named_parameters():
            teacher_param.mul_(self.args.ema).add_(student[name].detach(), alpha=1 - self.args.ema)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, EMATeacher.name, EMATeacher)


def trainer(run_dir, *flags) -> engine.Trainer:
    args = parse_args("pretrain", ["--method", EMATeacher.name, "--dataset", "digits", "--width", "4", "--device",
                                   "cpu", "--batch_size", "16", "--size_crops", "8", "--epochs", "1", "--log_every",
                                   "100", "--lr", "0.1", "--warmup_epochs", "0", "--weight_decay", "0.01",
                                   "--output_dir", str(run_dir), *flags])
    engine.seed_everything(args.seed)
    train = images()
    method = EMATeacher(args, DataInfo.of(train), torch.device("cpu"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return engine.Trainer(method, args, distributed.init("cpu"), run_dir, train)


def test_after_step_sees_the_updated_weights(registered, tmp_path):
    t = trainer(tmp_path / "run", "--ema", "0")  # ema 0: the teacher becomes the student after every step
    assert t.train_one_epoch(0)
    assert t.method.steps_seen == [0, 1, 2, 3]
    student = nn.Sequential(t.method.backbone, t.method.head).state_dict()
    for key, value in t.method.teacher.state_dict().items():
        if key.endswith(("weight", "bias")) and "bn" not in key:
            assert torch.equal(value, student[key]), key


def test_ema_teacher_is_exact_across_a_mid_epoch_resume(registered, tmp_path, stop_after):
    torch.set_num_threads(1)
    reference = trainer(tmp_path / "reference")
    assert reference.train_one_epoch(0)
    stopped = trainer(tmp_path / "stopped")
    stop_after(stopped, 2)
    assert not stopped.train_one_epoch(0) and stopped.position == (0, 2)
    stopped.save(0, 2)
    stop_after(None)
    resumed = trainer(tmp_path / "stopped")
    assert resumed.resume() == (0, 2)
    assert resumed.train_one_epoch(0, start_step=2)
    assert resumed.method.steps_seen == [2, 3]
    final = resumed.state_dict(1, 0)["model"]
    assert any(key.startswith("teacher.") for key in final)  # the teacher is in the comparison
    assert_same_tensors(final, reference.state_dict(1, 0)["model"], "model")


def test_param_groups_scale_the_learning_rate_and_set_weight_decay(registered, tmp_path):
    t = trainer(tmp_path / "run", "--head_lr_scale", "0.5")
    groups = t.optimizer.param_groups
    assert [len(g["params"]) for g in groups] == [len(list(t.method.backbone.parameters())), 2]
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    set_lr(t.optimizer, 0.2)
    assert groups[0]["lr"] == 0.2 and groups[1]["lr"] == 0.1
    teacher_ids = {id(p) for p in t.method.teacher.parameters()}
    assert not teacher_ids & {id(p) for g in groups for p in g["params"]}


def test_no_decay_bias_norm_puts_one_dimensional_parameters_in_a_group_without_decay(tmp_path):
    args = parse_args("pretrain", ["--dataset", "digits", "--width", "4", "--device", "cpu", "--weight_decay", "0.1",
                                   "--no_decay_bias_norm", "true", "--output_dir", str(tmp_path)])
    method = METHODS["swav"](args, DataInfo.of(images()), torch.device("cpu"))
    decayed, free = method.param_groups()
    assert free["weight_decay"] == 0.0 and "weight_decay" not in decayed
    assert all(p.ndim == 1 for p in free["params"]) and all(p.ndim > 1 for p in decayed["params"])
    assert len(decayed["params"]) + len(free["params"]) == len([p for p in method.parameters() if p.requires_grad])
