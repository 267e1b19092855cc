"""The training loop's machinery: one step, one epoch, checkpoints, resume, signals, the NaN guard, logs.

The programs keep the loop over epochs visible (programs/train.py); this module does what happens inside it:

    for epoch in range(start_epoch, args.epochs):
        completed = trainer.train_one_epoch(epoch, start_step)   # False: a stop signal cut the epoch short
        start_step = 0
        if completed:
            trainer.end_of_epoch(epoch)                          # kNN monitor, checkpoint.pth, checkpoint_epNNNN.pth
        if trainer.requeue_now(epoch, completed):                # a stop signal, and training not complete
            trainer.save_and_requeue()                           # checkpoint where it stands, exit 75
    trainer.finish()

Resume is exact: a checkpoint holds the model, optimiser, AMP scaler, the position (epoch, step inside it, global
step), every random generator (the global ones and the augmentation's), and the method's own state (queues,
memory banks, pseudo-labels). Batches depend only on (seed, epoch), so a run stopped in the middle of an epoch
and started again continues with the same samples and the same crops, bit for bit on the CPU.

A method takes part through hooks: `on_epoch_start`; per step, in this order, `before_step`, `prepare`
(augmentation, outside autocast), `forward` (the loss, inside autocast and DDP), backward, `after_backward` (a
memory bank's update, from the features the loss saw), `takes_the_step` (False: the optimiser and scaler skip this
step), the optimiser and scaler step, `after_step` (an EMA teacher, which must see the new weights); after the
epoch's last step `on_epoch_end`; `param_groups` decides the optimiser's groups (per-group learning-rate scale and
weight decay).

Signals (signals.py): while an epoch runs, SIGUSR2 / SIGUSR1 / SIGTERM are only remembered; every rank stops at the
next step boundary (or, for a signal during an epoch's monitor or checkpoint, once they are done), rank 0 writes
checkpoint.pth, and the process exits with status 75 (run the same command again to resume; submitit and the
sbatch scripts requeue the job). At the end of the last epoch the run is finished first.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed, rundir, signals
from .compilation import compile_backbone
from .config import git_state, read_run_config, starts_of, write_resolved, written_run_config
from .curves import STEP_FIELDS
from .data import loader as data_loader
from .data.registry import DATASETS, lacks_test_split, real_data_folder
from .distributed import Context
from .errors import CheckpointError, ConfigError, UserError, one_line
from .methods.base import Batch, Method, Progress
from .models import training_mode
from .models.batchnorm import convert_sync_batchnorm, share_norm_statistics
from .optim import build_optimizer, build_schedule, set_lr, unread_flags
from .results import NOT_SETTINGS, foreign_checkpoint, own_probes, set_aside_evaluations_after

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel"  # torch's batch-norm error in training mode
# What must match between a checkpoint and the command resuming it (the rest may change, --epochs included); --init
# acts only at the start, but a run resumed under another would be filed under it (config.yaml, tables).
RESUME_KEYS = ("method", "dataset", "arch", "width", "init", "batch_size", "seed", "nmb_crops", "size_crops",
               "optimizer")
# fp16 steps skipped in a row (gradients not finite at every loss scale from 2^16 down to 2^-16) after which the
# gradients are taken as not finite in themselves: the weights would stop training while the run went on.
MAX_SKIPPED_STEPS = 32
OVERFLOW_PROBE = 8  # images of noise whose features saved weights must keep finite (Trainer.overflowing_features)
# The flags that define the learning-rate schedule: they may change on resume (a run extended with a larger --epochs),
# and the schedule then restarts from where the new one stands at the checkpoint's step.
SCHEDULE_KEYS = ("schedule", "lr", "final_lr", "epochs", "warmup_epochs", "start_warmup", "lr_drops", "lr_gamma",
                 "schedule_period")


class NonFiniteLoss(UserError):
    pass


def resolve_precision(amp: str, device: torch.device,
                      capability: tuple[int, int] | None = None) -> torch.dtype | None:
    """The autocast dtype `--amp` asks for on `device` (None: float32); `capability`: the CUDA device's compute
    capability (asked of the device when None). auto is bf16 on CUDA cards from Ampere on (capability 8.0) and fp16
    with the gradient scaler on older ones (V100, T4), which only emulate bf16, without tensor cores; float32 on the
    CPU, where mixed precision is slower on most processors. bf16 and fp16 run where they are asked for."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        major, _ = capability or torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if amp == "off":
        return None
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise ConfigError(f"--amp {amp}: this torch has no autocast on {device.type} (use --amp off)")
    return AMP_DTYPES[amp]


