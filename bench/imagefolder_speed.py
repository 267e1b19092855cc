#!/usr/bin/env python
"""Image-folder loading speed: this suite's split pipeline against torchvision's per-image one, on synthetic JPEGs.

    python bench/imagefolder_speed.py [--images 10000 --measure 320 --baseline_measure 160 --batch 32 --device cpu]

Writes an ImageNet-like folder into a temporary directory (`--images` JPEGs of quality 90 in 10 class folders,
shorter side uniform in 200-500 px, aspect ratios 1, 4:3, 3:2, 16:9 either way; smooth random colour fields with
noise, so that they compress and decode like photographs) and measures, with SwAV's ImageNet multi-crop
(2 x 224 px at scale 0.14-1 and 6 x 96 px at scale 0.05-0.14), one thread each:

  (a) this suite's worker side, images per second in one process: what one loader worker does (decode, cut the
      8 RandomResizedCrops from boxes drawn as in training, resize them; files.FileSource);
  (b) torchvision's pipeline in one process: datasets.ImageFolder with a per-image multi-crop transform as SwAV's
      (per crop RandomResizedCrop, horizontal flip, ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8, greyscale p 0.2,
      PIL Gaussian blur p 0.5 with radius 0.1-2, ToTensor, Normalize) collated into batches by a DataLoader;
  (c) this suite's device side on `--device`: flips, colour jitter, greyscale, blur and normalisation of the crops
      (a) cut, images per second (MultiCrop on CutCrops).

(a) and (b) read different files (each its first files of the folder), all of them just written, so both find
them in the page cache; each side's first batch is a warm-up, not timed. Prints one Markdown table, the ratio a / b
(what a GPU job asks of its CPU cores, against the standard pipeline), and on a CPU the rate of (a) and (c) in one
process, which is what a job without a GPU gets.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from clusterlab.config import OneLineErrorParser, positive_int
from clusterlab.data import registry
from clusterlab.data.augment import ColorSpec, CropSpec, CutCrops, MultiCrop
from clusterlab.data.files import CropJob, FileSource
from machine import cpu_name

SWAV_CROPS = [CropSpec(2, 224, 0.14, 1.0), CropSpec(6, 96, 0.05, 0.14)]
SWAV_COLOR = ColorSpec(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, jitter_p=0.8, grey_p=0.2, blur_p=0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16)


def write_folder(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(count):
        shorter, aspect = int(rng.integers(200, 501)), ASPECTS[i % len(ASPECTS)]
        width, height = (round(shorter * aspect), shorter) if aspect >= 1 else (shorter, round(shorter / aspect))
        field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((width, height),
                                                                                      Image.BICUBIC)
        noisy = np.asarray(field, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
        folder = root / "train" / f"class_{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


class RandomPilBlur:
    """SwAV-style blur: with probability p, PIL's Gaussian blur of a radius drawn from U(low, high)."""

    def __init__(self, p=0.5, low=0.1, high=2.0):
        self.p, self.low, self.high = p, low, high

    def __call__(self, image):
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.low, self.high)))


