"""The training loop's machinery: one step, one epoch, checkpoints, resume, signals, the NaN guard, logs.

The entry scripts keep the loop over epochs visible; this module does what happens inside it.

Resume is exact: a checkpoint holds the model, optimiser, AMP scaler, the position (epoch, step inside it, global
step), every random generator (the global ones and the augmentation's), and the method's own state (queues,
memory banks, pseudo-labels). Batches depend only on (seed, epoch), so a run stopped in the middle of an epoch
and started again continues with the same samples and the same crops, bit for bit on the CPU.

Signals: SIGUSR2 (submitit's pre-emption / time-limit signal) and SIGTERM (what `scontrol requeue` and pre-emption
send first) are turned into a request that the loop honours at the next step boundary on every rank: rank 0
writes checkpoint.pth, then the previous handler runs (under submitit that requeues the job) and the process
exits with status 75 (EX_TEMPFAIL: run the same command again to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint, distributed
from .data import loader as data_loader
from .distributed import Context
from .errors import CheckpointError, ConfigError, UserError
from .methods.base import Batch, Method, Progress
from .models.batchnorm import convert_sync_batchnorm
from .optim import build_optimizer, build_schedule, set_lr

EXIT_INTERRUPTED = 75
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# What must match between a checkpoint and the command resuming it (the rest may change, --epochs included).
RESUME_KEYS = ("method", "dataset", "arch", "width", "batch_size", "seed", "nmb_crops", "size_crops")


class NonFiniteLoss(UserError):
    pass


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def write_status(run_dir: Path, state: str, **fields) -> None:
    checkpoint.atomic_write_text(run_dir / "status.json",
                                 json.dumps({"state": state, "updated": now_iso(), **fields}) + "\n")


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


class StopSignal:
    """Turns SIGUSR2 / SIGTERM into a request honoured at a step boundary, then hands over to the old handler."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def install(self) -> None:
        for signum in self.SIGNALS:
            self.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._remember)

    def _remember(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def hand_over(self) -> None:
        """Let submitit (if it installed a handler) requeue the job, then exit with EXIT_INTERRUPTED."""
        signum = self.signum or signal.SIGUSR2
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, None)
        sys.exit(EXIT_INTERRUPTED)


def exit_on_stop_signals() -> None:
    """For evaluations (nothing worth saving mid-way): SIGUSR2 / SIGTERM end the process with EXIT_INTERRUPTED, so
    an sbatch script requeues the job; under submitit, whose handler requeues by itself, nothing is changed."""
    def leave(signum, frame):
        print(f"{signal.Signals(signum).name}: evaluation stopped; run it again to redo it", flush=True)
        sys.exit(EXIT_INTERRUPTED)

    for signum in StopSignal.SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, leave)


