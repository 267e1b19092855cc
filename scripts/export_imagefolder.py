#!/usr/bin/env python
"""Write a registered dataset, or a class-balanced subset of its training split, as a PNG image folder.

    python scripts/export_imagefolder.py --dataset fashion_mnist --per_class 400 --seed 0 --out data/fm_4000
    python scripts/export_imagefolder.py --dataset fashion_mnist --count 8000 --out data/fm_8000
    python main_pretrain.py --config configs/swav_small.yaml --dataset imagefolder --data_path data/fm_4000 ...

The folder is what `--dataset imagefolder` reads: OUT/train/CLASS/INDEX.png and OUT/test/CLASS/INDEX.png. CLASS is
the label's number, zero-padded, then the class name made safe for a file name (`0_T-shirt_top` of ten classes), so the sorted
folders give the labels back in their order; INDEX is the image's position in its split of the registered dataset,
so each file says where it came from. `--per_class N` keeps N training images of every class, `--count N` N in all
(N // classes per class, one more for the first N % classes classes); which ones depends only on `--seed`. The
test split is written whole unless `--subset_test true`. OUT must not exist or be empty; an export cut short leaves
it empty. Pixels are written as the dataset serves them (digits' 0-16 scaled to 0-255 and rounded: 17 grey levels).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

from clusterlab import config
from clusterlab.errors import ConfigError, DataError, run_cli
from clusterlab.rundir import LOCK_NAME, RunLock


PARTIAL = ".partial-"  # the hidden folder an export writes into


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="export_imagefolder.py")
    parser.add_argument("--dataset", required=True, help="a registered dataset (clusterlab.data.registry.DATASETS)")
    parser.add_argument("--data_path", type=config.path, default=None,
                        help="where its files are (the dataset's default if unset)")
    parser.add_argument("--download", type=config.bool_flag, nargs="?", const=True, default=False,
                        help="download the dataset if missing")
    parser.add_argument("--out", type=config.path, required=True,
                        help="the image folder to write (must not exist or be empty)")
    parser.add_argument("--per_class", type=config.positive_int, default=None,
                        help="training images kept per class")
    parser.add_argument("--count", type=config.positive_int, default=None,
                        help="training images kept in all, spread evenly over the classes")
    parser.add_argument("--subset_test", type=config.bool_flag, default=False,
                        help="subset the test split the same way (default: written whole)")
    # numpy's generator takes no negative seed: it failed with a traceback once the dataset was loaded
    parser.add_argument("--seed", type=config.non_negative_int, default=0, help="which images a subset keeps")
    return parser


def class_folder_names(class_names: list) -> list[str]:
    """Folder names that sort in label order and hold no path separator."""
    width = len(str(len(class_names) - 1))
    return [f"{label:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', str(name)).strip('_') or 'class'}"
            for label, name in enumerate(class_names)]


def per_class_quota(num_classes: int, per_class: int | None, count: int | None) -> list[int] | None:
    """How many images each class keeps (None: all of them); Python integers, so that no count is too large to be
    compared with a class's size."""
    if per_class is not None and count is not None:
        raise ConfigError(f"--per_class {per_class} and --count {count} both given: choose one")
    if per_class is not None:
        return [per_class] * num_classes
    if count is not None:
        if count < num_classes:
            raise ConfigError(f"--count {count} is below the {num_classes} classes: give at least one per class")
        return [count // num_classes + (label < count % num_classes) for label in range(num_classes)]
    return None


def refuse_beyond_a_class(labels_by_split: dict, quota: list[int], class_names: list, per_class, count):
    """A ConfigError naming the flag, the first class of a split (of `labels_by_split`, those subset) that has fewer
    images than it asks for, and the largest value of the flag that every class of every such split can give (each
    class holds at least one image: checked before)."""
    sizes = {split: np.bincount(labels, minlength=len(quota)).tolist() for split, labels in labels_by_split.items()}
    short = next(((split, label) for split, counts in sizes.items() for label, wanted in enumerate(quota)
                  if wanted > counts[label]), None)
    if short is None:
        return
    if per_class is not None:
        flag, largest = "--per_class", min(min(counts) for counts in sizes.values())
    else:  # count // C each, one more for the first count % C classes: those must hold more than the smallest
        flag = "--count"
        largest = min(len(counts) * min(counts) + counts.index(min(counts)) for counts in sizes.values())
    split, label = short
    raise ConfigError(f"{flag} {per_class if per_class is not None else count} asks for {quota[label]} images of "
                      f"class {class_names[label]!r}, but the {split} split has only {sizes[split][label]}: give "
                      f"{flag} {largest} at most")


def balanced_subset(labels: np.ndarray, quota: list[int], seed: int) -> np.ndarray:
    """Sorted positions of quota[c] images of every class c, drawn without replacement from `seed`."""
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == label), size=wanted, replace=False)
              for label, wanted in enumerate(quota)]
    return np.sort(np.concatenate(chosen))


