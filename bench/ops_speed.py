#!/usr/bin/env python
"""Timings of the shared numerical parts at CIFAR scale, on the CPU (and the GPU when there is one).

    python bench/ops_speed.py [--device cpu|cuda] [--repeats 5]

- memory-bank update: a batch of 256 rows into a bank of N = 50,000 x d = 128 (NPID / Super-AND, every step);
- weighted kNN evaluation: 10,000 test against 50,000 train features, d = 128, k = 200 (eval_knn.py's scoring);
- SwAV Sinkhorn: 3 iterations on 256 + 3,840 queue rows x 3,000 prototypes (one assignment crop of one step);
- SeLa labelling: the whole-dataset Sinkhorn for N = 50,000, K = 128, 10 heads, lambda 10, tol 0.01;
- LARS: one optimiser step (momentum, weight decay) over the parameters of a ResNet-50 (161 tensors, 25.6 M values),
  as SwAV's ImageNet recipe steps every iteration;
- loading a checkpoint of that ResNet-50 and its LARS momentum from a file in the page cache, by torch.load alone
  and by checkpoint.load, which also checks the CRC-32 of every entry of the file's zip archive (on the CPU).
Prints a Markdown table with the median, min and max wall time over the repeats, then the number of tensor operators
one LARS step calls (on a GPU each is at least one kernel launch, whose cost the CPU timing does not show; on the
CPU the optimiser takes the parameters in cache-sized batches, on a GPU all at once).
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clusterlab import checkpoint  # noqa: E402
from clusterlab.config import OneLineErrorParser, positive_int  # noqa: E402
from clusterlab.distributed import pick_device  # noqa: E402
from clusterlab.errors import ConfigError  # noqa: E402
from clusterlab.eval.knn import knn_class_scores  # noqa: E402
from clusterlab.ops.memory_bank import MemoryBank  # noqa: E402
from clusterlab.optim import LARS  # noqa: E402
from clusterlab.ops.sinkhorn import sela_sinkhorn, sinkhorn  # noqa: E402
from machine import cpu_name  # noqa: E402


def timed(fn, device, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu or cuda")
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args()
    try:
        device = pick_device(args.device)
    except ConfigError as err:
        parser.error(str(err))
    generator = torch.Generator().manual_seed(0)
    n, d = 50_000, 128

    bank = MemoryBank(n, d, momentum=0.5).to(device)
    indices = torch.randperm(n, generator=generator)[:256].to(device)
    features = torch.nn.functional.normalize(torch.randn(256, d, generator=generator), dim=1).to(device)

    train = torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1).to(device)
    test = torch.nn.functional.normalize(torch.randn(10_000, d, generator=generator), dim=1).to(device)
    labels = torch.randint(10, (n,), generator=generator).to(device)

    scores = torch.nn.functional.normalize(torch.randn(256 + 3840, 128, generator=generator), dim=1).to(device) @ \
        torch.nn.functional.normalize(torch.randn(3000, 128, generator=generator), dim=1).to(device).t()
    head_logits = [torch.randn(n, 128, generator=generator).to(device) for _ in range(10)]

    resnet50 = torchvision.models.resnet50().to(device)
    for parameter in resnet50.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    lars = LARS(resnet50.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6)
    lars.step()  # (its momentum buffers, which a checkpoint holds)
    folder = tempfile.TemporaryDirectory()
    saved = Path(folder.name) / "checkpoint.pth"
    checkpoint.save({"model": resnet50.state_dict(), "optimizer": lars.state_dict()}, saved, kind="pretrain",
                    method="swav")
    megabytes = saved.stat().st_size / 2**20

    rows = [
        ("memory-bank update, 256 rows into 50,000 x 128", lambda: bank.update(indices, features)),
        ("weighted kNN, 10,000 x 50,000, d 128, k 200", lambda: knn_class_scores(train, labels, test, 10, 200, 0.1)),
        ("SwAV Sinkhorn, (256 + 3,840) x 3,000, 3 iterations", lambda: sinkhorn(scores, 0.05, 3)),
        ("SeLa labelling, 50,000 x 128, 10 heads, lambda 10", lambda: [sela_sinkhorn(x, 10.0, 0.01)
                                                                       for x in head_logits]),
        ("LARS step, ResNet-50 (161 tensors, 25.6 M values)", lambda: lars.step()),
        (f"checkpoint of ResNet-50 + LARS momentum ({megabytes:.0f} MiB), torch.load",
         lambda: torch.load(saved, map_location="cpu", weights_only=True)),
        ("the same file, checkpoint.load (torch.load + CRC-32 check)", lambda: checkpoint.load(saved)),
    ]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device {device} ({where}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| operation | median | min | max |")
    print("| --- | --- | --- | --- |")
    for label, fn in rows:
        times = timed(fn, device, args.repeats)
        print(f"| {label} | {_fmt(statistics.median(times))} | {_fmt(min(times))} | {_fmt(max(times))} |")
    folder.cleanup()
    calls = {where: lars_operator_calls(torch.device(where)) for where in (device.type, "meta")}
    print(f"LARS step over ResNet-50's parameters: {calls[device.type]} tensor operator calls on {device.type}, "
          f"{calls['meta']} on a GPU (counted on the meta device, which takes them in one batch as a GPU does)")


def lars_operator_calls(device: torch.device) -> int:
    """The operators one LARS step calls (after the first, which creates the momentum buffers)."""
    with device:
        model = torchvision.models.resnet50()
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    lars = LARS(model.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6)
    lars.step()
    with OperatorCalls() as counted:
        lars.step()
    return counted.calls


class OperatorCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"


if __name__ == "__main__":
    main()