def torchvision_multicrop():
    from torchvision import transforms

    def one(size, scale):
        return transforms.Compose([
            transforms.RandomResizedCrop(size, scale=scale), transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            transforms.RandomGrayscale(p=0.2), RandomPilBlur(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    views = [one(c.size, (c.min_scale, c.max_scale)) for c in SWAV_CROPS for _ in range(c.count)]
    return lambda image: [view(image) for view in views]


def suite_worker_side(data, augment: MultiCrop, measure: int, batch: int) -> tuple[float, list]:
    """Images per second of FileSource over the first `measure` files, and the results (for the device side)."""
    source = FileSource(data.files, data.labels, data.channels)
    results = []
    for first in range(0, measure, batch):
        if first == batch:  # after the warm-up batch
            start = time.perf_counter()
        params = augment.sample(batch)
        uniforms = torch.stack([p.uniforms for p in params], dim=1).numpy()
        job = CropJob(0, np.arange(first, first + batch), uniforms, tuple(augment.each_crop))
        results.append((source[job], params))
    return (measure - batch) / (time.perf_counter() - start), results


def torchvision_side(root: Path, skip: int, measure: int, batch: int) -> float:
    from torchvision import datasets

    dataset = datasets.ImageFolder(str(root / "train"), transform=torchvision_multicrop())
    subset = torch.utils.data.Subset(dataset, range(skip, skip + measure))
    loader = iter(torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=0))
    next(loader)  # warm-up
    start = time.perf_counter()
    for _ in loader:
        pass
    return (measure - batch) / (time.perf_counter() - start)


def suite_device_side(augment: MultiCrop, results: list, device: torch.device) -> tuple[float, int]:
    """Images per second of the device side over the batches (a) cut, after one batch of warm-up; and how many."""
    cut = [CutCrops([c.to(device) for c in result["crops"]], params, augment.generator.get_state())
           for result, params in results]
    augment(cut[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for crops in cut[1:]:
        outputs = augment(crops)
        images += len(outputs[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start), images


def main():
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive_int, default=10_000,
                        help="JPEGs written (at least 10,000 for the record)")
    parser.add_argument("--measure", type=positive_int, default=320, help="images through (a) (and (c))")
    parser.add_argument("--baseline_measure", type=positive_int, default=160,
                        help="images through (b), the first batch a warm-up")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    for flag in ("measure", "baseline_measure"):
        if getattr(args, flag) < 2 * args.batch:
            parser.error(f"--{flag} {getattr(args, flag)} must be at least two batches of --batch {args.batch} "
                         f"(the first is a warm-up)")
    if args.measure % args.batch:
        parser.error(f"--measure {args.measure} must be a multiple of --batch {args.batch}, at least two batches "
                     f"(whole batches go through (a); (c) times all but the first)")
    if args.images < args.measure + args.baseline_measure:
        parser.error(f"--images {args.images} is fewer than --measure + --baseline_measure = "
                     f"{args.measure + args.baseline_measure}: (a) and (b) read files of their own")
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here (use cpu)")
    with tempfile.TemporaryDirectory(prefix="imagefolder_speed_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_folder(root, args.images)
        written = time.perf_counter() - start
        (root / "val").symlink_to(root / "train")
        data = registry.load("imagefolder", "train", str(root))
        augment = MultiCrop(SWAV_CROPS, SWAV_COLOR, IMAGENET_MEAN, IMAGENET_STD, data.image_size, seed=0)
        worker_rate, results = suite_worker_side(data, augment, args.measure, args.batch)
        baseline_rate = torchvision_side(root, args.measure, args.baseline_measure, args.batch)
        device_rate, device_images = suite_device_side(augment, results, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{args.images:,} JPEGs written in {written:.0f} s; crops 2x224 + 6x96; batch {args.batch}; one thread")
    print()
    print("| pipeline | where | images | img/s |")
    print("| --- | --- | --- | --- |")
    print(f"| (a) clusterlab worker side: decode, cut and resize 8 crops | one CPU process | "
          f"{args.measure - args.batch} | {worker_rate:.1f} |")
    print(f"| (b) torchvision ImageFolder + per-image SwAV multi-crop, all on the CPU | one CPU process | "
          f"{args.baseline_measure - args.batch} | {baseline_rate:.1f} |")
    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"| (c) clusterlab device side: flip, colour, grey, blur, normalise | {device} ({name}{threads}) | "
          f"{device_images} | {device_rate:.1f} |")
    print()
    print(f"a / b = {worker_rate / baseline_rate:.2f}: the CPU work of a GPU job, against the standard pipeline")
    if device.type == "cpu":
        both = 1 / (1 / worker_rate + 1 / device_rate)
        print(f"(a) then (c) in one CPU process (a job without a GPU does both): {both:.1f} img/s, "
              f"{both / baseline_rate:.2f} x (b)")


if __name__ == "__main__":
    main()