def main(argv=None):
    from clusterlab.data import DATASETS, load

    args = config.parse(get_args_parser(), argv)
    if args.dataset not in DATASETS or args.dataset == "imagefolder":
        choices = ", ".join(name for name in DATASETS if name != "imagefolder")
        raise ConfigError(f"--dataset {args.dataset!r} is not a dataset this script exports (choose one of: {choices})")
    out = Path(args.out)
    refuse_non_empty(out)
    splits = {split: load(args.dataset, split, args.data_path, args.download) for split in ("train", "test")}
    train = splits["train"]
    quota = per_class_quota(train.num_classes, args.per_class, args.count)
    folders = class_folder_names(train.class_names)
    # every subset is drawn (and refused) before anything is written
    for split, images in splits.items():  # a class folder left empty is refused by --dataset imagefolder
        absent = sorted(set(range(train.num_classes)) - set(images.labels.numpy().tolist()))
        if absent:
            raise DataError(f"the {split} split of {args.dataset} has no image of {len(absent)} class(es) (first: "
                            f"{train.class_names[absent[0]]!r}): an image folder needs every class in train/ and "
                            f"test/; complete the dataset's files")
    # (a subset keeps at least one image of every class: --count is at least the number of classes)
    subsets = [split for split in splits if quota is not None and (split == "train" or args.subset_test)]
    refuse_beyond_a_class({split: splits[split].labels.numpy() for split in subsets}, quota, train.class_names,
                          args.per_class, args.count)
    positions = {split: (balanced_subset(images.labels.numpy(), quota, args.seed) if split in subsets
                         else np.arange(len(images))) for split, images in splits.items()}
    # One export at a time into OUT: a second one took the first's hidden folder for a killed export's and removed
    # it, files of test/ with it, while the first went on and said it wrote them all.
    lock = RunLock(out, what="export folder", elsewhere=f"choose another --out (an export killed on another host "
                                                        f"leaves its lock: remove {str(out / LOCK_NAME)!r} then)")
    lock.acquire()
    try:
        refuse_non_empty(out)  # again, under the lock: an export may have ended in between
        for left in out.glob(f"{PARTIAL}*"):  # a killed export's hidden folder
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left)
            else:
                left.unlink()
        written = export(args, splits, positions, folders, out)
    finally:
        lock.release()
    print(f"wrote {written['train']} training and {written['test']} test images of {args.dataset} "
          f"({train.num_classes} classes) to {out}/")


def refuse_non_empty(out: Path) -> None:
    """OUT must not exist or be empty; what a killed export left (its hidden folder, cut short) and the lock of an
    export do not count."""
    if out.exists() and (not out.is_dir() or any(not path.name.startswith((PARTIAL, LOCK_NAME))
                                                 for path in out.iterdir())):
        raise ConfigError(f"--out {str(out)!r} exists and is not an empty folder (remove it or choose another)")


def export(args, splits: dict, positions: dict, folders: list[str], out: Path) -> dict:
    """Write the chosen images of every split, and export.json, into OUT; the images written per split."""
    # Written into a hidden folder inside OUT and moved up once whole: an export cut short (a full disk, Ctrl-C, a
    # TERM) leaves no train/ or test/ that `--dataset imagefolder` would read as a smaller dataset, and OUT empty
    # again; one killed outright leaves its hidden folder and its lock, which the next export removes (the lock of
    # an export killed on another host it cannot tell from a live one's: its message says so).
    partial = Path(tempfile.mkdtemp(prefix=PARTIAL, dir=out))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        written, kept = {}, {}
        for split, images in splits.items():
            chosen = images.subset(positions[split])
            written[split] = write_split(chosen, positions[split], partial / split, folders)
            kept[split] = np.bincount(chosen.labels.numpy(), minlength=images.num_classes).tolist()
        (partial / "export.json").write_text(json.dumps({
            "dataset": args.dataset, "per_class": args.per_class, "count": args.count, "subset_test": args.subset_test,
            "seed": args.seed, "images": written, "per_class_counts": kept, "classes": folders}) + "\n")
        for name in (*splits, "export.json"):
            os.replace(partial / name, out / name)
        partial.rmdir()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return written


def write_split(images, positions: np.ndarray, root: Path, folders: list[str]) -> int:
    """Every image of the in-memory set `images` as root/CLASS/POSITION.png, POSITION its index in the registered
    split (zero-padded so that names sort in that order); the number written."""
    from PIL import Image

    for folder in folders:
        (root / folder).mkdir(parents=True)
    digits = len(str(int(positions.max()))) if len(positions) else 1
    pixels = images.images.permute(0, 2, 3, 1).numpy()
    for position, image, label in zip(positions.tolist(), pixels, images.labels.tolist()):
        # (H, W, 1) becomes a mode-L file, (H, W, 3) an RGB one
        array = image[:, :, 0] if image.shape[-1] == 1 else image
        Image.fromarray(np.ascontiguousarray(array)).save(root / folders[label] / f"{position:0{digits}d}.png")
    return len(images)


def cli(argv=None):
    """main() as the command line runs it: a bad value, or a full disk, is one line on stderr (exit status 2)."""
    return run_cli(main, argv, output_flag="--out")


if __name__ == "__main__":
    sys.exit(cli())
