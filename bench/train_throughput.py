#!/usr/bin/env python
"""Training throughput of a recipe: images per second over timed steps, after warm-up steps.

    python bench/train_throughput.py --config configs/swav_digits.yaml [--steps 20 --warmup 5] [any training flag]

Any recipe: the flags are main_pretrain.py's or main_cluster.py's, by the method's kind. The steps are the engine's
as an epoch runs them (the method's epoch hooks included); each is timed from the end of the one before, so the
wait for the batch (loading, and cutting crops of image files) counts with augmentation, forward, backward and the
optimiser step. Prints one Markdown row per run: method, backbone, crops, global batch, device, threads, memory
order (`--channels_last`), precision (`--amp`), median and min/max img/s (images of the global batch per second,
each with all its crops), and peak memory (CUDA) or max RSS (CPU).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clusterlab import data, distributed, engine
from clusterlab.config import OneLineErrorParser, config_layers, non_negative_int, positive_int
from clusterlab.data import loader as data_loader
from clusterlab.errors import run_cli
from clusterlab.methods import METHODS, Batch, DataInfo, Progress
from clusterlab.optim import set_lr
from clusterlab.programs.train import parse_args
from machine import cpu_name


def program_kind(argv: list[str]) -> str:
    """pretrain or cluster: the kind of the method that --method or the --config file (and its bases) names."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--method")
    peek.add_argument("--config")
    named, _ = peek.parse_known_args(argv)
    method = named.method
    if method is None and named.config:
        for _, layer in config_layers(named.config):
            method = layer.get("method", method)
    return METHODS[method].program_kind if method in METHODS else "pretrain"


def main(argv=None):
    bench = OneLineErrorParser(add_help=False, usage="%(prog)s [--steps N] [--warmup N] [training flags]")
    bench.add_argument("--steps", type=positive_int, default=20, help="timed steps (20)")
    bench.add_argument("--warmup", type=non_negative_int, default=5, help="steps run before timing (5)")
    known, rest = bench.parse_known_args(argv)
    if {"-h", "--help"} & set(rest):
        bench.print_help()
    kind = program_kind(rest)
    with tempfile.TemporaryDirectory() as tmp:
        args = parse_args(kind, [*rest, "--output_dir", tmp])
        ctx = distributed.init(args.device)
        engine.seed_everything(args.seed)
        train_set = data.load(args.dataset, args.train_split, args.data_path)
        method = METHODS[args.method](args, DataInfo.of(train_set, args.mean, args.std), ctx.device).to(ctx.device)
        trainer = engine.Trainer(method, args, ctx, Path(tmp), train_set, kind=kind)
        trainer.model.train()
        times, epoch = [], 0
        while len(times) < known.warmup + known.steps:
            method.on_epoch_start(epoch)
            batches = data_loader.iterate(train_set, trainer.batches, epoch, workers=args.workers,
                                          augment=method.augment, device=ctx.device)
            if ctx.device.type == "cuda":  # the epoch hook's queued work is not the first step's
                torch.cuda.synchronize()
            start = time.perf_counter()
            for step, images, labels, indices, total, offset in batches:
                batch = Batch(images, labels, indices, total, offset)
                set_lr(trainer.optimizer, trainer.schedule(trainer.global_step))
                loss, _ = trainer.step(batch, Progress(epoch, step, trainer.global_step, trainer.steps_per_epoch))
                trainer.global_step += 1
                float(loss)  # waits for the step, on any device
                now = time.perf_counter()
                times.append(now - start)
                start = now
                if len(times) >= known.warmup + known.steps:
                    break
            else:
                method.on_epoch_end(epoch)
            epoch += 1
        rates = [args.batch_size / t for t in times[known.warmup:]]
        if ctx.device.type == "cuda":
            memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA peak)"
        else:
            memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max RSS)"
        crops = " + ".join(f"{n}x{s or train_set.image_size}" for n, s in zip(args.nmb_crops, args.size_crops))
        order = "channels-last" if args.channels_last else "default"
        print(torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else cpu_name(), end="\n\n")
        print("| method | backbone | crops | batch | device | threads | memory order | precision "
              "| img/s median (min-max) | memory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {args.method} | {args.arch} w{args.width} | {crops} | {args.batch_size} | {ctx.device} | "
              f"{torch.get_num_threads()} | {order} | {trainer.precision} | {statistics.median(rates):.0f} "
              f"({min(rates):.0f}-{max(rates):.0f}) | {memory} |")


if __name__ == "__main__":
    run_cli(main)  # a flag the training programs refuse: their one line, not a traceback
