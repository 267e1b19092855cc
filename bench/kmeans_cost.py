#!/usr/bin/env python
"""What eval_cluster.py's k-means costs as the fit split and the number of clusters grow, and what --fit_size saves.

    python bench/kmeans_cost.py [--dim 512] [--cases 10000:100 40000:1000 40000:1000:10000]

Each case N:K[:FIT_SIZE] times `kmeans_assign` (scikit-learn, k-means++, one restart: eval_cluster.py runs
--restarts, 10 by default, of these) on N unit rows of DIM drawn around 1,000 random unit centres (features of a
trained network cluster; uniform noise would take more iterations), assigning the same N rows. Prints a Markdown
table: seconds of the fit and assignment, and the time per fitted row and cluster, with the machine in its header.
scikit-learn runs on OpenMP threads, every core unless OMP_NUM_THREADS says otherwise (as in eval_cluster.py).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clusterlab.config import OneLineErrorParser, positive_int  # noqa: E402
from clusterlab.eval.kmeans import kmeans_assign  # noqa: E402
from machine import cpu_name  # noqa: E402


def case(text: str) -> tuple[int, int, int | None]:
    try:
        numbers = [int(part) for part in text.split(":")]
    except ValueError:
        numbers = []
    # k-means needs at least as many fitted rows as clusters
    if len(numbers) not in (2, 3) or min(numbers) < 1 or min(numbers[:1] + numbers[2:]) < numbers[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: give ROWS:CLUSTERS or ROWS:CLUSTERS:FIT_SIZE, whole numbers with "
                                         f"CLUSTERS at most ROWS and FIT_SIZE, e.g. 40000:1000")
    return numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else None


def features(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(1000, dim, generator=generator), dim=1)
    chosen = centres[torch.randint(0, 1000, (rows,), generator=generator)]
    return F.normalize(chosen + 0.05 * torch.randn(rows, dim, generator=generator), dim=1)


def main() -> None:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=positive_int, default=512)
    parser.add_argument("--cases", type=case, nargs="+",
                        default=[case("10000:100"), case("40000:1000"), case("40000:1000:10000")])
    args = parser.parse_args()
    kmeans_assign(features(500, args.dim), features(500, args.dim), 10, restarts=1)  # scikit-learn's first call
    print(f"k-means, one restart, {args.dim}-d rows, {cpu_name()}\n")
    print("| rows | clusters | fitted on | seconds | microseconds per fitted row and cluster |")
    print("| --- | --- | --- | --- | --- |")
    for rows, clusters, fit_size in args.cases:
        x = features(rows, args.dim)
        start = time.perf_counter()
        kmeans_assign(x, x, clusters, restarts=1, seed=0, fit_size=fit_size)
        seconds = time.perf_counter() - start
        fitted = min(fit_size or rows, rows)
        print(f"| {rows} | {clusters} | {fitted} | {seconds:.1f} | {1e6 * seconds / (fitted * clusters):.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
