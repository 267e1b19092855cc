#!/usr/bin/env python
"""The loss part of the memory-bank methods' step, alone: everything between the embeddings and their gradient.

    python bench/bank_losses.py [--repeats 12] [--bank 60000] [--threads 1]

Each method of a Fashion-MNIST recipe is built with its backbone and head replaced by the identity, its bank filled
with random unit rows (N x 128), and its forward pass plus backward pass timed on the fixed unit embeddings of 128
images (NPID: one view; Super-AND: two): the products with the bank, the losses and their gradients, up to the
gradient with respect to the embeddings.
Rows: NPID's full softmax (configs/npid_fashion_mnist_20ep.yaml), Super-AND (configs/superand_fashion_mnist.yaml) at
UE weight 0 (the recipe's: its rounds are one epoch long) and at 0.2. The calls of all rows are interleaved, the
first two of each are not counted; prints a Markdown table of median, min and max.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clusterlab.config import OneLineErrorParser, positive_int  # noqa: E402
from clusterlab.methods import METHODS, Batch, DataInfo, Progress  # noqa: E402
from clusterlab.programs.train import parse_args  # noqa: E402
from machine import cpu_name  # noqa: E402

BATCH, DIM = 128, 128


def loss_step(config: str, bank_rows: int, epoch: int, *flags: str):
    """A function running one forward and backward pass of the recipe's loss part on fixed embeddings."""
    args = parse_args("pretrain", ["--config", str(ROOT / "configs" / config), "--device", "cpu",
                                   "--output_dir", "unused", "--embed_dim", str(DIM), *flags])
    generator = torch.Generator().manual_seed(0)
    method = METHODS[args.method](args, DataInfo(1, 28, bank_rows, 10, (0.5,), (0.25,)), torch.device("cpu"))
    method.backbone = method.head = torch.nn.Identity()
    with torch.no_grad():
        method.memory.weight.copy_(F.normalize(torch.randn(bank_rows, DIM, generator=generator), dim=1))
    views = F.normalize(torch.randn(2 * BATCH, DIM, generator=generator), dim=1)
    indices = torch.randperm(bank_rows, generator=generator)[:BATCH]
    batch = Batch(torch.zeros(BATCH, 1, 28, 28, dtype=torch.uint8), torch.zeros(BATCH, dtype=torch.long), indices,
                  BATCH, 0)
    crops = (lambda x: [x[:BATCH], x[BATCH:]]) if args.method == "superand" else (lambda x: [x[:BATCH]])

    def run() -> None:
        x = views.clone().requires_grad_()
        loss, _ = method(crops(x), batch, Progress(epoch, 0, 0, 1))
        loss.backward()
    return run


def main() -> None:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=12)
    parser.add_argument("--bank", type=positive_int, default=60000, help=f"bank rows, at least the batch ({BATCH})")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    if args.bank < BATCH:
        parser.error(f"--bank {args.bank} is smaller than the batch of {BATCH} (each sample has a row of its own)")
    torch.set_num_threads(args.threads)
    # Super-AND with rounds of two epochs and a UE step every epoch: epoch 0 has weight 0, epoch 1 weight 0.2.
    superand = ("superand_fashion_mnist.yaml", "--rounds", "3", "--epochs_per_round", "2", "--schedule_period", "2",
                "--epochs", "6", "--ue_every", "1")
    rows = {
        "NPID full softmax": loss_step("npid_fashion_mnist_20ep.yaml", args.bank, 0),
        "Super-AND, UE weight 0": loss_step(superand[0], args.bank, 0, *superand[1:]),
        "Super-AND, UE weight 0.2": loss_step(superand[0], args.bank, 1, *superand[1:]),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.repeats + 2):
        for name, run in rows.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    print(f"loss part on the embeddings of {BATCH} images (d {DIM}), bank {args.bank} x {DIM}, "
          f"{args.threads} thread(s) of {cpu_name()}, {args.repeats} counted calls each")
    print("\n| loss part | median | min | max |\n| --- | --- | --- | --- |")
    for name, values in times.items():
        counted = values[2:]
        print(f"| {name} | {1000 * statistics.median(counted):.0f} ms | {1000 * min(counted):.0f} ms | "
              f"{1000 * max(counted):.0f} ms |")


if __name__ == "__main__":
    main()