class Trainer:
    """Owns the optimiser, the AMP machinery and the run directory of one training run."""

    def __init__(self, method: Method, args: argparse.Namespace, ctx: Context, run_dir: Path, train_set,
                 kind: str = "pretrain"):
        self.args, self.ctx, self.run_dir, self.train_set, self.kind = args, ctx, Path(run_dir), train_set, kind
        self.method = method
        self.batches = data_loader.GlobalBatches(len(train_set), args.batch_size, ctx.world_size, ctx.rank, args.seed)
        self.steps_per_epoch = len(self.batches)
        method.attach_data(train_set)
        if args.sync_bn:
            method = convert_sync_batchnorm(method, ctx.device)
        self.method = method
        self.optimizer = build_optimizer([p for p in method.parameters() if p.requires_grad], args)
        self.schedule = build_schedule(args, self.steps_per_epoch)
        use_amp = ctx.device.type == "cuda" and args.amp != "off"
        self.amp_dtype = AMP_DTYPES.get(args.amp) if use_amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.model = (DistributedDataParallel(method, device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
                                              broadcast_buffers=False, find_unused_parameters=args.find_unused)
                      if ctx.world_size > 1 else method)
        self.global_step = 0
        self.stop = StopSignal()
        self.monitor_set = None

    # ---- checkpoints ----
    def state_dict(self, epoch: int, step: int) -> dict:
        """Everything needed to resume at (epoch, step); collective (the method may gather across ranks)."""
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step, "global_step": self.global_step,
                "rng": checkpoint.rng_state(), "method_random": self.method.random_state(),
                "method_state": self.method.extra_state(), "args": _plain_args(self.args),
                "data_info": dataclasses.asdict(self.method.info)}

    def save(self, epoch: int, step: int, names=("checkpoint.pth",)) -> None:
        state = self.state_dict(epoch, step)
        if self.ctx.is_main:
            for name in names:
                checkpoint.save(state, self.run_dir / name, kind=self.kind, method=self.args.method)
        distributed.barrier()

    def resume(self) -> tuple[int, int]:
        """Load run_dir/checkpoint.pth if there is one; returns the (epoch, step) to start from."""
        path = self.run_dir / "checkpoint.pth"
        if not path.exists():
            return 0, 0
        state = load_resumable(path, self.args, self.kind)
        try:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.method.load_extra_state(state["method_state"])
            self.method.load_random_state(state["method_random"])
            checkpoint.set_rng_state(state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            # A flag outside RESUME_KEYS that shapes the model (e.g. --nmb_prototypes) changed, or an entry is missing.
            raise CheckpointError(f"{path} does not fit this command's model ({_load_failure(err)}); use a new "
                                  f"--output_dir or the flags it was trained with (its config.yaml)") from None
        self.global_step = state["global_step"]
        return state["epoch"], state["step"]

    # ---- one epoch ----
    def train_one_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Train from `start_step` to the end of `epoch`; on a stop request save and exit (never returns then)."""
        args, method = self.args, self.method
        self.model.train()
        method.on_epoch_start(epoch)
        log_path = self.run_dir / "train_log.jsonl"
        totals, count, window_start, window_images = {}, 0, time.time(), 0
        epoch_start, stop_requested = time.time(), False
        for step, images, labels, indices, global_size, offset in data_loader.iterate(
                self.train_set, self.batches, epoch, start_step, args.workers, augment=method.augment,
                device=self.ctx.device, log=log_path):
            progress = Progress(epoch, step, self.global_step, self.steps_per_epoch)
            batch = Batch(images, labels, indices, global_size, offset)  # on the device already
            lr = self.schedule(self.global_step)
            set_lr(self.optimizer, lr)
            loss, terms = self.step(batch, progress)
            self.global_step += 1
            window_images += global_size
            stop_requested, bad_loss = self.check(loss)
            if bad_loss:
                self.fail_on_nonfinite(epoch, step, terms)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            count += 1
            last_step = step + 1 == self.steps_per_epoch
            if self.ctx.is_main and (step % args.log_every == 0 or last_step):
                elapsed = time.time() - window_start
                rate = window_images / max(elapsed, 1e-9)
                record = {"epoch": epoch, "step": step, "global_step": self.global_step, "lr": lr,
                          "loss": float(loss), **{k: float(v) for k, v in terms.items()}, "img_per_s": rate,
                          "time": now_iso()}
                append_jsonl(log_path, record)
                print(self.progress_line(record, epoch_start, step), flush=True)
                window_start, window_images = time.time(), 0
            if stop_requested and not last_step:
                self.stop_and_exit(epoch, step + 1)
        if self.ctx.is_main and count:
            append_jsonl(log_path, {"epoch": epoch, "epoch_end": True, "global_step": self.global_step,
                                    **{f"{k}_mean": v / count for k, v in totals.items()},
                                    "epoch_seconds": time.time() - epoch_start, "time": now_iso()})
        if stop_requested:
            self.end_of_epoch(epoch)
            self.stop_and_exit(epoch + 1, 0, saved=True)

    def step(self, batch: Batch, progress: Progress) -> tuple[torch.Tensor, dict]:
        method = self.method
        method.before_step(progress)
        inputs = method.prepare(batch)
        with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss, terms = self.model(inputs, batch, progress)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        method.after_backward(progress)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach(), terms

    def check(self, loss: torch.Tensor) -> tuple[bool, bool]:
        """(stop requested on any rank, loss not finite on any rank): one small all-reduce per step."""
        flags = torch.tensor([float(self.stop.signum is not None), float(not torch.isfinite(loss).item())],
                             device=self.ctx.device)
        distributed.all_reduce_max(flags)
        return bool(flags[0]), bool(flags[1])

    def progress_line(self, record: dict, epoch_start: float, step: int) -> str:
        done = step + 1
        per_step = (time.time() - epoch_start) / done
        remaining_steps = (self.args.epochs - record["epoch"]) * self.steps_per_epoch - done
        eta = _format_seconds(per_step * max(0, remaining_steps))
        terms = " ".join(f"{k} {record[k]:.4f}" for k in record
                         if k not in ("epoch", "step", "global_step", "lr", "loss", "img_per_s", "time"))
        return (f"epoch {record['epoch'] + 1}/{self.args.epochs} step {done}/{self.steps_per_epoch} "
                f"loss {record['loss']:.4f} ({terms}) lr {record['lr']:.5f} img/s {record['img_per_s']:.0f} "
                f"eta {eta}")

    # ---- leaving ----
    def end_of_epoch(self, epoch: int) -> None:
        """checkpoint.pth after every epoch, plus checkpoint_epNNNN.pth at the epochs the config lists."""
        done = epoch + 1
        if self.args.knn_monitor_every and done % self.args.knn_monitor_every == 0:
            self.knn_monitor(epoch)
        names = ["checkpoint.pth"]
        if done in self.args.checkpoint_epochs:
            names.append(f"checkpoint_ep{done:04d}.pth")
        self.save(done, 0, names)
        if self.ctx.is_main:
            write_status(self.run_dir, "running", epoch=done, epochs=self.args.epochs)

    def knn_monitor(self, epoch: int) -> None:
        """Weighted kNN on the test split, logged to train_log.jsonl (a monitor: reported numbers come from
        eval_knn.py on the last checkpoint; the best epoch here is only ever a flagged value)."""
        from .data import load
        from .eval.knn import monitor

        if self.monitor_set is None:
            self.monitor_set = load(self.args.dataset, "test", self.args.data_path)
        source = self.args.knn_monitor_features
        if source == "auto":
            source = "memory_bank" if hasattr(self.method, "memory_bank") else "recomputed"
        scores = monitor(self.method, self.train_set, self.monitor_set, self.args.knn_monitor_k, source,
                         self.ctx.device)
        if self.ctx.is_main:
            append_jsonl(self.run_dir / "train_log.jsonl", {
                "epoch": epoch, "knn_monitor": True, "k": self.args.knn_monitor_k,
                "temperature": self.method.monitor_temperature, "train_features": source,
                "top1": scores["top1"], "top5": scores["top5"], "time": now_iso()})
            print(f"epoch {epoch + 1}: kNN monitor (k={self.args.knn_monitor_k}, {source}) top1 "
                  f"{scores['top1']:.4f}", flush=True)

    def finish(self) -> None:
        if self.ctx.is_main:
            write_status(self.run_dir, "finished", epoch=self.args.epochs, epochs=self.args.epochs)
            print(f"finished {self.args.epochs} epochs; checkpoint in {self.run_dir / 'checkpoint.pth'}", flush=True)

    def stop_and_exit(self, epoch: int, step: int, saved: bool = False) -> None:
        if not saved:
            self.save(epoch, step)
        name = signal.Signals(self.stop.signum).name if self.stop.signum else "signal"
        if self.ctx.is_main:
            write_status(self.run_dir, "interrupted", epoch=epoch, step=step, signal=name)
            print(f"{name}: saved {self.run_dir / 'checkpoint.pth'} at epoch {epoch} step {step}; run the same "
                  f"command again to resume", flush=True)
        self.stop.hand_over()

    def fail_on_nonfinite(self, epoch: int, step: int, terms: dict) -> None:
        if self.ctx.is_main:
            write_status(self.run_dir, "failed", epoch=epoch, step=step, reason="non-finite loss")
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        kept = self.run_dir / "checkpoint.pth"
        raise NonFiniteLoss(f"loss is not finite at epoch {epoch} step {step} ({values}); stopped without saving, "
                            f"the last good checkpoint is {kept if kept.exists() else 'none (no epoch finished)'}")


def start_run(method: Method, args: argparse.Namespace, ctx: Context, train_set, kind: str, program: str
              ) -> tuple[Trainer, int, int]:
    """Everything between a built method and the first epoch: check the run directory, resume, write config.yaml
    (after the resume, so a checkpoint this command cannot load leaves the directory as it was), signals."""
    from .config import write_resolved

    run_dir = Path(args.output_dir)
    check_run_dir(run_dir, args, kind)
    trainer = Trainer(method, args, ctx, run_dir, train_set, kind=kind)
    start_epoch, start_step = trainer.resume()
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(args, run_dir, program)
    trainer.stop.install()
    if ctx.is_main:
        where = "from scratch" if (start_epoch, start_step) == (0, 0) else f"from epoch {start_epoch} step {start_step}"
        print(f"{args.method} on {args.dataset} ({len(train_set)} samples, {trainer.steps_per_epoch} steps/epoch, "
              f"{ctx.world_size} process(es) on {ctx.device}) {where} -> {run_dir}", flush=True)
    return trainer, start_epoch, start_step


def load_resumable(path: Path, args: argparse.Namespace, kind: str) -> dict:
    state = checkpoint.load(path, kind=kind, method=args.method)
    saved = state.get("args", {})
    for key in RESUME_KEYS:
        if key in saved and key in vars(args) and _plain(saved[key]) != _plain(getattr(args, key)):
            raise CheckpointError(f"{path} was trained with --{key} {saved[key]!r}, this command has "
                                  f"{getattr(args, key)!r}; use a new --output_dir or the same value")
    return state


def _load_failure(err: Exception) -> str:
    """The line of a state-dict loading error that names what differs (torch puts a heading line first)."""
    if isinstance(err, KeyError):
        return f"no entry {err}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines or [""])[0]
    return detail[:200]


def check_run_dir(run_dir: Path, args: argparse.Namespace, kind: str) -> None:
    """Refuse, before anything is written, an output directory whose checkpoint this run cannot resume."""
    path = Path(run_dir) / "checkpoint.pth"
    if path.exists():
        load_resumable(path, args, kind)
    elif Path(run_dir).is_file():
        raise ConfigError(f"--output_dir {str(run_dir)!r} is a file, not a directory")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


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


def configure_threads() -> None:
    """Honour Slurm's CPU allocation for intra-op threads when nothing else set it."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, int(cpus)))