def wrap_ddp(method: Method, ctx: Context, find_unused: bool) -> DistributedDataParallel:
    """DDP without buffer broadcasts: each rank keeps its buffers itself (batch-norm statistics without --sync_bn,
    averaged before a save; memory banks, which every rank updates with the gathered batch). torch 2.14 deprecates
    `broadcast_buffers` for `forward_sync_buffers`, which still broadcasts them once at the start (an ImageNet memory
    bank: 655 MB): the old flag stays, as torch's warning itself advises until `init_sync_buffers` exists, and its
    warning (one per rank) is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedDataParallel(method, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                       broadcast_buffers=False, find_unused_parameters=find_unused)


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "float32")


class Trainer:
    """Owns the optimiser, the AMP machinery and the run directory of one training run."""

    def __init__(self, method: Method, args: argparse.Namespace, ctx: Context, run_dir: Path, train_set,
                 kind: str = "pretrain"):
        self.args, self.ctx, self.run_dir, self.train_set, self.kind = args, ctx, Path(run_dir), train_set, kind
        self.batches = data_loader.GlobalBatches(len(train_set), args.batch_size, ctx.world_size, ctx.rank, args.seed)
        self.steps_per_epoch = len(self.batches)
        method.attach_data(train_set)
        if args.channels_last:
            method.to(memory_format=torch.channels_last)  # convolutions then keep their outputs channels-last too
        if args.sync_bn:
            method = convert_sync_batchnorm(method, ctx.device)
        if args.compile:
            compile_backbone(method, ctx.device)
        self.method = method
        self.optimizer = build_optimizer(method.param_groups(), args)
        self.schedule = build_schedule(args, self.steps_per_epoch)
        self.amp_dtype = resolve_precision(args.amp, ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.model = wrap_ddp(method, ctx, args.find_unused) if ctx.world_size > 1 else method
        self.global_step = 0
        self.steps_this_start = 0     # steps done since this process started (or resumed) the run
        self.position = (0, 0)        # (epoch, step) the next step starts at
        self.trained_by: list[dict] = []  # the code's git state at each start that differed from the one before
        self.saved_record: dict | None = None  # set by resume
        self.resume_notes: list[str] = []  # what a resume changes that the run's log would not show
        # Every resume that changed what the run learns (the schedule's or another flag, the precision, for some
        # methods the number of processes): where ({"epoch", "step"}) and the values "before" and "after"; in the
        # checkpoint and config.yaml, so that the tables file each checkpoint under the settings it trained with.
        self.resume_changes: list[dict] = []
        self.changed_by_this_start: dict = {}  # this start's entry of resume_changes ({} when it changes nothing)
        self.bad_files: data_loader.BadFiles | None = None  # the epoch under way's unreadable image files
        self.saved_position = None    # where checkpoint.pth stands, once this process has written it
        self.weights_checked_at = None  # the position whose weights refuse_diverged_weights passed last
        self.loss_scale = None        # fp16: the gradient scaler's scale after the last step
        self.step_taken = True        # whether the optimiser took the last step (Method.takes_the_step)
        self.skipped_in_a_row = 0     # fp16: steps the scaler skipped in a row, up to the last one
        self.stop_requested = False
        self.finished = False  # status "finished" written: what fails after it (handing a signal over) is not training
        self.monitor_set = None
        # Sums of the logged terms over the epoch's steps so far: saved with a mid-epoch checkpoint, so that the
        # epoch_end means of a resumed epoch cover all its steps, as in an uninterrupted run.
        self.term_totals: dict[str, float] = {}
        self.term_count = 0

    @property
    def precision(self) -> str:
        return precision_name(self.amp_dtype)

    def start_notes(self) -> list[str]:
        """What the start tells beside the whole-run settings, where it is still read:
        - an image folder without val/ or test/, whose evaluations (and kNN monitor) will be refused: known before
          a whole training, not after it;
        - --channels_last on the CPU with crops of 48 px or more: torch 2.14.1's oneDNN convolution backward crashed
          this suite's ResNet-18 there (a segmentation fault, so no message of ours) on channels-last inputs, from
          48 px on (44 px trained), on an AMD EPYC CPU (a linear probe's backbone runs no backward);
        - --amp fp16 on the CPU, which most processors do not compute in float16 (it ran many times slower than
          float32 on this suite's test machines; bf16 is the CPU's mixed precision);
        - --workers on a set held in memory, which starts no loader process (the flag serves image folders);
        - --train_split test: the evaluations score the images the run trains on."""
        if self.kind == "linear":
            return []
        notes = []
        if self.amp_dtype == torch.float16 and self.ctx.device.type == "cpu":
            notes.append("--amp fp16 on the CPU: most processors have no float16 arithmetic, and it runs many times "
                         "slower than float32 (use --amp bf16 or off there)")
        if self.train_set.split == "test":
            notes.append(f"--train_split test: the run trains on the {self.train_set.name} test images that "
                         f"eval_knn.py, eval_cluster.py and eval_linear.py score (a transductive protocol; its "
                         f"numbers do not compare with runs trained on the train split)")
        if self.args.workers and self.train_set.in_memory:
            notes.append(f"--workers {self.args.workers}: {self.train_set.name} is held in memory and augmented in "
                         f"the training process; no loader process starts (the flag serves image folders)")
        labelled = int((self.train_set.labels >= 0).sum()) if self.args.knn_monitor_every else 0
        if self.args.knn_monitor_every and self.args.knn_monitor_k > labelled:
            notes.append(f"--knn_monitor_k {self.args.knn_monitor_k} is more than the {labelled} labelled training "
                         f"images: all of them vote (train_log.jsonl records k_used)")
        if lacks_test_split(self.train_set):
            notes.append(f"{self.train_set.folder} has no val/ or test/ folder: it trains, but eval_knn.py and "
                         f"eval_linear.py need DATA_PATH/val/CLASS/ (the classes of train/); eval_cluster.py "
                         f"--split train scores the training images")
        if self.args.channels_last and self.ctx.device.type == "cpu":
            largest = max(size or self.method.info.image_size for size in self.args.size_crops)
            if largest >= 48:
                notes.append(f"--channels_last on the CPU with {largest} px crops: torch 2.14.1's convolution "
                             f"backward crashed (a segmentation fault, without a message) on channels-last inputs "
                             f"of 48 px and more in our tests; if this run dies without a line, leave "
                             f"--channels_last out")
        return notes

    def whole_run_settings(self) -> list[str]:
        """Lengths that cover the whole run: warm-up, a step schedule without a drop, a schedule period the run ends
        inside, and the method's own (prototype freezing, queue start, SeLa's relabellings); epoch checkpoints and a
        kNN monitor asked for beyond its end."""
        notes = self.method.whole_run_settings(self.steps_per_epoch)
        epochs, period = self.args.epochs, self.args.schedule_period
        span = min(period, epochs) if period else epochs
        within = "each period of --schedule_period" if period and period < epochs else "the run"
        # In iterations, as the schedule counts: --warmup_epochs rounds to whole steps, a period restarts the warm-up.
        # The step after the warm-up is still at the peak: a warm-up one step shorter than the run covers it too.
        warm_up_covers = self.schedule.warmup_steps > 0 and \
            self.schedule.warmup_steps >= span * self.steps_per_epoch - 1
        if warm_up_covers:
            notes.insert(0, f"the learning rate warms up for the whole of {within} ({self.schedule.warmup_steps} "
                            f"warm-up iterations of --warmup_epochs {self.args.warmup_epochs} in "
                            f"{span * self.steps_per_epoch} ({self.steps_per_epoch} an epoch)): it never decays")
        if self.args.schedule == "step" and not any(0 < drop < span for drop in self.args.lr_drops):
            rate = self.args.lr * self.args.lr_gamma ** sum(1 for drop in self.args.lr_drops if drop <= 0)
            notes.append(f"--schedule step never drops the learning rate (--lr_drops "
                         f"{' '.join(map(str, self.args.lr_drops)) or 'none'} within {within}, {span} "
                         f"epoch{'s' if span != 1 else ''}): it stays at {rate:g}"
                         + (" after the warm-up" if self.args.warmup_epochs and not warm_up_covers else ""))
        if period and epochs % period:  # (the schedule restarts every period: the run ends part-way through one)
            last = self.schedule(epochs * self.steps_per_epoch - 1)
            notes.append(f"--schedule_period {period} is longer than the run (--epochs {epochs}): the schedule stops "
                         f"part-way, its last step at learning rate {last:.4g}" if period > epochs else
                         f"--epochs {epochs} is not a multiple of --schedule_period {period}: the last period stops "
                         f"after {epochs % period} of its {period} epochs, its last step at learning rate {last:.4g}")
        beyond = [epoch for epoch in self.args.checkpoint_epochs if epoch > self.args.epochs]
        if beyond:
            notes.append(f"--checkpoint_epochs {' '.join(map(str, beyond))}: beyond --epochs {self.args.epochs}, "
                         f"never written")
        if self.args.knn_monitor_every > self.args.epochs:
            notes.append(f"--knn_monitor_every {self.args.knn_monitor_every}: beyond --epochs {self.args.epochs}, "
                         f"the kNN monitor never runs")
        return notes

    # ---- checkpoints ----
    def state_dict(self, epoch: int, step: int) -> dict:
        """Everything needed to resume at (epoch, step); collective (the method may gather across ranks)."""
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step, "global_step": self.global_step,
                "rng": checkpoint.rng_state(), "rank_generators": checkpoint.every_ranks_torch_generators(),
                "method_random": self.method.random_state(),
                "method_state": self.method.extra_state(), "args": _plain_args(self.args),
                "data_info": dataclasses.asdict(self.method.info),
                "term_totals": dict(self.term_totals), "term_count": self.term_count,
                "trained_by": list(self.trained_by), "resume_changes": list(self.resume_changes),
                "precision": self.precision,
                "bad_files": self.bad_files.totals()[0] if self.bad_files is not None else 0,
                "skipped_in_a_row": self.skipped_in_a_row, "world_size": self.ctx.world_size,
                "data_folder": self.data_folder()}

    def save(self, epoch: int, step: int, names=("checkpoint.pth",)) -> None:
        """Collective. checkpoint.pth comes last: a process killed in between redoes the epoch and writes the
        others again, so every checkpoint_epNNNN.pth asked for exists at the end whatever was killed when.
        Weights that are not finite are never saved: a loss is checked before its update, so the last update's
        result is checked here, before it could become the last good checkpoint (a requeue would only fail again)."""
        if self.weights_checked_at != (epoch, step):  # (checked already before this epoch's kNN monitor)
            self.refuse_diverged_weights(epoch, step)
        state = self.state_dict(epoch, step)
        if self.ctx.is_main:
            paths = [self.run_dir / name for name in sorted(names, key=lambda n: n == "checkpoint.pth")]
            checkpoint.save(state, paths, kind=self.kind, method=self.args.method)
        self.saved_position = (epoch, step)
        distributed.barrier()

    def resume(self) -> tuple[int, int]:
        """Load run_dir/checkpoint.pth if there is one; returns the (epoch, step) to start from."""
        path = self.run_dir / "checkpoint.pth"
        require_shared(self.run_dir, path.name)
        if not path.exists():
            return 0, 0
        state = load_resumable(path, self.args, self.kind, self.method.info,
                               (*RESUME_KEYS, *self.method.extra_resume_keys))
        checkpoint.require_finite_weights(state, path)  # damaged since: it would only fail at its first step
        scaler_resumed = self._load_state(path, state)
        self.global_step = state["global_step"]
        self.position = self.saved_position = (state["epoch"], state["step"])
        self.trained_by = starts_of(self.run_dir, state)
        # The steps skipped in a row belong to the scaler that skipped them: a fresh scaler (the checkpoint trained
        # without fp16) or none (this start trains without fp16) starts the count again.
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0) if scaler_resumed else 0
        # the files of the epoch under way met before the stop count towards its limit and its logged count
        self.bad_files = data_loader.BadFiles.for_epoch(self.train_set, self.batches, self.ctx.device)
        if distributed.rank() == 0:
            self.bad_files.count = state.get("bad_files", 0)
        # (checkpoints written before the sums were saved: the means then cover the steps after the resume)
        self.term_totals, self.term_count = dict(state.get("term_totals", {})), state.get("term_count", 0)
        if self.term_count and "loss" not in self.term_totals:
            # an older version summed the terms only: this epoch's loss mean is unknown (and not written)
            self.term_totals["loss"] = math.nan
        self.resume_changes = list(state.get("resume_changes", []))
        # what the checkpoint records of its training (None from a version that kept no starts nor changes)
        self.saved_record = {"args": state["args"], "precision": state.get("precision"),
                             "world_size": state.get("world_size"), "trained_by": list(self.trained_by),
                             "resume_changes": list(self.resume_changes)} \
            if "trained_by" in state and "resume_changes" in state else None
        self._note_changes(state)
        epoch, step = self.position
        passed = [e for e in self.args.checkpoint_epochs if (e < epoch or (e == epoch and step > 0))
                  and not (self.run_dir / f"checkpoint_ep{e:04d}.pth").exists()]
        if passed:
            self.resume_notes.append(f"--checkpoint_epochs {' '.join(map(str, passed))}: behind checkpoint.pth "
                                     f"({self.position_words(epoch, step)}), never written")
        return self.position

    def _load_state(self, path: Path, state: dict) -> bool:
        """The weights, optimiser, scaler, method and random states of a resumable checkpoint; returns whether the
        fp16 scaler was resumed (else it starts afresh)."""
        try:
            self.method.load_state_dict(state["model"])
            settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
            self.optimizer.load_state_dict(state["optimizer"])
            for group, command_settings in zip(self.optimizer.param_groups, settings):
                # torch takes every group setting from the checkpoint: the command's flags (weight decay, momentum,
                # LARS trust...) may change on resume and config.yaml records them, so they are what trains on.
                group.update(command_settings)
            # (empty: trained without fp16; --amp may change on resume, and the scaler then starts afresh)
            scaler_resumed = bool(state["scaler"]) and self.scaler.is_enabled()
            if scaler_resumed:
                self.scaler.load_state_dict(state["scaler"])
            self.method.load_extra_state(state["method_state"])
            self.method.load_random_state(state["method_random"])
            checkpoint.set_rng_state(state["rng"])
            generators = state.get("rank_generators")  # (checkpoints before it: rank 0's state on every rank)
            if generators is not None and len(generators) == self.ctx.world_size:
                checkpoint.set_torch_generators(generators[self.ctx.rank])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            # A flag outside RESUME_KEYS that shapes the model (e.g. --nmb_prototypes) changed, or an entry is missing.
            reason = checkpoint.failure_reason(err)
            saved_args = state.get("args") if isinstance(state.get("args"), dict) else {}
            differing = self._learning_flags_changed(saved_args)
            flags = f"; this command's flags that differ: {_flag_changes(saved_args, self.args, differing)}" \
                if differing else ""
            raise CheckpointError(f"{path} does not fit this command's model ({reason}){flags}; use a new "
                                  f"--output_dir or the flags it was trained with (its config.yaml)") from None
        return scaler_resumed

    def _note_changes(self, state: dict) -> None:
        """Say (resume_notes) and record (resume_changes) every flag that shapes what is learnt and differs from
        what the checkpoint trained with: the schedule, the other learning flags, the number of processes where
        the steps depend on it, the precision."""
        self.resume_notes = []
        saved_args = state["args"]
        changed = self._learning_flags_changed(saved_args, SCHEDULE_KEYS)
        # Every other flag that shapes what the run learns (a loss temperature, a queue, an augmentation range,
        # sync_bn...) may change too, but not silently: config.yaml's args are the last start's, so without a
        # record the tables would file the epochs trained before under the new values.
        others = self._learning_flags_changed(saved_args)
        before = {key: _plain(saved_args[key]) for key in (*changed, *others)}
        after = {key: _plain(getattr(self.args, key)) for key in (*changed, *others)}
        if changed:
            self.resume_notes.append(self.schedule_change(saved_args, changed))
        if others:
            self.resume_notes.append(f"flags changed on resume ({_flag_changes(saved_args, self.args, others)}): "
                                     f"the run goes on with the new values from "
                                     f"{self.position_words(*self.position)}; config.yaml and the tables record the "
                                     f"change")
        moved = self._moved_data_path(state.get("data_folder"))
        if moved:
            self.resume_notes.append(moved)
        saved_world = state.get("world_size")
        if saved_world is not None and saved_world != self.ctx.world_size:
            # Un-Mix pairs images inside each rank's share, and local batch norm normalises each share: there the
            # number of processes is part of what is trained, and a change of it must not pass unseen. (A linear
            # probe's frozen backbone keeps its batch norm in eval mode: no share is normalised on its own.)
            # (local before the resume, or after it: a checkpoint of --sync_bn false resumed with true was trained
            # on its shares all the same)
            local_batch_norm = not (self.args.sync_bn and saved_args.get("sync_bn", True)) and any(
                isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training
                for module in self.method.modules())
            depends = ("unmix" if self.args.method == "unmix" else
                       "--sync_bn false" if local_batch_norm and max(saved_world, self.ctx.world_size) > 1
                       else None)
            if depends:
                before["world_size"], after["world_size"] = saved_world, self.ctx.world_size
            self.resume_notes.append(
                f"resumed on {self.ctx.world_size} process(es); the checkpoint was written by {saved_world}"
                + (f": with {depends} the steps depend on the number of processes, config.yaml and the tables "
                   f"record the change" if depends else " (the global batch and its samples stay the same)"))
        if state.get("precision", self.precision) != self.precision:
            # as the tables compare runs: amp by the precision that ran (--amp auto differs between devices)
            before["amp"], after["amp"] = state["precision"], self.precision
            self.resume_notes.append(f"the precision changed on resume ({state['precision']} -> {self.precision}): "
                                     f"config.yaml and the tables record the change")
        if before:
            epoch, step = self.position
            self.changed_by_this_start = {"epoch": epoch, "step": step, "before": before, "after": after}
            self.resume_changes.append(self.changed_by_this_start)

    def data_folder(self) -> str | None:
        """The folder this start reads its files from, whatever the working directory (None: digits, no files)."""
        dataset = self.args.dataset
        if dataset not in DATASETS or not DATASETS[dataset].reads_files:
            return None
        return real_data_folder(dataset, self.args.data_path)

    def _moved_data_path(self, saved_folder: str | None) -> str | None:
        """The note for a resume reading its files from another folder than the checkpoint's (the fingerprint
        matched: the same file names and labels; a resized or cleaned copy passes as the same images)."""
        folder = self.data_folder()
        if saved_folder is None or folder is None or folder == saved_folder:
            return None
        return (f"--data_path {self.args.data_path!r} reads {folder}; the checkpoint trained on {saved_folder}: the "
                f"files have the same names and labels, so the run goes on (their pixels are not compared), and "
                f"config.yaml records the new path")

    def _learning_flags_changed(self, saved_args: dict, keys=None) -> list[str]:
        """The flags among `keys` (default: those that shape what is learnt, other than the run-defining ones, the
        schedule's and the precision) whose value in this command differs from the checkpoint's `saved_args`."""
        keys = keys or [key for key in saved_args if key not in (*RESUME_KEYS, *SCHEDULE_KEYS, "amp", *NOT_SETTINGS)]
        # a flag that neither the checkpoint's optimiser and schedule nor this command's read changed nothing (a
        # config that no longer gives an unread --start_warmup)
        unread = set(unread_flags(self.args)) & set(unread_flags(argparse.Namespace(**{**vars(self.args),
                                                                                        **saved_args})))
        return [key for key in keys if key in saved_args and key in vars(self.args) and key not in unread
                and _plain(saved_args[key]) != _plain(getattr(self.args, key))]

    def schedule_change(self, saved_args: dict, changed: list[str]) -> str:
        """The line saying that the schedule flags `changed` differ from those the checkpoint trained with: the rate
        the next step takes and the rate the last step took (a cosine run extended with a larger --epochs climbs
        back from its final rate)."""
        saved = argparse.Namespace(**{**vars(self.args), **{key: saved_args[key] for key in changed}})
        last = build_schedule(saved, self.steps_per_epoch)(self.global_step - 1)
        return (f"the schedule's flags changed on resume ({_flag_changes(saved_args, self.args, changed)}): step "
                f"{self.global_step} trains at learning rate {self.schedule(self.global_step):.6g}, the last step "
                f"trained at {last:.6g}")

    def restore_missing_epoch_checkpoints(self) -> None:
        """A checkpoint_epNNNN.pth asked for at the very epoch checkpoint.pth stands at, but missing (a crash between
        the two writes of an older version, or the flag added on resume), is copied from checkpoint.pth."""
        epoch, step = self.position
        name = f"checkpoint_ep{epoch:04d}.pth"
        if self.ctx.is_main and step == 0 and epoch in self.args.checkpoint_epochs \
                and not (self.run_dir / name).exists():
            checkpoint.copy(self.run_dir / "checkpoint.pth", self.run_dir / name)

    # ---- one epoch ----
    def train_one_epoch(self, epoch: int, start_step: int = 0) -> bool:
        """Train from `start_step` to the end of `epoch`. Returns False when a stop signal ended the epoch early
        (the script then calls save_and_requeue); `self.position` is where the next step would start."""
        args, method = self.args, self.method
        self.model.train()
        method.on_epoch_start(epoch)
        log_path = self.run_dir / "train_log.jsonl"
        if start_step == 0 or self.bad_files is None:
            self.bad_files = data_loader.BadFiles.for_epoch(self.train_set, self.batches, self.ctx.device)
        if start_step == 0:
            self.term_totals, self.term_count = {}, 0
        window_start, window_images = time.time(), 0
        epoch_start = time.time()
        signals.defer()
        for step, images, labels, indices, global_size, offset in data_loader.iterate(
                self.train_set, self.batches, epoch, start_step, args.workers, augment=method.augment,
                device=self.ctx.device, log=log_path, tally=self.bad_files):
            progress = Progress(epoch, step, self.global_step, self.steps_per_epoch)
            batch = Batch(images, labels, indices, global_size, offset)  # on the device already
            lr = self.schedule(self.global_step)
            set_lr(self.optimizer, lr)
            loss, terms = self.step(batch, progress)
            self.global_step += 1
            window_images += global_size
            self.stop_requested, bad_loss, loss, terms = self.check(loss, terms)
            self.steps_this_start += 1  # every rank has reached this step's end (check is collective)
            if bad_loss:
                self.fail_on_nonfinite(epoch, step, terms)
            if self.skipped_in_a_row >= MAX_SKIPPED_STEPS:
                self.fail_on_skipped_steps(epoch, step)
            self.position = (epoch, step + 1)
            for key, value in {"loss": loss, **terms}.items():
                self.term_totals[key] = self.term_totals.get(key, 0.0) + float(value)
            self.term_count += 1
            last_step = step + 1 == self.steps_per_epoch
            if self.ctx.is_main and (step % args.log_every == 0 or last_step):
                elapsed = time.time() - window_start
                rate = window_images / max(elapsed, 1e-9)
                record = {"epoch": epoch, "step": step, "global_step": self.global_step, "lr": lr,
                          "loss": float(loss), **{k: float(v) for k, v in terms.items()}, "img_per_s": rate,
                          "time": rundir.now_iso()}
                if self.loss_scale is not None:
                    record["loss_scale"] = self.loss_scale
                rundir.append_jsonl(log_path, record)
                print(self.progress_line(record, epoch_start, step, start_step), flush=True)
                window_start, window_images = time.time(), 0
            if self.stop_requested and not last_step:
                return False
        self.position = (epoch + 1, 0)
        method.on_epoch_end(epoch)
        if self.ctx.is_main and self.term_count:
            count = self.term_count
            rundir.append_jsonl(log_path, {"epoch": epoch, "epoch_end": True, "global_step": self.global_step,
                                           **{f"{k}_mean": v / count for k, v in self.term_totals.items()
                                              if math.isfinite(v)},
                                           "epoch_seconds": time.time() - epoch_start, "time": rundir.now_iso()})
        return True

    def step(self, batch: Batch, progress: Progress) -> tuple[torch.Tensor, dict]:
        method = self.method
        method.before_step(progress)
        inputs = method.prepare(batch)
        try:
            with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                loss, terms = self.model(inputs, batch, progress)
        except (ValueError, RuntimeError) as err:
            # Batch norm's refusal of one value per channel (one image per process where nothing stacks crops or
            # keeps a spatial map) depends on the method and the crop sizes, so it is named here, not refused ahead.
            # Eager batch norm raises a ValueError; under --compile, Dynamo meets it while tracing and raises its
            # TorchRuntimeError (a RuntimeError) with torch's message inside.
            if ONE_VALUE_PER_CHANNEL not in str(err):
                raise
            raise ConfigError(f"--batch_size {self.args.batch_size}: a batch norm of the model sees one value per "
                              f"channel in a process's share of the batch; use a larger --batch_size") from None
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        method.after_backward(progress)
        if self.scaler.is_enabled() and self.loss_scale is None:
            self.loss_scale = self.scaler.get_scale()  # the first step's (the initial scale, or the resumed one)
        self.step_taken = method.takes_the_step()
        if self.step_taken:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        method.after_step(progress)
        return loss.detach(), terms

    def check(self, loss: torch.Tensor, terms: dict) -> tuple[bool, bool, float, dict[str, float]]:
        """(stop requested on any rank, loss not finite on any rank, the loss and the terms as means over the ranks):
        one small all-reduce per step, and the step's one wait for the device. Each rank's loss is the mean over its
        own rows (or the global loss), so the mean over the ranks is what one process logs for the same global
        batch, not rank 0's half of it. Under fp16 the gradient scaler's scale is read with them (note_scale)."""
        device = self.ctx.device
        # a term the method keeps on the host (a Python number, a CPU tensor) is filled in on the device, not copied
        measured = torch.stack([
            v.detach().to(torch.float64) if isinstance(v, torch.Tensor) and v.device.type == device.type
            else torch.full((), float(v), dtype=torch.float64, device=device) for v in (loss, *terms.values())])
        # Built on the device (a fill, not a copy from the host): the step's one wait for it is the .tolist().
        stop = torch.full((1,), float(signals.received() is not None), dtype=torch.float64, device=device)
        parts = [stop, (~torch.isfinite(measured[:1])).double(), measured]
        if self.scaler.is_enabled():
            # The scale after this step's update, as the tensor on the device: get_scale() would wait for it. (A
            # private method of torch's GradScaler, there since torch 1.x; set by the step's scaler.scale(loss).)
            parts.append(self.scaler._get_scale_async().to(torch.float64).reshape(1))
        values = torch.cat(parts)
        distributed.all_reduce_sum(values)
        stop_requested, not_finite, *sums = values.tolist()
        means = [value / self.ctx.world_size for value in sums]
        if self.scaler.is_enabled():
            self.note_scale(means.pop())
        return bool(stop_requested), bool(not_finite), means[0], dict(zip(terms, means[1:]))

    def note_scale(self, scale: float) -> None:
        """A step whose gradients are not finite is skipped and halves the scale: the only way it goes down. The
        scale is the same on every rank (the gradients it checks are all-reduced), so their mean is exact. A step
        the method did not take (`takes_the_step`) leaves the scale, and the count of skipped steps, as they were."""
        if self.step_taken:
            self.skipped_in_a_row = self.skipped_in_a_row + 1 if scale < self.loss_scale else 0
        self.loss_scale = scale

    def progress_line(self, record: dict, epoch_start: float, step: int, start_step: int = 0) -> str:
        """The console line of `step`; the time per step is measured over the steps this start has run of the
        epoch (from `start_step`: a resumed epoch's earlier steps took no time here)."""
        done = step + 1
        per_step = (time.time() - epoch_start) / (done - start_step)
        remaining_steps = (self.args.epochs - record["epoch"]) * self.steps_per_epoch - done
        eta = _format_seconds(per_step * max(0, remaining_steps))
        terms = " ".join(f"{k} {record[k]:.4f}" for k in record if k not in STEP_FIELDS)
        scale = f" loss scale {record['loss_scale']:g}" if "loss_scale" in record else ""
        return (f"epoch {record['epoch'] + 1}/{self.args.epochs} step {done}/{self.steps_per_epoch} "
                f"loss {record['loss']:.4f} ({terms}) lr {record['lr']:.5g}{scale} img/s {record['img_per_s']:.0f} "
                f"eta {eta}")

    # ---- between epochs, and leaving ----
    def end_of_epoch(self, epoch: int) -> None:
        """checkpoint.pth after every epoch, plus checkpoint_epNNNN.pth at the epochs the config lists."""
        done = epoch + 1
        if self.args.knn_monitor_every and done % self.args.knn_monitor_every == 0:
            self.refuse_diverged_weights(done, 0)  # (a monitor of diverged weights logged a record of chance)
            self.knn_monitor(epoch)
        names = ["checkpoint.pth"]
        if done in self.args.checkpoint_epochs:
            names.append(f"checkpoint_ep{done:04d}.pth")
        self.save(done, 0, names)
        if self.ctx.is_main:
            rundir.write_status(self.run_dir, "running", epoch=done, epochs=self.args.epochs)
        # A signal during the monitor or the checkpoint is acted on now, not after the next epoch's start and step.
        self.stop_requested = self.stop_requested or self.on_any_rank(signals.received() is not None)

    def on_any_rank(self, holds: bool) -> bool:
        """Whether `holds` is true on some rank (collective)."""
        return bool(max_over_ranks(float(holds), self.ctx.device))

    def requeue_now(self, epoch: int, completed: bool) -> bool:
        """Whether to save and requeue after `epoch`: a stop signal came, and training is not complete (a signal
        during the last epoch's end leaves `finish` to record the run finished, then exit for the requeue)."""
        return self.stop_requested and not (completed and epoch + 1 == self.args.epochs)

    def refuse_diverged_weights(self, epoch: int, step: int) -> None:
        """Collective, before weights at (epoch, step) are saved or scored: not finite, or (where the backbone
        trains) finite but overflowing, they stop the run (NonFiniteLoss). Then the batch norms' statistics are
        shared across the ranks, as saving and scoring need."""
        if not self.weights_finite():
            raise NonFiniteLoss(f"the weights are not finite at {self.position_words(epoch, step)} (the last update "
                                f"diverged); stopped without saving, {self.last_good_checkpoint()}")
        share_norm_statistics(self.method)
        overflowing = self.overflowing_features() if self.kind != "linear" else 0  # a probe's backbone is frozen
        if overflowing:
            raise NonFiniteLoss(f"the weights at {self.position_words(epoch, step)} overflow: the backbone's features "
                                f"of {overflowing} of {OVERFLOW_PROBE} images of noise are not finite (finite weights "
                                f"that overflow: the last updates diverged); stopped without saving, "
                                f"{self.last_good_checkpoint()}")
        self.weights_checked_at = (epoch, step)

    def overflowing_features(self) -> int:
        """Collective: of OVERFLOW_PROBE test-view images of standard normal noise (the scale of normalised images;
        no file read), how many get non-finite backbone features in eval mode (the most over the ranks).
        Weights of a run diverging at an epoch's last step can be finite and overflow (1e30 and more): saved, they
        replaced the last good checkpoint, and the resumed run failed at its first step. Eval mode, no gradient and
        a generator of its own: no batch-norm statistic, random stream or weight changes."""
        crop = self.method.eval_view.crop
        noise = torch.randn(OVERFLOW_PROBE, self.method.info.channels, crop, crop,
                            generator=torch.Generator().manual_seed(0)).to(self.ctx.device)
        with training_mode(self.method, False), torch.no_grad():
            features = self.method.features(noise).float()
        # the most over the ranks: cuDNN's algorithms, chosen per card, round differently near the float32 limit, and
        # every rank must stop, or none
        return int(max_over_ranks(float(checkpoint.non_finite_rows(features)), self.ctx.device))

    def weights_finite(self) -> bool:
        """Whether every parameter and floating buffer (batch-norm statistics, a memory bank) is finite on every
        rank (collective)."""
        return not self.on_any_rank(checkpoint.first_non_finite(self.method.state_dict()) is not None)

    def knn_monitor(self, epoch: int) -> None:
        """Weighted kNN on the test split, logged to train_log.jsonl (a monitor: reported numbers come from
        eval_knn.py on the last checkpoint; the best epoch here is only ever a flagged value)."""
        from .eval.knn import monitor

        share_norm_statistics(self.method)  # before its batch norms' statistics are saved or used
        source = self.args.knn_monitor_features
        if source == "auto":
            source = "memory_bank" if hasattr(self.method, "memory_bank") else "recomputed"
        scores = monitor(self.method, self.train_set, self.monitor_set, self.args.knn_monitor_k, source,
                         self.ctx.device, self.args.workers)
        if "non_finite" in scores:  # (a record of chance, before: zero rows, then NaN rows, vote for nothing)
            raise NonFiniteLoss(f"the weights at {self.position_words(epoch + 1, 0)} overflow on real images: the kNN "
                                f"monitor's embeddings of {scores['non_finite']} images are not finite (the last "
                                f"updates diverged); stopped without saving, {self.last_good_checkpoint()}")
        if self.ctx.is_main:
            voters = scores["voters"]  # (the labelled images, less a memory bank's rows that no step wrote)
            rundir.append_jsonl(self.run_dir / "train_log.jsonl", {
                "epoch": epoch, "knn_monitor": True, "k": self.args.knn_monitor_k,
                **({"k_used": voters} if self.args.knn_monitor_k > voters else {}),
                "temperature": self.method.monitor_temperature, "train_features": source,
                "top1": scores["top1"], "top5": scores["top5"], "time": rundir.now_iso()})
            fewer = f", {voters} images vote" if self.args.knn_monitor_k > voters else ""
            print(f"epoch {epoch + 1}: kNN monitor (k={self.args.knn_monitor_k}{fewer}, {source}) top1 "
                  f"{scores['top1']:.4f}", flush=True)

    def finish(self) -> None:
        """status "finished"; a stop signal that came at the end of the last epoch (its last step, kNN monitor or
        checkpoint) then still ends in exit 75, so that a job's later steps run in its requeued allocation, which
        finds training finished."""
        if self.ctx.is_main:
            rundir.write_status(self.run_dir, "finished", epoch=self.args.epochs, epochs=self.args.epochs)
            epochs = f"{self.args.epochs} epoch{'s' if self.args.epochs != 1 else ''}"
            print(f"finished {epochs}; checkpoint in {self.run_dir / 'checkpoint.pth'}", flush=True)
            if signals.received() is not None:
                print(f"{signals.name()} at the end of the last epoch: training is complete; exiting for the "
                      f"requeue", flush=True)
        self.finished = True
        signals.defer(False)

    def save_and_requeue(self) -> None:
        """After a stop signal: checkpoint.pth at the current position (unless it is there already), status
        "interrupted", then exit 75 through the signal's previous handler (submitit requeues the job there)."""
        epoch, step = self.position
        if self.saved_position != self.position:
            self.save(epoch, step)
        share_stop_signal(self.ctx.device)
        if self.ctx.is_main:
            self.mark_interrupted()  # before the handler requeues: Slurm may kill the job before it returns
            print(f"{signals.name()}: saved {self.run_dir / 'checkpoint.pth'} at {self.position_words(epoch, step)}; "
                  f"run the same command again to resume", flush=True)
        signals.leave()

    def position_words(self, epoch: int, step: int) -> str:
        """(epoch, step) done, in the progress lines' words: `the end of epoch 3`, `epoch 3 step 5/7`."""
        return rundir.position_words(epoch, step, self.steps_per_epoch)

    def mark_interrupted(self) -> None:
        """status.json "interrupted" where training stands (rank 0)."""
        epoch, step = self.position
        rundir.write_status(self.run_dir, "interrupted", epoch=epoch, step=step, epochs=self.args.epochs,
                            signal=signals.name())

    def fail_on_nonfinite(self, epoch: int, step: int, terms: dict) -> None:
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        # the scaler skips steps whose gradients overflow, not a forward pass that overflows fp16's range
        range_note = (" (or the forward pass overflowed fp16's range, up to 65504, where float32 would not: try "
                      "--amp bf16 or off)" if self.precision == "fp16" else "")
        hint = self.method.non_finite_hint()
        raise NonFiniteLoss(f"loss is not finite at {self.position_words(epoch, step + 1)} ({values}){range_note}"
                            f"{f' ({hint})' if hint else ''}; stopped without saving, {self.last_good_checkpoint()}")

    def fail_on_skipped_steps(self, epoch: int, step: int) -> None:
        raise NonFiniteLoss(f"fp16: the gradients were not finite at {self.skipped_in_a_row} steps in a row, up to "
                            f"{self.position_words(epoch, step + 1)} (each step skipped, the loss scale halved to "
                            f"{self.loss_scale:g}): the weights no longer train; stopped without saving, "
                            f"{self.last_good_checkpoint()}")

    def last_good_checkpoint(self) -> str:
        """Where to go on from after a non-finite loss or weights. checkpoint.pth written right before the failing
        step holds the weights whose loss was not finite (the loss is taken before the update): resuming from it
        fails again, so the message points at the latest earlier checkpoint_epNNNN.pth instead."""
        kept = self.run_dir / "checkpoint.pth"
        if not kept.exists():
            return "the last good checkpoint is none (no epoch finished)"
        if self.saved_position != self.position:
            return f"the last good checkpoint is {kept}"
        epoch, step = self.saved_position
        # checkpoint_epNNNN.pth holds the start of epoch NNNN: earlier than checkpoint.pth unless that is at step 0 too.
        earlier = [path for path in checkpoint.epoch_checkpoints(self.run_dir)
                   if (int(path.stem[len("checkpoint_ep"):]), 0) < (epoch, step)]
        instead = (f"the last good one is {earlier[-1]} (copy it over checkpoint.pth to go on from there)"
                   if earlier else "no earlier checkpoint_epNNNN.pth exists (start again in a new --output_dir)")
        return (f"{kept} holds the weights that gave it ({self.position_words(epoch, step)}): resuming from "
                f"it fails again; {instead}")


@contextlib.contextmanager
def owned_run_dir(run_dir: str | os.PathLike, ctx: Context, elsewhere: str = rundir.TRAINING_ELSEWHERE,
                  named: str = "--output_dir"):
    """Hold the run directory's lock (rank 0) for the block; a failure inside it is recorded in status.json.

    A run that has not yet started training (nothing written but the lock) leaves the directory as it found it: a
    directory this call created is removed again. Once training has started (status.json says "running"), any
    failure becomes state "failed" with its one-line reason; a requeue (exit 75) leaves "interrupted" in place.
    `elsewhere`: the way around a directory another process holds, as its message gives it; `named`: what the
    messages call the directory (a linear probe's is no flag of its program).
    """
    run_dir = Path(run_dir)
    if not ctx.is_main:
        _share_outcome(ctx, taken=False)
        started = OwnedRun(run_dir)
        try:
            yield started
        except RuntimeError as err:
            if started.stopped_while_another_rank_started():
                _leave_for_the_requeue(err)
            raise
        return
    try:
        if run_dir.is_file():
            raise ConfigError(f"{named} {str(run_dir)!r} is a file, not a directory")
        _refuse_foreign_config(run_dir, named)
        created = not run_dir.exists()
        lock = rundir.RunLock(run_dir, elsewhere)
        lock.acquire()
    except BaseException:
        _share_outcome(ctx, taken=False)
        raise
    started = OwnedRun(run_dir)
    try:
        _share_outcome(ctx, taken=True)
        yield started
    except SystemExit as stop:
        # After a stop signal (here, or on another rank: then this rank has none of its own) the exit is a requeue,
        # whatever status the handler handed over to picks (submitit's is -1): status.json says "interrupted".
        if signals.received() is not None or signals.leaving():
            started.record_interruption()
        elif stop.code not in (0, None, signals.EXIT_REQUEUE):
            started.record_failure(f"exit status {stop.code}")
        raise
    except BaseException as err:
        if isinstance(err, RuntimeError) and started.stopped_while_another_rank_started():
            started.record_interruption()
            _leave_for_the_requeue(err)
        if signals.leaving():  # the requeue's exit, turned into its own error by the code it interrupted
            started.record_interruption()
            raise
        started.record_failure(_one_line(err))
        raise
    finally:
        lock.release()
        if created and not started.began:
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def _refuse_foreign_config(run_dir: Path, named: str) -> None:
    """A folder holding a config.yaml that no run wrote (a folder of configs, a project's own file): training would
    replace it. A run's own config.yaml, damaged, is written again (its checkpoint or status.json says it is one)."""
    is_run = any((run_dir / name).exists() for name in ("checkpoint.pth", "status.json"))
    if (run_dir / "config.yaml").is_file() and not is_run:
        try:
            read_run_config(run_dir)
        except ConfigError:
            elsewhere = "use another --output_dir" if named == "--output_dir" else "move that config.yaml away"
            raise ConfigError(f"{named} {str(run_dir)!r} holds a config.yaml that is not a run's (training "
                              f"would replace it): {elsewhere}") from None


def _leave_for_the_requeue(err: RuntimeError) -> None:
    """signals.leave (the handler before ours runs: submitit's requeues from rank 0; exit 75); the next start
    resumes from the last checkpoint."""
    print(f"{signals.name()} while another rank was still starting (here: {one_line(err)}); exiting for the "
          "requeue, which resumes from the last checkpoint", flush=True)
    signals.leave()


def _share_outcome(ctx: Context, taken: bool) -> None:
    """Rank 0 tells every rank whether it took the run directory (the others pass `taken` False and hear it): a
    refused start would otherwise leave them to go on alone and wait in their first collective until the timeout."""
    if not distributed.rank0_says(taken) and not ctx.is_main:
        raise ConfigError("rank 0 could not take the run directory (its error names why)")


class OwnedRun:
    """What owned_run_dir knows of the run inside it: whether training began (status "running" written)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.trainer: Trainer | None = None  # set by start_run once status.json says "running"

    @property
    def began(self) -> bool:
        return self.trainer is not None

    def stopped_while_another_rank_started(self) -> bool:
        """Whether an error here is this rank's share of a stop: a stop signal reached it while it waited in a
        collective for a rank still starting (before this start's first step was done, signals deferred), which the
        same signal ended at once (nothing to save yet), breaking the collective. Later, every rank defers signals
        and stops at the same step; an error there is the run's."""
        return (signals.received() is not None and distributed.world_size() > 1
                and (self.trainer is None or self.trainer.steps_this_start == 0))

    def record_interruption(self) -> None:
        """status.json "interrupted" where training stands, also for a signal that ended the process at once (in a
        first epoch's start, before the loop defers signals: a resumed Super-AND's round start), which left
        "running" behind."""
        if self.trainer is None or self.trainer.finished:
            return
        with contextlib.suppress(OSError):
            self.trainer.mark_interrupted()

    def record_failure(self, reason: str) -> None:
        """status.json "failed" at the step that failed (for a file system that refuses even that, nothing); a run
        whose training finished stays "finished" (submitit's handler, given a late signal, may raise after it)."""
        if self.trainer is None or self.trainer.finished:
            return
        epoch, step = self.trainer.position
        with contextlib.suppress(OSError):
            rundir.write_status(self.run_dir, "failed", epoch=epoch, step=step, epochs=self.trainer.args.epochs,
                                reason=reason)


def _one_line(err: BaseException) -> str:
    if isinstance(err, NonFiniteLoss):
        return one_line(err)  # whole: where it stopped and which checkpoint to go on from, for launch.py to repeat
    if isinstance(err, KeyboardInterrupt):
        return "interrupted from the keyboard"
    return (distributed.lost_rank_message(err) or one_line(err))[:300]


def start_run(method: Method, args: argparse.Namespace, ctx: Context, train_set, kind: str, program: str,
              owned: OwnedRun | None = None) -> tuple[Trainer, int, int]:
    """Everything between a built method and the first epoch: resume, check that the command fits the checkpoint,
    then (and only then, so a refused command writes nothing) tidy the directory, write config.yaml and
    status.json "running"."""
    run_dir = Path(args.output_dir)
    trainer = Trainer(method, args, ctx, run_dir, train_set, kind=kind)
    start_epoch, start_step = trainer.resume()
    # A run stopped at an epoch's end, started with --epochs lowered to it, was taken for a finished one: status.json
    # said "finished" with the new length, while config.yaml and the checkpoint kept the schedule it trained under.
    planned = trainer.changed_by_this_start.get("before", {}).get("epochs")
    if start_epoch > args.epochs or (start_epoch == args.epochs and start_step > 0):
        # (an epoch's end of a longer schedule is refused below as an end: the next epoch is the least to give)
        least = start_epoch + (start_step > 0 or (planned or 0) > start_epoch)
        raise ConfigError(f"--epochs {args.epochs}: {run_dir / 'checkpoint.pth'} is already at "
                          f"{trainer.position_words(start_epoch, start_step)} (use --epochs {least} or more, or a "
                          f"new --output_dir)")
    if start_epoch == args.epochs and planned is not None and planned > args.epochs:
        raise ConfigError(f"--epochs {args.epochs}: {run_dir / 'checkpoint.pth'} stands at the end of epoch "
                          f"{start_epoch} of the {planned} its schedule plans, so no step would train under the new "
                          f"one (use --epochs {planned} to finish the run; its checkpoints are scored as they are, "
                          f"mid-run)")
    if kind != "linear" and not (run_dir / "checkpoint.pth").exists():
        refuse_a_lost_checkpoint(run_dir)
        refuse_evaluations_of_earlier_weights(run_dir)
    if args.knn_monitor_every:
        # Now, not after the first epoch: data the monitor cannot read is refused before anything is written
        # (an epoch trained, then lost to the monitor's error at every start).
        trainer.monitor_set = knn_monitor_set(args, train_set)
    # Nothing to train: the record stays that of the starts that trained (unless it is missing or unreadable).
    written = written_run_config(run_dir) or {}
    finished = start_epoch == args.epochs > 0 and isinstance(written.get("args"), dict)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.remove_leftovers(run_dir)
        rundir.truncate_train_log(run_dir, start_epoch, trainer.global_step)
        rewound = set_aside_evaluations_after(run_dir, (start_epoch, start_step)) if kind != "linear" else []
        if rewound:
            print(f"note: checkpoint.pth ({trainer.position_words(start_epoch, start_step)}) is older than evaluations "
                  f"of this run "
                  f"(it was rewound): they are of the weights it replaced, which the training from here does not "
                  f"give again; moved {', '.join(rewound)}", flush=True)
        trainer.restore_missing_epoch_checkpoints()
        if finished:
            rewrite_a_record_of_nothing_saved(trainer, run_dir, program, written)
            changed = trainer.changed_by_this_start
            differing = ", ".join(f"--{key} {_flag_value(before)} -> {_flag_value(changed['after'][key])}"
                                  for key, before in changed.get("before", {}).items())
            unused = f"; this command's other flags ({differing}) are not applied: a new --output_dir trains them" \
                if differing else ""
            epochs = f"{args.epochs} epoch{'s' if args.epochs != 1 else ''}"
            print(f"{run_dir} has trained its {epochs}: nothing to train (config.yaml keeps the flags and "
                  f"code it trained with){unused}", flush=True)
        else:
            code = git_state()
            if trainer.trained_by[-1:] != [code]:
                trainer.trained_by.append(code)
            # config.yaml's git fields say what this start runs; trained_by, what every start of the run ran
            write_resolved(args, run_dir, program, git=code, precision=trainer.precision,
                           world_size=trainer.ctx.world_size, trained_by=trainer.trained_by,
                           resume_changes=trainer.resume_changes,
                           training_set={"images": method.info.num_samples, "fingerprint": method.info.fingerprint},
                           **method.recorded())
        rundir.write_status(run_dir, "running", epoch=start_epoch, step=start_step, epochs=args.epochs)
        if owned is not None:
            owned.trainer = trainer
        if not finished:
            announce_start(trainer, (start_epoch, start_step))
    distributed.barrier()
    require_shared(run_dir, "status.json")  # rank 0 has just written it
    return trainer, start_epoch, start_step


def rewrite_a_record_of_nothing_saved(trainer: Trainer, run_dir: Path, program: str, written: dict) -> None:
    """config.yaml written by a later start (other flags, other code) that saved no checkpoint, failed or killed
    first, describes no weights: of a finished run it is written again from checkpoint.pth's record (its flags,
    precision, starts and resume changes; versions and host are this start's, the checkpoint keeps none).
    `written`: config.yaml as it stands."""
    saved = trainer.saved_record
    if saved is None or [written.get(key) for key in ("trained_by", "resume_changes")] == [saved["trained_by"],
                                                                                          saved["resume_changes"]]:
        return
    write_resolved(argparse.Namespace(**saved["args"]), run_dir, program,
                   git=saved["trained_by"][-1] if saved["trained_by"] else None, precision=saved["precision"],
                   world_size=saved["world_size"], trained_by=saved["trained_by"],
                   resume_changes=saved["resume_changes"],
                   training_set={"images": trainer.method.info.num_samples,
                                 "fingerprint": trainer.method.info.fingerprint},
                   **trainer.method.recorded())
    print(f"note: config.yaml recorded a start that saved no checkpoint (it failed or was stopped first); written "
          f"again from checkpoint.pth ({trainer.position_words(*trainer.position)})", flush=True)


def refuse_a_lost_checkpoint(run_dir: Path) -> None:
    """Refuse to train afresh where a run that trained has lost its checkpoint.pth but not its other files: a link
    into a scratch area purged since, or a checkpoint.pth removed while its epoch checkpoints stay. A fresh start
    would replace those, the training log and the status without a word. A run whose checkpoints were all removed
    trains again in place; a link made before the first start is written through; a first epoch's end killed
    between checkpoint_ep0001.pth and checkpoint.pth (status.json still "running" at epoch 0) redoes that epoch."""
    status = rundir.read_status(run_dir)
    epoch, step = (status.get(key) if isinstance(status.get(key), int) else 0 for key in ("epoch", "step"))
    # (a checkpoint exists from the first epoch's end on, and for a stop after a step: "interrupted" past the start)
    if not (epoch > 0 or status.get("state") == "finished" or (status.get("state") == "interrupted" and step > 0)):
        return
    path, where = run_dir / "checkpoint.pth", rundir.position_words(epoch, step)
    if path.is_symlink():
        raise ConfigError(f"{path} links to {os.readlink(path)}, which does not exist (a scratch area purged?), "
                          f"and status.json says the run trained to {where}: put the file back, copy one of its "
                          f"checkpoint_epNNNN.pth over the link to go on from there, or use a new --output_dir")
    epochs = checkpoint.epoch_checkpoints(run_dir)
    if epochs:
        raise ConfigError(f"{run_dir} has no checkpoint.pth but holds {epochs[-1].name}: a fresh training would "
                          f"replace the run's epoch checkpoints and log; copy {epochs[-1].name} over checkpoint.pth "
                          f"to go on from there, remove the epoch checkpoints to train again, or use a new "
                          f"--output_dir")


def refuse_evaluations_of_earlier_weights(run_dir: Path) -> None:
    """Refuse to train afresh in a directory whose earlier training's checkpoints were removed: that training's
    metrics records and linear probes name the same checkpoint files at the same epochs, so --skip_recorded would
    skip the new weights' evaluations (the tables then file the old numbers under the new config.yaml), and
    eval_linear.py would resume the old probe's head on the new backbone. (Evaluations of another directory's
    checkpoints name it by its full path, and their probes by a `_from` tag: no confusion there.)"""
    own_records = any(not foreign_checkpoint(record.get("checkpoint"))
                      for record in rundir.read_jsonl(run_dir / "metrics.jsonl"))
    earlier = ["metrics.jsonl"] * own_records + [probe.name for probe, _ in own_probes(run_dir)]
    if earlier:
        raise ConfigError(f"{run_dir} has no checkpoint.pth but holds evaluations of earlier weights "
                          f"({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}): a fresh training "
                          f"there would be taken for them; move them away, or use a new --output_dir")


def knn_monitor_set(args: argparse.Namespace, train_set):
    """The test split the kNN monitor scores, refused where the training split has no labels to vote with."""
    from .data import load

    if not bool((train_set.labels >= 0).any()):
        raise ConfigError(f"--knn_monitor_every {args.knn_monitor_every}: the monitor's votes come from labelled "
                          f"training images, and --train_split {args.train_split} of {args.dataset} has none "
                          f"(use --knn_monitor_every 0, or a split with labels, e.g. train+unlabeled)")
    return load(args.dataset, "test", args.data_path)


def announce_start(trainer: Trainer, position: tuple[int, int]) -> None:
    """Rank 0's lines at a start that trains: the whole-run and resume notes, then what trains, where from, where
    to."""
    args, ctx = trainer.args, trainer.ctx
    for note in [*trainer.start_notes(), *trainer.whole_run_settings(), *trainer.resume_notes]:
        print(f"note: {note}", flush=True)
    pretrained = getattr(args, "pretrained", None)
    where = (f"from {trainer.position_words(*position)}" if position != (0, 0)
             else f"from the weights of {pretrained}" if pretrained else "from scratch")
    print(f"{args.method} on {args.dataset} ({len(trainer.train_set)} samples, {trainer.steps_per_epoch} steps/epoch, "
          f"{ctx.world_size} process(es) on {ctx.device}, {trainer.precision}) {where} -> {trainer.run_dir}",
          flush=True)


def require_shared(run_dir: Path, name: str) -> None:
    """Collective: refuse a run directory whose file `name` some ranks see and others do not. Every rank reads the
    checkpoint it resumes from, and only rank 0 writes: on a path local to each node, a resumed run's ranks started
    from different steps (collectives paired up wrongly until a misleading "weights are not finite"). A network file
    system may answer "no such file" from a cache for a while (NFS: up to a minute): the ranks look again every 2 s
    for up to $CLUSTERLAB_SHARED_WAIT_S seconds (60) before refusing."""
    give_up = time.monotonic() + float(os.environ.get("CLUSTERLAB_SHARED_WAIT_S", 60))
    while True:
        seen = [bool(flag) for flag, in distributed.every_ranks([int((run_dir / name).exists())])]
        # rank 0's clock decides for all, so that every rank takes the same number of looks
        if len(set(seen)) == 1 or not distributed.rank0_says(time.monotonic() < give_up):
            break
        time.sleep(2)
    if len(set(seen)) > 1:
        lacking = [rank for rank, found in enumerate(seen) if not found]
        having = [rank for rank, found in enumerate(seen) if found]
        raise ConfigError(f"--output_dir {run_dir}: rank(s) {distributed.rank_list(having)} find {name} there and "
                          f"rank(s) {distributed.rank_list(lacking)} do not: the run directory must be on a file "
                          f"system every node shares")


def load_resumable(path: Path, args: argparse.Namespace, kind: str, training_set, keys: tuple[str, ...]) -> dict:
    """The checkpoint at `path`, refused when the command's `keys` or its training set (`training_set`, a DataInfo:
    its fingerprint) differ from those it was trained with."""
    state = checkpoint.load(path, kind=kind, method=args.method)
    saved = state.get("args", {})
    fresh = f"remove {path.parent}/ to train the probe afresh" if kind == "linear" else "use a new --output_dir"
    for key in keys:
        if key in saved and key in vars(args) and _plain(saved[key]) != _plain(getattr(args, key)):
            if key == "probed_weights":
                raise CheckpointError(f"{path} probed other weights (digest {saved[key]}) than the checkpoint "
                                      f"holds now ({getattr(args, key)}): it was replaced since; {fresh}")
            raise CheckpointError(f"{path} was trained with --{key} {saved[key]!r}, this command has "
                                  f"{getattr(args, key)!r}; {fresh}, or give the same value")
    trained_on = state.get("data_info", {})
    if trained_on.get("fingerprint") not in ("", None, training_set.fingerprint):
        raise CheckpointError(f"{path} was trained on another training set ({trained_on.get('num_samples')} images, "
                              f"digest {trained_on['fingerprint']}; this command's: {training_set.num_samples}, "
                              f"{training_set.fingerprint}): images added, removed, renamed or relabelled change what "
                              f"each position means; {fresh}, or give the training set it was trained on")
    return state


def share_stop_signal(device: torch.device) -> None:
    """Collective: every rank hears the stop signal a rank received (the highest number where several did), for
    rank 0's status.json and lines: a rank stopped for another rank's signal has none of its own."""
    signals.hear(int(max_over_ranks(signals.received() or 0, device)))


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest of `value` over the ranks (collective)."""
    return float(distributed.all_reduce_max(torch.tensor([float(value)], device=device))[0])


def found_on_every_rank(found: list[bool], device: torch.device) -> list[bool]:
    """Which of `found` every rank found (collective). Each rank reads metrics.jsonl on its own, and a record another
    job appends in between would part them: a rank that skipped an evaluation the others run would leave them
    waiting in its collectives until the timeout."""
    if not found:
        return []
    missing = distributed.all_reduce_max(torch.tensor([float(not f) for f in found], device=device))
    return [not m for m in missing.tolist()]


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _flag_value(value) -> str:
    return (" ".join(map(str, value)) or "(none)") if isinstance(value, (list, tuple)) else str(value)


def _flag_changes(saved_args: dict, args: argparse.Namespace, keys: list[str]) -> str:
    """`--lr 0.1 -> 0.2, --epochs 2 -> 3`: the checkpoint's values of `keys`, then the command's."""
    return ", ".join(f"--{key} {_flag_value(saved_args[key])} -> {_flag_value(getattr(args, key))}" for key in keys)


def _plain_args(args: argparse.Namespace) -> dict:
    return {k: _plain(v) for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple))
            or v is None}


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)

