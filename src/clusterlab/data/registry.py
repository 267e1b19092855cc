"""The datasets, by name: each gives labelled splits held as uint8 (N, C, H, W) tensors (or image files).

| name          | splits                              | classes | size  | where the files are                                |
| ------------- | ----------------------------------- | ------- | ----- | -------------------------------------------------- |
| digits        | train, test (stratified 50/50)      | 10      | 8x8   | inside scikit-learn                                |
| fashion_mnist | train (60k), test (10k)             | 10      | 28x28 | IDX .gz, default /usr/share/datasets/fashion-mnist |
| cifar10       | train (50k), test (10k)             | 10      | 32x32 | cifar-10-batches-py/ (python pickles)              |
| cifar100      | train, test (fine labels; coarse)   | 100     | 32x32 | cifar-100-python/                                  |
| cifar100_20   | train, test (the 20 coarse labels)  | 20      | 32x32 | cifar-100-python/ (coarse_labels of the pickle)    |
| stl10         | train, test, unlabeled, train+unlabeled | 10  | 96x96 | stl10_binary/                                      |
| imagefolder   | train/, val/ (class sub-folders)    | folders | first image | DATA_PATH/{train,val}/CLASS/*.png|jpg        |

Nothing is downloaded unless the user passes `--download`; then rank 0 fetches the files through torchvision and
the other ranks wait at a barrier.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import distributed
from ..errors import DataError
from .formats import (read_cifar, read_cifar_meta, read_idx, read_stl10_images, read_stl10_labels)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# The constants the upstream CIFAR recipes normalise with (seeds spec 7.6).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)


@dataclass
class ImageSet:
    """One split of a dataset. `images` is uint8 (N, C, H, W); file-backed sets have `files` instead."""

    name: str
    split: str
    labels: torch.Tensor
    num_classes: int
    channels: int
    image_size: int
    mean: tuple
    std: tuple
    class_names: list
    images: torch.Tensor | None = None
    files: list | None = None
    superclass_labels: torch.Tensor | None = None
    superclass_names: list | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, indices) -> "ImageSet":
        indices = torch.as_tensor(indices, dtype=torch.long)
        return replace(
            self,
            labels=self.labels[indices],
            images=None if self.images is None else self.images[indices],
            files=None if self.files is None else [self.files[i] for i in indices.tolist()],
            superclass_labels=None if self.superclass_labels is None else self.superclass_labels[indices],
        )


@dataclass(frozen=True)
class Fetcher:
    """The torchvision dataset class that downloads a dataset's files, and its constructor arguments for each part
    (torchvision fetches the whole archive, test split included, for the first part of CIFAR and STL-10)."""
    torchvision_class: str
    parts: tuple = ({},)

    def fetch(self, path: Path, download: bool) -> None:
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, self.torchvision_class)
        for kwargs in self.parts:
            dataset_class(str(path), download=download, **kwargs)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    splits: tuple
    loader: Callable[[Path, str], ImageSet]
    default_path: str | None = None
    fetcher: Fetcher | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _stats(images: np.ndarray) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale.

    From each channel's 256-bin histogram: a float64 copy of the images would take 8x their size (2.2 GB for the
    10,000 STL-10 images the statistics use).
    """
    values = np.arange(256) / 255.0
    # torch.bincount counts uint8 directly (np.bincount would first make an int64 copy).
    counts = np.stack([torch.bincount(torch.from_numpy(np.ascontiguousarray(images[:, c])).flatten(), minlength=256)
                       .numpy() for c in range(images.shape[1])]).astype(np.float64)
    mean = counts @ values / counts.sum(1)
    std = np.sqrt((counts * (values[None] - mean[:, None]) ** 2).sum(1) / counts.sum(1))
    return tuple(mean.round(4).tolist()), tuple(std.round(4).tolist())


def _tensor_set(name, split, images, labels, class_names, mean, std, **extra) -> ImageSet:
    images = np.ascontiguousarray(images)
    return ImageSet(name=name, split=split, labels=torch.as_tensor(np.asarray(labels), dtype=torch.long),
                    num_classes=len(class_names), channels=images.shape[1], image_size=images.shape[-1],
                    mean=tuple(mean), std=tuple(std), class_names=list(class_names),
                    images=torch.from_numpy(images), **extra)


# ---- digits --------------------------------------------------------------------------------------------------------

def _digits_arrays():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    idx_train, idx_test = train_test_split(np.arange(len(images)), test_size=0.5, stratify=digits.target,
                                           random_state=0)
    return images, digits.target.astype(np.int64), {"train": np.sort(idx_train), "test": np.sort(idx_test)}


def load_digits_split(path: Path, split: str) -> ImageSet:
    images, labels, splits = _digits_arrays()
    mean, std = _stats(images[splits["train"]])
    pick = splits[split]
    return _tensor_set("digits", split, images[pick], labels[pick], [str(d) for d in range(10)], mean, std)


