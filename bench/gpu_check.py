#!/usr/bin/env python
"""One command that checks a GPU (or this CPU) for the suite: every method trains, and the speed goals are measured.

    python bench/gpu_check.py --out bench/gpu_check_h200.md          # one GPU, <= 8 minutes (--budget_s 480)
    python bench/gpu_check.py --device cpu --tiny                     # every part at toy sizes, on the CPU
    python bench/gpu_check.py --device cpu --tiny --skip_compile      # the same without compiling (the tests' run)
    python bench/gpu_check.py --device cpu --parts c d                # some parts only

(a) every method of clusterlab.methods.METHODS trains ~30 steps at the sizes and precision of its CIFAR-10 recipe
    (configs/*cifar10*.yaml) on fabricated CIFAR-10 files, written in the real python-pickle format into a temporary
    folder: the loss of every step must be finite; step time and peak memory.
(b) SwAV CIFAR-10 as configs/swav_cifar10.yaml trains it (2x32 crops, fp16) at global batch 512: images/s, the epoch
    of 50,000 images extrapolated from the median step, peak memory; eager, --channels_last, and (last, it takes
    longest) --compile.
(c) the shared operations at GPU sizes: SwAV's Sinkhorn on (batch + queue) 4096 x 3000 scores, SeLa's whole-dataset
    Sinkhorn on 50,000 x 128 logits for 10 heads, weighted kNN of 10,000 test against 50,000 train features.
(d) the device-side multi-crop (data/augment.py MultiCrop) at ImageNet sizes, 2x224 + 6x96 crops with colour jitter,
    greyscale and blur, from a uint8 batch already on the device, in images/s; and torchvision's per-image PIL
    pipeline with the same operations on one CPU core (fewer images): how many such cores the device replaces.

Training steps are the engine's (Trainer.step: augmentation, autocast, GradScaler, optimiser), with the dataset's
uint8 tensor resident on the device and indexed there, and the training loop's per-step finiteness check (a host
synchronisation, as in training). Every figure is a median over repeats after warm-up, timed with CUDA events on a
GPU (perf_counter on the CPU). A row that fails reports its error (the traceback goes to stderr) and the others
still run. --budget_s: rows that would start once the budget is spent are skipped, and a training row stops early
(a compilation under way is not cut short).
Prints one Markdown table (stdout; --out FILE writes it too); everything else goes to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import pickle
import resource
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clusterlab import data, engine  # noqa: E402
from clusterlab.data.augment import ColorSpec, CropSpec, MultiCrop  # noqa: E402
from clusterlab.config import OneLineErrorParser, non_negative_float  # noqa: E402
from clusterlab.distributed import Context, pick_device, take_device  # noqa: E402
from clusterlab.eval.knn import knn_class_scores  # noqa: E402
from clusterlab.methods import METHODS, Batch, DataInfo, Progress  # noqa: E402
from clusterlab.ops.sinkhorn import sela_sinkhorn, sinkhorn  # noqa: E402
from clusterlab.optim import set_lr  # noqa: E402
from clusterlab.programs.train import parse_args  # noqa: E402
from machine import cpu_name  # noqa: E402

# The CIFAR-10 recipe each method is checked with.
RECIPES = {"swav": "swav_cifar10", "unmix": "unmix_cifar10", "npid": "npid_cifar10", "superand": "superand_cifar10",
           "sela": "sela_cifar10_resnet", "selfclassifier": "selfclassifier_cifar10_v2", "embedul": "embedul_cifar10",
           "scan": "scan_cifar10", "scan_selflabel": "scan_selflabel_cifar10"}
GOALS = {"epoch": 3.0, "sinkhorn": 1e-3, "sela": 1.0, "knn": 1.0}  # seconds, on an H100-class GPU
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PARTS = ("a", "b", "c", "d")


@dataclass(frozen=True)
class Sizes:
    train_images: int         # fabricated CIFAR-10 training images (test split: a fifth)
    method_steps: int         # (a): steps per method, the first `method_warmup` not timed
    method_warmup: int
    swav_batch: int           # (b)
    swav_steps: int
    swav_warmup: int
    sinkhorn_rows: int        # (c): batch + queue
    prototypes: int
    sela_samples: int
    sela_classes: int
    sela_heads: int
    knn_test: int
    knn_train: int
    repeats: int              # (c), (d): timed repeats after one warm-up
    crop_batch: int           # (d): images per device call
    crop_source: int          # side of the uint8 source images
    crop_sizes: tuple         # (global, local) crop sides
    torchvision_images: int   # (d): images through the per-image pipeline on one core
    training_flags: list = field(default_factory=list)  # added to every recipe
    method_flags: dict = field(default_factory=dict)    # added to one method's recipe


FULL = Sizes(50_000, 30, 5, 512, 40, 10, 4096, 3000, 50_000, 128, 10, 10_000, 50_000, 5, 256, 256, (224, 96), 32)
# Toy sizes: every row but the compiled one in well under a minute on the CPU (the test suite runs it so); compiling
# takes minutes on a CPU whatever the sizes.
TINY = Sizes(256, 4, 1, 16, 4, 1, 96, 30, 500, 16, 2, 100, 500, 2, 4, 64, (32, 16), 2,
             training_flags=["--width", "4", "--batch_size", "16", "--size_crops", "16"],
             method_flags={"selfclassifier": ["--hidden_dim", "64", "--size_crops", "16", "16", "8"]})


@dataclass
class Row:
    part: str
    check: str
    result: str
    goal: str = "-"
    verdict: str = "-"


# ---- measuring -------------------------------------------------------------------------------------------------------

class Clock:
    """Seconds of the block run inside `with`: CUDA events on a GPU (after a synchronisation), perf_counter else."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, float("nan")

    def __enter__(self) -> "Clock":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.seconds = self.start.elapsed_time(end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.start


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Clock(device) as clock:
            fn()
        times.append(clock.seconds)
    return times


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"max RSS of the process so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.2f} s"


def verdict(value: float, goal: float, applies: bool) -> str:
    if not applies:
        return "n/a (goal is for full sizes on a GPU)"
    return "met" if value <= goal else "missed"


# ---- fabricated CIFAR-10 ---------------------------------------------------------------------------------------------

def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """root/cifar-10-batches-py as the real download lays it out: data_batch_1..5, test_batch, batches.meta; each a
    pickled dict with "data" (N x 3072 uint8, channel-major rows), "labels", "filenames", "batch_label". Pixels are
    noise: this checks that training runs and how fast, not what it learns."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    parts = [(f"data_batch_{i + 1}", n) for i, n in enumerate(np.diff(np.linspace(0, n_train, 6).astype(int)))]
    for name, count in [*parts, ("test_batch", n_test)]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, count).tolist(),
                 "data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": n_train // 5, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


# ---- (a), (b): training steps ----------------------------------------------------------------------------------------

@dataclass
class Training:
    losses: list
    step_times: list          # timed steps only
    first_step: float         # seconds of step 0 (cuDNN set-up, SeLa's first labelling, compilation)
    batch: int
    steps_per_epoch: int
    precision: str
    memory: str
    stopped_early: bool

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_times)

    def loss_summary(self) -> str:
        bad = [i for i, value in enumerate(self.losses) if not math.isfinite(value)]
        state = f"all {len(self.losses)} finite" if not bad else f"NOT FINITE at step(s) {bad[:5]}"
        return f"loss {self.losses[0]:.4f} -> {self.losses[-1]:.4f}, {state}"

    @property
    def finite(self) -> bool:
        return all(math.isfinite(value) for value in self.losses)


def recipe_args(method: str, device: torch.device, data_path: Path, sizes: Sizes, extra=()) -> argparse.Namespace:
    stage = METHODS[method].program_kind
    return parse_args(stage, ["--config", str(ROOT / "configs" / f"{RECIPES[method]}.yaml"), "--data_path",
                              str(data_path), "--output_dir", str(data_path / "runs" / method), "--device",
                              device.type, *sizes.training_flags, *sizes.method_flags.get(method, []), *extra])


def train(args: argparse.Namespace, train_set, device: torch.device, steps: int, warmup: int,
          deadline: float) -> Training:
    """`steps` training steps of the engine, from scratch, as train_one_epoch runs them."""
    reset_peak_memory(device)
    engine.seed_everything(args.seed)
    method = METHODS[args.method](args, DataInfo.of(train_set, args.mean, args.std), device).to(device)
    trainer = engine.Trainer(method, args, Context(0, 1, device), Path(args.output_dir), train_set,
                             kind=method.program_kind)
    pixels, labels = train_set.images.to(device), train_set.labels.to(device)
    trainer.model.train()
    losses, times, first, stopped = [], [], float("nan"), False
    for global_step in range(steps):
        if global_step > warmup and time.monotonic() > deadline:
            stopped = True
            break
        epoch, step = divmod(global_step, trainer.steps_per_epoch)
        if step == 0:
            method.on_epoch_start(epoch)
        indices, total, offset = trainer.batches.local_indices(epoch, step)
        with Clock(device) as clock:
            indices = indices.to(device, non_blocking=True)
            batch = Batch(pixels[indices], labels[indices], indices, total, offset)
            set_lr(trainer.optimizer, trainer.schedule(global_step))
            loss, _ = trainer.step(batch, Progress(epoch, step, global_step, trainer.steps_per_epoch))
            trainer.global_step += 1
            torch.isfinite(loss).item()
        losses.append(float(loss))
        if global_step == 0:
            first = clock.seconds
        if global_step >= warmup:
            times.append(clock.seconds)
    return Training(losses, times, first, args.batch_size, trainer.steps_per_epoch, trainer.precision,
                    peak_memory(device), stopped)


def crops_label(args) -> str:
    return " + ".join(f"{n}x{s or 32}" for n, s in zip(args.nmb_crops, args.size_crops))


def method_row(method: str, context: "Check"):
    args = recipe_args(method, context.device, context.data_path, context.sizes)
    sizes = context.sizes
    run = train(args, context.train_set(), context.device, sizes.method_steps, sizes.method_warmup, context.deadline)
    result = (f"{run.precision}, batch {run.batch}, crops {crops_label(args)}: {run.loss_summary()}; "
              f"{seconds(run.median_step)}/step ({run.batch / run.median_step:,.0f} img/s); first step "
              f"{seconds(run.first_step)}; {run.memory}" + ("; stopped early (budget)" if run.stopped_early else ""))
    return result, "ok" if run.finite else "FAILED: non-finite loss"


def swav_epoch_row(context: "Check", flag: str | None = None):
    """The eager run (flag None) sets the rate the --channels_last and --compile rows are compared with."""
    sizes = context.sizes
    batch = ["--batch_size", str(sizes.swav_batch)]
    args = recipe_args("swav", context.device, context.data_path, context.sizes, [*batch, *([flag] if flag else [])])
    run = train(args, context.train_set(), context.device, sizes.swav_warmup + sizes.swav_steps, sizes.swav_warmup,
                context.deadline)
    rate = run.batch / run.median_step
    epoch = run.steps_per_epoch * run.median_step
    # (the loop's epoch: its last, partial batch left out, 97 steps of 512 of CIFAR-10's 50,000 images)
    result = (f"{run.precision}, crops {crops_label(args)}: {rate:,.0f} img/s, epoch of {run.steps_per_epoch} steps "
              f"({run.steps_per_epoch * run.batch:,} of {sizes.train_images:,} images) {seconds(epoch)}; "
              f"{run.memory}; {run.loss_summary()}")
    if flag == "--compile":
        result += f"; compilation + first step {seconds(run.first_step)}"
    if flag is None:
        context.eager_rate = rate
    elif context.eager_rate:
        result += f"; x{rate / context.eager_rate:.2f} the eager rate"
    if run.stopped_early:
        result += "; stopped early (budget)"
    if not run.finite:
        return result, "FAILED: non-finite loss"
    return result, verdict(epoch, GOALS["epoch"], context.full_gpu)


# ---- (c): shared operations ------------------------------------------------------------------------------------------

def unit_rows(count: int, dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return F.normalize(torch.randn(count, dim, generator=generator), dim=1).to(device)


def sinkhorn_row(context: "Check"):
    sizes, device, generator = context.sizes, context.device, torch.Generator().manual_seed(0)
    scores = unit_rows(sizes.sinkhorn_rows, 128, generator, device) @ unit_rows(sizes.prototypes, 128, generator,
                                                                               device).t()
    times = timed(lambda: sinkhorn(scores, 0.05, 3), device, 20 * sizes.repeats, warmup=3)
    median = statistics.median(times)
    return f"{seconds(median)} (min {seconds(min(times))})", verdict(median, GOALS["sinkhorn"], context.full_gpu)


def sela_row(context: "Check"):
    sizes, device, generator = context.sizes, context.device, torch.Generator().manual_seed(0)
    logits = [torch.randn(sizes.sela_samples, sizes.sela_classes, generator=generator).to(device)
              for _ in range(sizes.sela_heads)]
    iterations = []

    def label_all_heads():
        iterations[:] = [sela_sinkhorn(x, 10.0, 0.01).iterations for x in logits]

    median = statistics.median(timed(label_all_heads, device, sizes.repeats))
    return (f"{seconds(median)} for {sizes.sela_heads} heads (float64; Sinkhorn iterations per head "
            f"{min(iterations)}-{max(iterations)})", verdict(median, GOALS["sela"], context.full_gpu))


def knn_row(context: "Check"):
    sizes, device, generator = context.sizes, context.device, torch.Generator().manual_seed(0)
    train_x = unit_rows(sizes.knn_train, 128, generator, device)
    test_x = unit_rows(sizes.knn_test, 128, generator, device)
    labels = torch.randint(10, (sizes.knn_train,), generator=generator).to(device)
    median = statistics.median(timed(lambda: knn_class_scores(train_x, labels, test_x, 10, 200, 0.1), device,
                                     sizes.repeats))
    return seconds(median), verdict(median, GOALS["knn"], context.full_gpu)


# ---- (d): multi-crop at ImageNet sizes -------------------------------------------------------------------------------

def imagenet_multicrop(sizes: Sizes) -> tuple[list[CropSpec], ColorSpec]:
    """SwAV's ImageNet pipeline: 2 global crops (scale 0.14-1) and 6 local ones (0.05-0.14), flip, colour
    distortion of strength 1 (jitter 0.8, 0.8, 0.8, 0.2 with p 0.8, greyscale 0.2) and Gaussian blur with p 0.5."""
    big, small = sizes.crop_sizes
    return ([CropSpec(2, big, 0.14, 1.0), CropSpec(6, small, 0.05, 0.14)],
            ColorSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, jitter_p=0.8, grey_p=0.2, blur_p=0.5))


def device_crops_row(context: "Check"):
    sizes, device = context.sizes, context.device
    crops, color = imagenet_multicrop(sizes)
    pipeline = MultiCrop(crops, color, IMAGENET_MEAN, IMAGENET_STD, sizes.crop_source, seed=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (sizes.crop_batch, 3, sizes.crop_source, sizes.crop_source), generator=generator,
                           dtype=torch.uint8).to(device)
    reset_peak_memory(device)
    median = statistics.median(timed(lambda: pipeline(images), device, sizes.repeats))
    # per thread on a CPU, where the row below times one thread: "replaces N cores" compares like with like
    context.device_crop_rate = sizes.crop_batch / median / (torch.get_num_threads() if device.type == "cpu" else 1)
    return (f"{sizes.crop_batch / median:,.0f} img/s (batch {sizes.crop_batch} of {sizes.crop_source}x"
            f"{sizes.crop_source} uint8 on {device.type}, {torch.get_num_threads()} thread(s); {peak_memory(device)})",
            "-")


def torchvision_pipeline(crops: list[CropSpec], color: ColorSpec, mean, std):
    """The same augmentation as torchvision transforms on one PIL image, crop by crop."""
    from torchvision import transforms

    def crop_transform(crop: CropSpec):
        # MultiCrop's widest kernel for this size (each image's own reaches ceil(3 sigma): only the tails differ)
        kernel = 2 * min(math.ceil(3 * color.blur_sigma[1]), crop.size - 1) + 1
        return transforms.Compose([
            transforms.RandomResizedCrop(crop.size, scale=(crop.min_scale, crop.max_scale)),
            transforms.RandomHorizontalFlip(color.flip_p),
            transforms.RandomApply([transforms.ColorJitter(color.brightness, color.contrast, color.saturation,
                                                           color.hue)], p=color.jitter_p),
            transforms.RandomGrayscale(color.grey_p),
            transforms.RandomApply([transforms.GaussianBlur(kernel, color.blur_sigma)], p=color.blur_p),
            transforms.ToTensor(),
            transforms.Normalize(mean, std)])

    per_crop = [crop_transform(crop) for crop in crops for _ in range(crop.count)]
    return lambda image: [transform(image) for transform in per_crop]


def torchvision_row(context: "Check"):
    from PIL import Image

    sizes = context.sizes
    crops, color = imagenet_multicrop(sizes)
    pipeline = torchvision_pipeline(crops, color, IMAGENET_MEAN, IMAGENET_STD)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (sizes.crop_source, sizes.crop_source, 3), dtype=np.uint8))
              for _ in range(sizes.torchvision_images + 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline(images[0])  # warm-up
        start = time.perf_counter()
        for image in images[1:]:
            pipeline(image)
        rate = sizes.torchvision_images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    result = f"{rate:,.1f} img/s on one core ({sizes.torchvision_images} images, {context.cpu_name})"
    if context.device_crop_rate:
        replaced = context.device_crop_rate / rate
        result += (f"; the {context.device.type} pipeline above replaces {replaced:,.1f} such cores"
                   + (" (per thread of it)" if context.device.type == "cpu" else ""))
    return result, "-"


# ---- the check -------------------------------------------------------------------------------------------------------

class Check:
    """What the rows share: device, sizes, the fabricated data (written on first use), the deadline."""

    def __init__(self, device: torch.device, sizes: Sizes, tiny: bool, workdir: Path, deadline: float):
        self.device, self.sizes, self.data_path, self.deadline = device, sizes, workdir, deadline
        self.full_gpu = device.type == "cuda" and not tiny
        self.cpu_name = cpu_name()
        self.eager_rate = None
        self.device_crop_rate = None
        self._train_set = None

    def train_set(self):
        if self._train_set is None:
            write_cifar10(self.data_path, self.sizes.train_images, self.sizes.train_images // 5)
            self._train_set = data.load("cifar10", "train", str(self.data_path))
        return self._train_set


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{torch.cuda.get_device_name(device)} ({properties.total_memory / 2**30:.0f} GiB)"
    return f"CPU: {cpu_name()} (torch uses {torch.get_num_threads()} thread(s))"


def software() -> str:
    text = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    return text


def planned_rows(context: Check, parts: set, skip_compile: bool) -> list[tuple]:
    """(part, check, goal, function) in the order they run: the compiled SwAV row last, as compilation is slowest."""
    sizes = context.sizes
    rows = []
    if "a" in parts:
        rows += [("a", f"{name} ({RECIPES.get(name, 'no CIFAR-10 recipe')}.yaml), {sizes.method_steps} steps",
                  "finite loss", lambda name=name: method_row(name, context)) for name in METHODS]
    epoch_goal = f"epoch <= {GOALS['epoch']:.0f} s"
    swav = f"SwAV CIFAR-10 (swav_cifar10.yaml), batch {sizes.swav_batch}"
    if "b" in parts:
        rows += [("b", f"{swav}, eager", epoch_goal, lambda: swav_epoch_row(context)),
                 ("b", f"{swav}, --channels_last", epoch_goal, lambda: swav_epoch_row(context, "--channels_last"))]
    if "c" in parts:
        rows += [("c", f"Sinkhorn, {sizes.sinkhorn_rows:,} x {sizes.prototypes:,} (batch + queue), 3 iterations",
                  "<= 1 ms", lambda: sinkhorn_row(context)),
                 ("c", f"SeLa labelling Sinkhorn, {sizes.sela_samples:,} x {sizes.sela_classes} x "
                       f"{sizes.sela_heads} heads, lambda 10, tolerance 0.01", "<= 1 s", lambda: sela_row(context)),
                 ("c", f"weighted kNN, {sizes.knn_test:,} x {sizes.knn_train:,}, d 128, k 200", "<= 1 s",
                  lambda: knn_row(context))]
    if "d" in parts:
        big, small = sizes.crop_sizes
        what = f"2x{big} + 6x{small} multi-crop, jitter, grey, blur"
        rows += [("d", f"{what}: MultiCrop on the device", "-", lambda: device_crops_row(context)),
                 ("d", f"{what}: torchvision per image, 1 CPU core", "-", lambda: torchvision_row(context))]
    if "b" in parts:
        rows.append(("b", f"{swav}, --compile", epoch_goal,
                     None if skip_compile else lambda: swav_epoch_row(context, "--compile")))
    return rows


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300].replace("|", "/")


def run_checks(context: Check, parts: set, skip_compile: bool, started: float) -> list[Row]:
    rows = [Row("-", "device", device_name(context.device)), Row("-", "software", software())]
    for part, check, goal, function in planned_rows(context, parts, skip_compile):
        if function is None:
            rows.append(Row(part, check, "skipped: --skip_compile", goal, "skipped"))
            continue
        if time.monotonic() > context.deadline:
            rows.append(Row(part, check, "skipped: the time budget was spent", goal, "skipped"))
            continue
        print(f"gpu_check: ({part}) {check} ...", file=sys.stderr, flush=True)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the methods' own messages; stdout is the table's
                result, outcome = function()
        except Exception as err:  # one failing row must not cost the others
            traceback.print_exc()
            if context.device.type == "cuda":
                torch.cuda.empty_cache()
            result, outcome = f"error: {one_line(err)}", "ERROR"
        rows.append(Row(part, check, result, goal, outcome))
    total = time.monotonic() - started
    rows.append(Row("-", "total wall time", seconds(total), "<= 8 min (full sizes)",
                    verdict(total, 480.0, context.full_gpu)))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| part | check | result | goal (H100-class GPU) | verdict |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.part} | {r.check} | {r.result} | {r.goal} | {r.verdict} |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_options(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0], prog="gpu_check.py")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (the default: without a visible card the check is refused, not run on the CPU)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes everywhere (the CPU test runs it so)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument("--budget_s", type=non_negative_float, default=480.0,
                        help="skip the rows that would start after this many seconds (and end training rows early)")
    parser.add_argument("--skip_compile", action="store_true",
                        help="leave out the --compile row (compiling takes minutes on a CPU, tiny sizes or not)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    options = parser.parse_args(argv)
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {options.device}: no CUDA device is visible to torch {torch.__version__} (CUDA "
                     f"{torch.version.cuda or 'not built in'}); --device cpu runs the check on the CPU")
    out = Path(options.out).absolute() if options.out else None
    if out and (out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK)):
        # refused before the minutes of the check, not after them
        parser.error(f"--out {options.out!r}: not a file this process can write (give a file in an existing, "
                     f"writable folder)")
    return options


def main(argv=None) -> int:
    options = parse_options(argv)
    started = time.monotonic()
    device = take_device(pick_device(options.device))  # cuda:0, cuDNN's autotuning on, as every training run has it
    command = shlex.join(["python", "bench/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        context = Check(device, TINY if options.tiny else FULL, options.tiny, Path(workdir),
                        started + options.budget_s)
        rows = run_checks(context, set(options.parts), options.skip_compile, started)
    text = f"`{command}`\n\n{table(rows)}"
    print(text, end="")
    if options.out:
        Path(options.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
