#!/usr/bin/env python
"""Training throughput of a recipe: images per second over timed steps, after warm-up steps.

    python bench/train_throughput.py --config configs/swav_digits.yaml [--steps 20 --warmup 5] [any main_pretrain flag]

Prints one Markdown row per run: method, backbone, crops, global batch, device, threads, memory order
(`--channels_last`), median and min/max img/s (images of the global batch per second, each with all its crops), and
peak memory (CUDA) or max RSS (CPU).
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
from clusterlab.data import loader as data_loader
from clusterlab.methods import METHODS, Batch, DataInfo, Progress
from clusterlab.optim import set_lr
from clusterlab.programs.train import parse_args


def main():
    bench = argparse.ArgumentParser(add_help=False)
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=5)
    known, rest = bench.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp:
        args = parse_args("pretrain", [*rest, "--output_dir", tmp])
        ctx = distributed.init(args.device)
        engine.seed_everything(args.seed)
        train_set = data.load(args.dataset, args.train_split, args.data_path)
        method = METHODS[args.method](args, DataInfo.of(train_set, args.mean, args.std), ctx.device).to(ctx.device)
        trainer = engine.Trainer(method, args, ctx, Path(tmp), train_set)
        trainer.model.train()
        times, step, epoch = [], 0, 0
        while len(times) < known.warmup + known.steps:
            for _, images, labels, indices, total, offset in data_loader.iterate(
                    train_set, trainer.batches, epoch, workers=args.workers, augment=method.augment, device=ctx.device):
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                batch = Batch(images, labels, indices, total, offset)
                set_lr(trainer.optimizer, trainer.schedule(step))
                loss, _ = trainer.step(batch, Progress(epoch, step, step, trainer.steps_per_epoch))
                float(loss)  # waits for the step, on any device
                times.append(time.perf_counter() - start)
                step += 1
                if len(times) >= known.warmup + known.steps:
                    break
            epoch += 1
        rates = [args.batch_size / t for t in times[known.warmup:]]
        if ctx.device.type == "cuda":
            memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA peak)"
        else:
            memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (max RSS)"
        crops = " + ".join(f"{n}x{s or train_set.image_size}" for n, s in zip(args.nmb_crops, args.size_crops))
        order = "channels-last" if args.channels_last else "default"
        print("| method | backbone | crops | batch | device | threads | memory order | img/s median (min-max) | memory |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {args.method} | {args.arch} w{args.width} | {crops} | {args.batch_size} | {ctx.device} | "
              f"{torch.get_num_threads()} | {order} | {statistics.median(rates):.0f} "
              f"({min(rates):.0f}-{max(rates):.0f}) | {memory} |")


if __name__ == "__main__":
    main()