# ---- Fashion-MNIST -------------------------------------------------------------------------------------------------

def _fashion_file(path: Path, stem: str) -> Path:
    for candidate in (path / f"{stem}.gz", path / stem, path / "FashionMNIST" / "raw" / f"{stem}.gz",
                      path / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    raise DataError(f"dataset 'fashion_mnist': no {stem}.gz under {str(path)!r} (install Debian's "
                    f"dataset-fashion-mnist, pass --data_path DIR with the four IDX .gz files, or --download)")


def load_fashion_mnist(path: Path, split: str) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    images_file = _fashion_file(path, f"{prefix}-images-idx3-ubyte")
    labels_file = _fashion_file(path, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_file), read_idx(labels_file).astype(np.int64)
    if images.ndim != 3:
        raise DataError(f"IDX file {str(images_file)!r} holds an array of shape {images.shape}, expected (N, H, W)")
    if labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"IDX file {str(labels_file)!r} holds labels of shape {labels.shape} for {len(images)} images "
                        f"in {str(images_file)!r}")
    train_images = images if split == "train" else read_idx(_fashion_file(path, "train-images-idx3-ubyte"))
    mean, std = _stats(train_images[:, None])
    return _tensor_set("fashion_mnist", split, images[:, None], labels, FASHION_MNIST_CLASSES, mean, std)


# ---- CIFAR ---------------------------------------------------------------------------------------------------------

def _cifar_folder(path: Path, inner: str, probe: str, label: str) -> Path:
    for candidate in (path / inner, path):
        if (candidate / probe).is_file():
            return candidate
    raise DataError(f"dataset {label!r}: no {inner}/{probe} under {str(path)!r} (pass --data_path DIR holding "
                    f"{inner}/, or --download)")


def load_cifar10(path: Path, split: str) -> ImageSet:
    folder = _cifar_folder(path, "cifar-10-batches-py", "test_batch", "cifar10")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = read_cifar(folder, files, ("labels",))
    names = read_cifar_meta(folder / "batches.meta", "label_names") or [str(i) for i in range(10)]
    return _tensor_set("cifar10", split, images, labels["labels"], names, CIFAR10_MEAN, CIFAR10_STD)


def _load_cifar100(path: Path, split: str, coarse: bool) -> ImageSet:
    name = "cifar100_20" if coarse else "cifar100"
    folder = _cifar_folder(path, "cifar-100-python", "test", name)
    images, labels = read_cifar(folder, ["train" if split == "train" else "test"], ("fine_labels", "coarse_labels"))
    fine_names = read_cifar_meta(folder / "meta", "fine_label_names") or [str(i) for i in range(100)]
    coarse_names = read_cifar_meta(folder / "meta", "coarse_label_names") or [str(i) for i in range(20)]
    if coarse:
        return _tensor_set(name, split, images, labels["coarse_labels"], coarse_names, CIFAR100_MEAN, CIFAR100_STD)
    return _tensor_set(name, split, images, labels["fine_labels"], fine_names, CIFAR100_MEAN, CIFAR100_STD,
                       superclass_labels=torch.from_numpy(labels["coarse_labels"]), superclass_names=coarse_names)


def load_cifar100(path: Path, split: str) -> ImageSet:
    return _load_cifar100(path, split, coarse=False)


def load_cifar100_20(path: Path, split: str) -> ImageSet:
    return _load_cifar100(path, split, coarse=True)


# ---- STL-10 --------------------------------------------------------------------------------------------------------

def _stl10_folder(path: Path) -> Path:
    for candidate in (path / "stl10_binary", path):
        if (candidate / "test_X.bin").is_file() or (candidate / "unlabeled_X.bin").is_file():
            return candidate
    raise DataError(f"dataset 'stl10': no stl10_binary/ under {str(path)!r} (pass --data_path or --download)")


def load_stl10(path: Path, split: str) -> ImageSet:
    folder = _stl10_folder(path)
    parts = split.split("+")
    images, labels = [], []
    for part in parts:
        x = read_stl10_images(folder / f"{part}_X.bin")
        y = (np.full(len(x), -1, dtype=np.int64) if part == "unlabeled"
             else read_stl10_labels(folder / f"{part}_y.bin", len(x)))
        images.append(x)
        labels.append(y)
    names_file = folder / "class_names.txt"
    names = names_file.read_text().split() if names_file.is_file() else [str(i) for i in range(10)]
    images = np.concatenate(images)
    stats_source = images if split != "test" else read_stl10_images(folder / "train_X.bin")
    mean, std = _stats(stats_source[:10000])
    return _tensor_set("stl10", split, images, np.concatenate(labels), names, mean, std)


