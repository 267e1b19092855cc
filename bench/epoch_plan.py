#!/usr/bin/env python
"""Time planning one epoch as the training loop does: this rank's indices of every step (GlobalBatches).

    python bench/epoch_plan.py [--samples 1281167 --batch_size 256 --world_sizes 1 8 --repeats 3]

Prints one Markdown row per world size: the steps planned and the seconds to plan a whole epoch (rank 0's
`local_indices` of every step, a fresh GlobalBatches each repeat so that nothing is cached from a previous one),
wall and CPU time of this process. The calls are the loader's public API, so the same script times whichever
checkout of the package is imported (`PYTHONPATH=src` for this one, `PYTHONPATH=OLD/src` for an older one).
"""
from __future__ import annotations

import statistics
import time

import torch

from clusterlab.config import OneLineErrorParser, positive_int
from clusterlab.data.loader import GlobalBatches
from clusterlab.errors import ConfigError
from machine import cpu_name


def main():
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=positive_int, default=1_281_167,
                        help="dataset size (ImageNet-1k train: 1,281,167)")
    parser.add_argument("--batch_size", type=positive_int, default=256, help="global batch")
    parser.add_argument("--world_sizes", type=positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    for world_size in args.world_sizes:  # every size refused before the first row, not after it
        try:
            GlobalBatches(args.samples, args.batch_size, world_size, 0, seed=0)
        except ConfigError as err:
            parser.error(str(err))
    torch.set_num_threads(1)
    print(f"one thread of {cpu_name()}\n")
    print("| samples | global batch | world size | steps | plan one epoch: wall s, median (min-max) | CPU s, median |")
    print("| --- | --- | --- | --- | --- | --- |")
    for world_size in args.world_sizes:
        seconds, cpu_seconds = [], []
        for _ in range(args.repeats):
            batches = GlobalBatches(args.samples, args.batch_size, world_size, 0, seed=0)
            start, cpu_start = time.perf_counter(), time.process_time()
            # clone: a slice is a view, and before the plan was cached each step's slice kept its own permutation
            # alive (5,004 x 10 MB for ImageNet)
            plan = [batches.local_indices(3, step)[0].clone() for step in range(len(batches))]
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        print(f"| {args.samples:,} | {args.batch_size} | {world_size} | {len(plan):,} | "
              f"{statistics.median(seconds):.3f} ({min(seconds):.3f}-{max(seconds):.3f}) | "
              f"{statistics.median(cpu_seconds):.3f} |", flush=True)


if __name__ == "__main__":
    main()