# ---- image folders -------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def _folder_split(path: Path, split: str) -> Path:
    names = {"train": ("train",), "test": ("val", "test")}[split]
    for name in names:
        if (path / name).is_dir():
            return path / name
    raise DataError(f"dataset 'imagefolder': no {' or '.join(names)}/ folder under {str(path)!r} "
                    f"(expected DATA_PATH/train/CLASS/*.png and DATA_PATH/val/CLASS/*.png)")


def load_imagefolder(path: Path, split: str) -> ImageSet:
    from PIL import Image

    train_root = _folder_split(path, "train")
    classes = sorted(d.name for d in train_root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"dataset 'imagefolder': {str(train_root)!r} has no class sub-folders")
    root = _folder_split(path, split)
    files, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += [str(p) for p in found]
            labels += [label] * len(found)
    if not files:
        raise DataError(f"dataset 'imagefolder': no images under {str(root)!r}")
    train_files = sorted(str(p) for p in train_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not train_files:
        raise DataError(f"dataset 'imagefolder': no images under {str(train_root)!r}")
    with Image.open(train_files[0]) as probe:
        # Grey with an alpha channel (LA) is still grey: convert("L") drops the alpha.
        channels = 1 if probe.mode in ("L", "LA", "I", "I;16", "1", "F") else 3
        size = min(probe.size)
    # Up to 2000 files spread evenly over the sorted list: its first 2000 would be the first class or two only.
    count = min(2000, len(train_files))
    sample = FileImages([train_files[i * len(train_files) // count] for i in range(count)], size, channels)
    mean, std = _stats(np.stack([sample[i].numpy() for i in range(len(sample))]))
    return ImageSet(name="imagefolder", split=split, labels=torch.tensor(labels, dtype=torch.long),
                    num_classes=len(classes), channels=channels, image_size=size, mean=mean, std=std,
                    class_names=classes, files=files)


class FileImages(torch.utils.data.Dataset):
    """Decode image files to uint8 (C, size, size): shorter side resized to `size`, then centre-cropped."""

    def __init__(self, files: list, size: int, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[index]) as img:
            img = img.convert("L" if self.channels == 1 else "RGB")
            if img.size != (self.size, self.size):
                scale = self.size / min(img.size)
                img = img.resize((max(self.size, round(img.size[0] * scale)),
                                  max(self.size, round(img.size[1] * scale))), Image.BILINEAR)
                left, top = (img.size[0] - self.size) // 2, (img.size[1] - self.size) // 2
                img = img.crop((left, top, left + self.size, top + self.size))
            # np.array copies: np.asarray of a PIL image is read-only, which torch.from_numpy warns about.
            array = np.array(img, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array))


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", ("train", "test"), load_digits_split),
    "fashion_mnist": DatasetSpec("fashion_mnist", ("train", "test"), load_fashion_mnist,
                                 default_path=FASHION_MNIST_DIR,
                                 fetcher=Fetcher("FashionMNIST", ({"train": True}, {"train": False}))),
    "cifar10": DatasetSpec("cifar10", ("train", "test"), load_cifar10, fetcher=Fetcher("CIFAR10")),
    "cifar100": DatasetSpec("cifar100", ("train", "test"), load_cifar100, fetcher=Fetcher("CIFAR100")),
    "cifar100_20": DatasetSpec("cifar100_20", ("train", "test"), load_cifar100_20, fetcher=Fetcher("CIFAR100")),
    "stl10": DatasetSpec("stl10", ("train", "test", "unlabeled", "train+unlabeled"), load_stl10,
                         fetcher=Fetcher("STL10", ({"split": "train"},))),
    "imagefolder": DatasetSpec("imagefolder", ("train", "test"), load_imagefolder),
}


def resolve_path(name: str, data_path: str | None) -> Path:
    spec = DATASETS[name]
    chosen = data_path or spec.default_path or os.environ.get("DATASET_PATH") or "data"
    return Path(chosen).expanduser()


def load(name: str, split: str, data_path: str | None = None, download: bool = False) -> ImageSet:
    """Load one split of a registered dataset (errors are DataError with one line naming the bad value)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (choose one of: {', '.join(DATASETS)})")
    spec = DATASETS[name]
    if split not in spec.splits:
        raise DataError(f"dataset {name!r} has no split {split!r} (choose one of: {', '.join(spec.splits)})")
    path = resolve_path(name, data_path)
    if name != "digits" and not path.exists() and not download:
        raise DataError(f"dataset {name!r}: data path {str(path)!r} does not exist (pass --data_path DIR, or "
                        f"--download to fetch it)")
    if download:
        if spec.fetcher is None:
            raise DataError(f"dataset {name!r} cannot be downloaded (it ships locally or is your own folder)")
        if distributed.rank() == 0:
            path.mkdir(parents=True, exist_ok=True)
            spec.fetcher.fetch(path, download)
        distributed.barrier()
    return spec.loader(path, split)
