"""The datasets, by name: each gives labelled splits held as uint8 (N, C, H, W) tensors (or image files).

| name          | splits                              | classes | size  | where the files are                                |
| ------------- | ----------------------------------- | ------- | ----- | -------------------------------------------------- |
| digits        | train, test (stratified 50/50)      | 10      | 8x8   | inside scikit-learn                                |
| fashion_mnist | train (60k), test (10k)             | 10      | 28x28 | IDX .gz, default /usr/share/datasets/fashion-mnist |
| cifar10       | train (50k), test (10k)             | 10      | 32x32 | cifar-10-batches-py/ (python pickles)              |
| cifar100      | train, test (fine labels; coarse)   | 100     | 32x32 | cifar-100-python/                                  |
| cifar100_20   | train, test (the 20 coarse labels)  | 20      | 32x32 | cifar-100-python/ (coarse_labels of the pickle)    |
| stl10         | train, test, unlabeled, train+unlabeled | 10  | 96x96 | stl10_binary/                                      |
| imagefolder   | train/, val/ (class sub-folders)    | folders | each its own | DATA_PATH/{train,val}/CLASS/**/*.jpg|png... |

Nothing is downloaded unless the user passes `--download`; then rank 0 fetches the files through torchvision and
the other ranks wait at a barrier.

Image folders stay on disk: the set holds the sorted file paths and their labels (class = sub-folder of train/,
searched recursively as torchvision's ImageFolder does), and the loader workers decode each image at its own size
(files.py). Loading lists the folders and reads up to STATS_SAMPLE training files spread evenly over the list: their
pixels give the normalisation statistics (a large JPEG's from a reduced decode), their modes the channels (1 when
every one of them is grey, else 3: a grey file in a colour set is converted to RGB and vice versa) and their median
shorter side the set's nominal `image_size` (the crop size that `--size_crops 0` stands for; no image is resized to
it). Nothing else is read ahead and nothing is written into the data folder. A class folder without images, train/ and
val/ with different class folders, or a sample of which no file is readable is a DataError.
"""
from __future__ import annotations

import hashlib
import os
import re
import statistics
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import distributed
from ..errors import DataError, one_line
from .files import GREY_MODES, Unreadable, decode, draft_reduction, open_image
from .formats import (STL10_SIZE, read_cifar, read_cifar_meta, read_idx, read_stl10_images, read_stl10_labels,
                      stl10_image_count)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# The constants the upstream CIFAR recipes normalise with: CIFAR-10's in Un-Mix/SwAV pre-training, NPID, SeLa,
# Super-AND and EmbedUL (and for CIFAR-100 in Un-Mix and SeLa); CIFAR-100's in Super-AND and EmbedUL.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)


@dataclass
class ImageSet:
    """One split of a dataset. `images` is uint8 (N, C, H, W); file-backed sets have `files` instead, and their
    `image_size` is nominal (the median shorter side of a sample): each image keeps its own size.

    `cache` keeps what the loaders build from the set once and reuse (its copy on the training device, its training
    loader's worker processes); a subset starts with an empty one.
    """

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
    folder: str | None = None  # an image folder's DATA_PATH: metrics records name the folder (eval.features)
    superclass_labels: torch.Tensor | None = None
    superclass_names: list | None = None
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    @property
    def split_name(self) -> str:
        """The split as its files name it: an image folder's test split is its val/ folder (else test/)."""
        found = _folder_split(Path(self.folder), self.split) if self.folder is not None else None
        return found.name if found is not None else self.split

    @property
    def fingerprint(self) -> str:
        """A digest of the set's labels and, for image files, their paths below the folder, in dataset order: what
        each position means. A checkpoint keeps it, so that a run is not resumed on images added, removed, renamed
        or relabelled since (memory banks and pseudo-labels are indexed by position)."""
        digest = hashlib.sha256(self.labels.numpy().astype("<i8").tobytes())
        if self.files is not None:
            prefix = os.path.join(self.folder or "", "")
            relative = (path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, self.folder or "")
                        for path in self.files)
            # the names' bytes: a name that is not UTF-8 (a surrogate escape in Python) hashes too
            digest.update(b"\n".join(os.fsencode(path) for path in relative))
        return digest.hexdigest()[:16]

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
    same_images_as: str | None = None  # another dataset's images, in its order, under other labels
    reads_files: bool = True  # read from --data_path (digits ship inside scikit-learn)


def same_images(first: str, second: str) -> bool:
    """Whether two datasets hold the same images in the same order (cifar100_20 labels cifar100's otherwise): a
    run trained on one and used on the other is no transfer."""
    return _image_source(first) == _image_source(second)


def _image_source(name: str) -> str:
    spec = DATASETS.get(name)
    return spec.same_images_as if spec is not None and spec.same_images_as else name


def _histograms(images: np.ndarray) -> np.ndarray:
    """Per-channel 256-bin histograms (C, 256) of uint8 images (N, C, H, W)."""
    # torch.bincount counts uint8 directly (np.bincount would first make an int64 copy).
    return np.stack([torch.bincount(torch.from_numpy(np.ascontiguousarray(images[:, c])).flatten(), minlength=256)
                     .numpy() for c in range(images.shape[1])]).astype(np.float64)


def _stats(images: np.ndarray) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    return _histogram_stats(_histograms(images))


def _histogram_stats(counts: np.ndarray) -> tuple[tuple, tuple]:
    """Mean and std per channel from 256-bin histograms: a float64 copy of the images would take 8x their size
    (2.2 GB for the 10,000 STL-10 images the statistics use)."""
    values = np.arange(256) / 255.0
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


def _idx_bytes(file: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (type 0x08), as Fashion-MNIST's are: other types loaded, and then failed in the
    statistics with a traceback (big-endian integers) or became int32 or float images."""
    array = read_idx(file)
    if array.dtype != np.uint8:
        raise DataError(f"IDX file {str(file)!r} holds {array.dtype} values, expected unsigned bytes (IDX type 0x08)")
    return array


def load_fashion_mnist(path: Path, split: str) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    images_file = _fashion_file(path, f"{prefix}-images-idx3-ubyte")
    labels_file = _fashion_file(path, f"{prefix}-labels-idx1-ubyte")
    images, labels = _idx_bytes(images_file), _idx_bytes(labels_file)
    if images.ndim != 3 or not len(images):
        raise DataError(f"IDX file {str(images_file)!r} holds an array of shape {images.shape}, expected (N, H, W) "
                        f"with N > 0 images")
    if labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"IDX file {str(labels_file)!r} holds labels of shape {labels.shape} for {len(images)} images "
                        f"in {str(images_file)!r}")
    # A label past the classes loaded, and failed later (kNN's votes) with a traceback or not at all.
    if labels.max(initial=0) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"IDX file {str(labels_file)!r} holds label {labels.max()}, expected 0..9")
    labels = labels.astype(np.int64)
    train_images = images if split == "train" else _idx_bytes(_fashion_file(path, "train-images-idx3-ubyte"))
    mean, std = _stats(train_images[:, None])
    return _tensor_set("fashion_mnist", split, images[:, None], labels, FASHION_MNIST_CLASSES, mean, std)


# ---- CIFAR ---------------------------------------------------------------------------------------------------------

def _cifar_folder(path: Path, inner: str, probe: str, label: str) -> Path:
    for candidate in (path / inner, path):
        if (candidate / probe).is_file():
            return candidate
    raise DataError(f"dataset {label!r}: no {inner}/{probe} under {str(path)!r} (pass --data_path DIR holding "
                    f"{inner}/, or --download)")


def _meta_names(path: Path, key: str, count: int) -> list:
    """The `count` class names a CIFAR meta file lists under `key` (numbers where it has none)."""
    names = read_cifar_meta(path, key)
    if names is None:
        return [str(i) for i in range(count)]
    # The names give the number of classes: another count made a set whose labels lie outside its classes.
    if len(names) != count:
        raise DataError(f"CIFAR meta file {str(path)!r} lists {len(names)} {key}, expected {count}")
    return names


def load_cifar10(path: Path, split: str) -> ImageSet:
    folder = _cifar_folder(path, "cifar-10-batches-py", "test_batch", "cifar10")
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = read_cifar(folder, files, {"labels": 10})
    names = _meta_names(folder / "batches.meta", "label_names", 10)
    return _tensor_set("cifar10", split, images, labels["labels"], names, CIFAR10_MEAN, CIFAR10_STD)


def _load_cifar100(path: Path, split: str, coarse: bool) -> ImageSet:
    name = "cifar100_20" if coarse else "cifar100"
    folder = _cifar_folder(path, "cifar-100-python", "test", name)
    file = "train" if split == "train" else "test"
    images, labels = read_cifar(folder, [file], {"fine_labels": 100, "coarse_labels": 20})
    fine_labels, coarse_labels = labels["fine_labels"], labels["coarse_labels"]
    # Each fine class lies in one superclass: the superclass view (eval.metrics) maps fine classes to superclasses
    # through these labels, and a fine class with two would have been scored by whichever came last.
    superclass = np.zeros(100, dtype=np.int64)
    superclass[fine_labels] = coarse_labels
    mixed = np.flatnonzero(superclass[fine_labels] != coarse_labels)
    if len(mixed):
        label = fine_labels[mixed[0]]
        raise DataError(f"CIFAR batch {str(folder / file)!r}: fine label {label} has coarse labels "
                        f"{sorted(set(coarse_labels[fine_labels == label].tolist()))}; each fine class needs one "
                        f"coarse label")
    fine_names = _meta_names(folder / "meta", "fine_label_names", 100)
    coarse_names = _meta_names(folder / "meta", "coarse_label_names", 20)
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
        if any((candidate / f"{split}_X.bin").is_file() for split in ("train", "test", "unlabeled")):
            return candidate
    raise DataError(f"dataset 'stl10': no stl10_binary/ under {str(path)!r} (pass --data_path or --download)")


def load_stl10(path: Path, split: str) -> ImageSet:
    folder = _stl10_folder(path)
    names_file = folder / "class_names.txt"
    # One name a line, as torchvision reads it (a name may hold a space); the names give the number of classes.
    try:
        text = names_file.read_text() if names_file.is_file() else "\n".join(str(i) for i in range(10))
    except UnicodeDecodeError:
        raise DataError(f"STL-10 file {str(names_file)!r} is not text (expected 10 class names, one a line)") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != 10:
        raise DataError(f"STL-10 file {str(names_file)!r} lists {len(names)} class names, expected 10 (one a line)")
    parts = split.split("+")
    counts = [stl10_image_count(folder / f"{part}_X.bin") for part in parts]
    images = np.empty((sum(counts), 3, STL10_SIZE, STL10_SIZE), dtype=np.uint8)  # filled in place: one copy in memory
    labels, start = [], 0
    for part, count in zip(parts, counts):
        read_stl10_images(folder / f"{part}_X.bin", images[start:start + count])
        start += count
        labels.append(np.full(count, -1, dtype=np.int64) if part == "unlabeled"
                      else read_stl10_labels(folder / f"{part}_y.bin", count))
    # the statistics of the loaded split's first 10,000 images (the train split's for the test split)
    stats_source = images
    if split == "test":
        stats_count = min(10000, stl10_image_count(folder / "train_X.bin"))
        stats_source = read_stl10_images(folder / "train_X.bin", np.empty((stats_count, *images.shape[1:]), np.uint8))
    mean, std = _stats(stats_source[:10000])
    return _tensor_set("stl10", split, images, np.concatenate(labels), names, mean, std)


# ---- image folders -------------------------------------------------------------------------------------------------

# Images in formats torchvision's ImageFolder does not list (nor this loader): left out, as there, but with a note.
UNLISTED_IMAGE_SUFFIXES = (".gif", ".jfif", ".jpe", ".heic", ".heif", ".avif", ".jp2", ".ico", ".tga", ".psd")
# A name that ends as a file's of some kind does (.txt, .json, .npy), not as a folder's usually does (2019.05, v1.2).
FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
STATS_SAMPLE = 2000


def _folder_split(path: Path, split: str) -> Path | None:
    """DATA_PATH/train, or DATA_PATH/val (else test) for the test split; None when absent."""
    names = {"train": ("train",), "test": ("val", "test")}[split]
    found = [path / name for name in names if (path / name).is_dir()]
    if len(found) > 1:
        _note_once(f"note: {str(path)!r} has both val/ and test/: the evaluations use val/ (test/ is left out)")
    return found[0] if found else None


def _named(folders: list, shown: int = 3) -> str:
    """The first `shown` names, quoted (a name's trailing space shows), and how many more."""
    more = f" and {len(folders) - shown} more" if len(folders) > shown else ""
    return ", ".join(repr(str(folder)) for folder in folders[:shown]) + more


def _hidden(name: str) -> bool:
    """A name starting with a dot: Jupyter's .ipynb_checkpoints/ (copies of images as a class of their own, or
    inside one), macOS's ._NAME metadata beside every file it copies (named as images, read as corrupt ones). Left
    out, where torchvision's ImageFolder reads them, with a note (`_note_left_out`)."""
    return name.startswith(".")


def _would_be_read(path: str) -> bool:
    """Whether torchvision's ImageFolder would read a hidden entry: a folder (a class, or walked), or a file named as
    an image (a .DS_Store it leaves out as we do, without a note)."""
    return os.path.isdir(path) or path.lower().endswith(IMAGE_SUFFIXES)


def _unlisted_images(paths: list[str]) -> list[str]:
    """The files among `paths` in image formats not read (a link to nowhere so named is no file)."""
    return [path for path in paths if path.lower().endswith(UNLISTED_IMAGE_SUFFIXES) and os.path.isfile(path)]


def _dangling_files(paths: list[str], where, what: str, trust_file_names: bool = True) -> list[str]:
    """Links among `paths` (none named as an image file) that lead nowhere. One named as a file of another kind
    (notes.json: a file git-annex or DVC has not fetched) is returned, to be left out with a note; any other (any at
    all without `trust_file_names`) may be a folder not there (a share not mounted), which was left out like a file, the
    run trained and scored without its images: refused."""
    dangling = [path for path in paths if os.path.islink(path) and not os.path.exists(path)]
    folders = [path for path in dangling if not (trust_file_names and FILE_SUFFIX.search(os.path.basename(path)))]
    if folders:
        raise DataError(f"dataset 'imagefolder': {len(folders)} link(s) in {str(where)!r} lead nowhere "
                        f"({_named(folders)}; the first to {os.readlink(folders[0])!r}): mount or restore the "
                        f"{what} they link to, or remove them")
    return dangling


def _note_left_out(root: Path, where: str, hidden: list[str], dangling: list[str], unlisted: list[str]) -> None:
    """One note for each kind of entry left out `where` (paths; named relative to root)."""
    def first(paths: list[str]) -> str:
        return os.path.relpath(sorted(paths)[0], root)
    if hidden:
        _note_once(f"note: {len(hidden)} hidden folder(s) or image file(s) {where} left out (names starting with "
                   f"'.', first: {first(hidden)})")
    if unlisted:
        kinds = sorted({os.path.splitext(path)[1].lower() for path in unlisted})
        _note_once(f"note: {len(unlisted)} image file(s) {where} in formats not read ({' '.join(kinds)}; first: "
                   f"{first(unlisted)}) left out: convert them to {'/'.join(sorted(IMAGE_SUFFIXES))} to use them")
    if dangling:
        _note_once(f"note: {len(dangling)} link(s) {where} named as files other than images lead nowhere (first: "
                   f"{first(dangling)}): left out")


def _class_folders(root: Path) -> list[str]:
    """The class folders under root; image files beside them, in no class, are named in a note (torchvision leaves
    them out without a word), and so are the other entries left out."""
    entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    hidden = [entry.path for entry in entries if _hidden(entry.name) and _would_be_read(entry.path)]
    entries = [entry for entry in entries if not _hidden(entry.name)]
    others = [entry.path for entry in entries if not entry.name.lower().endswith(IMAGE_SUFFIXES)]
    # (any link to nowhere here may be a class folder, and class folders are named 009.bear: refused)
    _dangling_files(others, root, "class folders", trust_file_names=False)
    _note_left_out(root, f"in {str(root)!r}", hidden, [], _unlisted_images(others))
    loose = [entry.name for entry in entries if not entry.is_dir() and entry.name.lower().endswith(IMAGE_SUFFIXES)]
    if loose:
        _note_once(f"note: {len(loose)} image file(s) lie directly in {str(root)!r}, in no class folder (first: "
                   f"{loose[0]}): left out")
    return [entry.name for entry in entries if entry.is_dir()]


def _note_once(note: str) -> None:
    """Print a note about the data once per process (each split's load, and each evaluation's, would repeat it), on
    rank 0 only (every rank loads the same data)."""
    if note not in _NOTED:
        _NOTED.add(note)
        if distributed.rank() == 0:
            print(note, flush=True)


_NOTED: set[str] = set()


def _list_images(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Image files under root/CLASS/ (recursively, sorted as torchvision's ImageFolder lists them; each real folder
    once; hidden names left out) and labels."""
    files, labels, empty, hidden, dangling, unlisted = [], [], [], [], [], []
    for label, name in enumerate(classes):
        found, visited = [], set()
        for folder, subfolders, names in os.walk(root / name, followlinks=True):
            # Links are followed, as torchvision does, but each real folder is listed once: reached again (through
            # a loop, or a second link) it would add its images again, through a loop as often as paths may grow.
            real = os.path.realpath(folder)
            if real in visited:
                subfolders.clear()
                continue
            visited.add(real)
            hidden += [os.path.join(folder, entry) for entry in (*subfolders, *names)
                       if _hidden(entry) and _would_be_read(os.path.join(folder, entry))]
            subfolders[:] = sorted(entry for entry in subfolders if not _hidden(entry))
            names = sorted(entry for entry in names if not _hidden(entry))
            images = [file_name for file_name in names if file_name.lower().endswith(IMAGE_SUFFIXES)]
            others = [os.path.join(folder, file_name) for file_name in names
                      if not file_name.lower().endswith(IMAGE_SUFFIXES)]
            # (a link to a folder not there is walked as a file name: a sub-folder of the class, left out unseen)
            dangling += _dangling_files(others, folder, "folders")
            unlisted += _unlisted_images(others)
            found.append((folder, [os.path.join(folder, file_name) for file_name in images]))
        # torchvision sorts the folders' paths as strings (sorted(os.walk(...))), which a walk does not give:
        # "a-b" and "a.b" sort before "a/x", which the walk visits right after "a".
        found = [file for _, in_folder in sorted(found, key=lambda entry: entry[0]) for file in in_folder]
        if not found:
            empty.append(root / name)
        files += found
        labels += [label] * len(found)
    _note_left_out(root, f"inside the class folders of {str(root)!r}", hidden, dangling, unlisted)
    if empty:
        raise DataError(f"dataset 'imagefolder': {len(empty)} class folder(s) without images ({_named(empty)}); "
                        f"every class folder needs at least one {'/'.join(sorted(IMAGE_SUFFIXES))} file")
    return files, labels


def _imagefolder_lists(path: Path, split: str) -> tuple[list[str], list[str], list[str], list[int]]:
    """An image folder's classes, its training files, and `split`'s files and labels: listed, not read."""
    train_root, test_root = _folder_split(path, "train"), _folder_split(path, "test")
    if train_root is None or (split == "test" and test_root is None):
        names = "train" if train_root is None else "val/ or test"
        raise DataError(f"dataset 'imagefolder': no {names}/ folder under {str(path)!r} "
                        f"(expected DATA_PATH/train/CLASS/*.jpg and DATA_PATH/val/CLASS/*.jpg)")
    classes = _class_folders(train_root)
    if not classes:
        raise DataError(f"dataset 'imagefolder': {str(train_root)!r} has no class sub-folders")
    if test_root is not None and _class_folders(test_root) != classes:
        test_classes = _class_folders(test_root)
        missing, extra = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        # names that print alike but are spelt in other Unicode forms (macOS writes decomposed accents, NFD)
        alike = {unicodedata.normalize("NFC", name) for name in missing} & {
            unicodedata.normalize("NFC", name) for name in extra}
        spelling = (f"; {_named(sorted(alike))} spelt in different Unicode forms (NFC and NFD): rename one side"
                    if alike else "")
        raise DataError(f"dataset 'imagefolder': the class folders of {str(test_root)!r} differ from those of "
                        f"{str(train_root)!r} (missing: {_named(missing) or 'none'}; "
                        f"extra: {_named(extra) or 'none'}{spelling}); both need the same class sub-folders")
    train_files, train_labels = _list_images(train_root, classes)
    test_files, test_labels = _list_images(test_root, classes) if test_root is not None else ([], [])
    # (the test split's listed at every load: a class folder without images there was found only by the evaluations
    # after training)
    files, labels = (train_files, train_labels) if split == "train" else (test_files, test_labels)
    return classes, train_files, files, labels


def lacks_test_split(image_set: ImageSet) -> bool:
    """An image folder with no val/ or test/ folder: it trains, and every evaluation of it that needs a test split
    is refused."""
    return image_set.folder is not None and _folder_split(Path(image_set.folder), "test") is None


def imagefolder_sizes(path: Path) -> tuple[int, int]:
    """How many images an image folder's training and test splits hold (listed, not read), as records count them."""
    _, train_files, test_files, _ = _imagefolder_lists(path, "test")
    return len(train_files), len(test_files)


def load_imagefolder(path: Path, split: str) -> ImageSet:
    classes, train_files, files, labels = _imagefolder_lists(path, split)
    channels, image_size, mean, std = _folder_statistics(train_files, _folder_split(path, "train"))
    return ImageSet(name="imagefolder", split=split, labels=torch.tensor(labels, dtype=torch.long),
                    num_classes=len(classes), channels=channels, image_size=image_size, mean=mean, std=std,
                    class_names=classes, files=files, folder=str(path))


def _folder_statistics(train_files: list[str], train_root: Path) -> tuple[int, int, tuple, tuple]:
    """(channels, nominal image size, mean, std) from up to STATS_SAMPLE training files spread evenly over the
    sorted list (its first files would be the first class or two only); unreadable files are reported and left out.
    Computed once per process for a sample whose files are unchanged (`_file_stamp`; the test split and the
    evaluations load the training split's statistics again)."""
    count = min(STATS_SAMPLE, len(train_files))
    sample = tuple(train_files[i * len(train_files) // count] for i in range(count))
    key = (sample, tuple(_file_stamp(file) for file in sample))
    if key not in _STATISTICS:
        _STATISTICS.clear()  # one folder's at a time: a process rarely reads two
        _STATISTICS[key] = _sample_statistics(sample, train_root)
    return _STATISTICS[key]


_STATISTICS: dict[tuple, tuple[int, int, tuple, tuple]] = {}
STATS_SIDE = 256  # a JPEG is decoded for its histogram at 1/2, 1/4 or 1/8 while its shorter side stays above this


def _file_stamp(file: str) -> tuple[int, ...] | None:
    """What changes when a file does: its inode (a file replaced by a rename), size and times, ctime included
    (copies that keep the modification time, `cp -p` or `rsync -t`, cannot keep it)."""
    try:
        stat = os.stat(file)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _sample_statistics(sample: tuple[str, ...], train_root: Path) -> tuple[int, int, tuple, tuple]:
    """The statistics of `_folder_statistics` from the files of `sample`. The nominal size is the median shorter
    side of the files as stored; the histograms of large JPEGs come from a reduced decode (libjpeg's DCT scaling,
    an area average; each of its pixels counts for those it stands for), which spares a full decode of each
    multi-megapixel photograph: it keeps the mean and narrows
    the std by what the finest detail adds to it (a tenth on photographs of fine noise; a run's checkpoint keeps the
    statistics it trained with)."""
    headers, unreadable = {}, []
    for file in sample:
        try:
            with open_image(file) as image:
                headers[file] = image.mode, min(image.size)
        except Unreadable as err:
            unreadable.append(f"{file} ({err})")
    # The files that decode decide the channels: a colour file whose header reads but whose pixels do not (cut short)
    # would make a grey folder's model take three. Files only ever leave: the passes end when the channels hold.
    channels = None
    while channels != (grey := 1 if headers and all(mode in GREY_MODES for mode, _ in headers.values()) else 3):
        channels = grey
        counts, shorter_sides = np.zeros((channels, 256)), []
        for file, (_, shorter_side) in list(headers.items()):
            try:
                with open_image(file) as image:
                    stored = image.width * image.height
                    decoded, _ = decode(image, "L" if channels == 1 else "RGB",
                                        draft_reduction(shorter_side / STATS_SIDE))
                    pixels = np.array(decoded).reshape(decoded.height, decoded.width, channels)  # writable, for torch
            except Unreadable as err:
                unreadable.append(f"{file} ({err})")
                del headers[file]
                continue
            # a reduced decode's pixels each stand for as many of the file's (an unweighted one counted 1/64 of them)
            counts += _histograms(pixels.transpose(2, 0, 1)[None]) * (stored / (decoded.width * decoded.height))
            shorter_sides.append(shorter_side)
    if distributed.rank() == 0:  # every rank reads the same sample
        for line in unreadable:
            print(f"unreadable image file {line}; left out of the statistics", flush=True)
    if not shorter_sides:
        raise DataError(f"dataset 'imagefolder': none of the {len(sample)} files sampled under {str(train_root)!r} "
                        f"is a readable image (first: {unreadable[0]})")
    mean, std = _histogram_stats(counts)
    return channels, statistics.median_low(shorter_sides), mean, std


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", ("train", "test"), load_digits_split, reads_files=False),
    "fashion_mnist": DatasetSpec("fashion_mnist", ("train", "test"), load_fashion_mnist,
                                 default_path=FASHION_MNIST_DIR,
                                 fetcher=Fetcher("FashionMNIST", ({"train": True}, {"train": False}))),
    "cifar10": DatasetSpec("cifar10", ("train", "test"), load_cifar10, fetcher=Fetcher("CIFAR10")),
    "cifar100": DatasetSpec("cifar100", ("train", "test"), load_cifar100, fetcher=Fetcher("CIFAR100")),
    "cifar100_20": DatasetSpec("cifar100_20", ("train", "test"), load_cifar100_20, fetcher=Fetcher("CIFAR100"),
                               same_images_as="cifar100"),
    "stl10": DatasetSpec("stl10", ("train", "test", "unlabeled", "train+unlabeled"), load_stl10,
                         fetcher=Fetcher("STL10", ({"split": "train"},))),
    "imagefolder": DatasetSpec("imagefolder", ("train", "test"), load_imagefolder),
}


def resolve_path(name: str, data_path: str | None) -> Path:
    spec = DATASETS[name]
    chosen = data_path or spec.default_path or os.environ.get("DATASET_PATH") or "data"
    return Path(chosen).expanduser()


def real_data_folder(name: str, data_path: str | None) -> str:
    """The folder a dataset's files are read from, links resolved and whatever the working directory: what a
    checkpoint records as its `data_folder`, and what an evaluation compares with it."""
    return os.path.realpath(resolve_path(name, data_path))


def load(name: str, split: str, data_path: str | None = None, download: bool = False) -> ImageSet:
    """Load one split of a registered dataset (errors are DataError with one line naming the bad value). A collective
    under a process group: every rank loads, and a set that differs between ranks is refused on all of them."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (choose one of: {', '.join(DATASETS)})")
    spec = DATASETS[name]
    if split not in spec.splits:
        raise DataError(f"dataset {name!r} has no split {split!r} (choose one of: {', '.join(spec.splits)})")
    if not spec.reads_files and data_path:
        _note_once(f"note: dataset {name!r} ships inside scikit-learn: --data_path {str(data_path)!r} is not read")
    path = resolve_path(name, data_path)
    if spec.reads_files and not path.exists() and not download:
        fetch = ", or --download to fetch it" if spec.fetcher is not None else ""  # imagefolder cannot be fetched
        raise DataError(f"dataset {name!r}: data path {str(path)!r} does not exist (pass --data_path DIR{fetch})")
    # With --download, making the folder failed with a traceback (FileExistsError).
    if spec.reads_files and path.exists() and not path.is_dir():
        raise DataError(f"dataset {name!r}: data path {str(path)!r} is a file, not a folder (pass --data_path DIR, "
                        f"the folder that holds the dataset)")
    if download:
        if spec.fetcher is None:
            raise DataError(f"dataset {name!r} cannot be downloaded (it ships locally or is your own folder)")
        try:  # already there, in any layout the loaders read (torchvision's looks for its own only)
            found, not_there = spec.loader(path, split), None
        except DataError as err:
            found, not_there = None, err
        # What rank 0 found decides for every rank, so that all of them take the same collectives.
        if distributed.rank0_says(found is not None):
            return _same_on_every_rank(found if found is not None else spec.loader(path, split), path)
        failure, existed = None, path.exists()
        if distributed.rank() == 0:
            try:
                path.mkdir(parents=True, exist_ok=True)
                spec.fetcher.fetch(path, download)
            except Exception as err:  # urllib's URLError, torchvision's "Error downloading", a corrupt archive...
                # files already there that do not load are named too: one cut short is mended by hand as well
                there = f"; what the folder holds does not load ({not_there})" if existed else ""
                failure = (f"dataset {name!r}: --download into {str(path)!r} failed ({one_line(err)}){there}; fetch "
                           f"the files on a machine that reaches the internet and pass --data_path")
        if not distributed.rank0_says(failure is None):
            raise DataError(failure or f"dataset {name!r}: --download failed on rank 0 (its error names why)")
    return _same_on_every_rank(spec.loader(path, split), path)


def _same_on_every_rank(images: ImageSet, path: Path) -> ImageSet:
    """Collective: the set each rank read, refused unless all hold as many images with the same fingerprint (the
    labels and, for image files, their paths, in order; not the pixels). Every rank lists and reads the files itself
    (a node-local copy, a stale network-filesystem cache, a file removed while the job started), and ranks whose sets
    differ would take their batches from different images at the same positions without a word."""
    if distributed.world_size() == 1:
        return images
    ranks_of: dict[tuple, list[int]] = {}
    for rank, (size, digest) in enumerate(distributed.every_ranks([len(images), int(images.fingerprint[:15], 16)])):
        ranks_of.setdefault((size, digest), []).append(rank)
    if len(ranks_of) > 1:
        seen = "; ".join(f"rank{'s' * (len(ranks) > 1)} {distributed.rank_list(ranks)}: {size} images, digest "
                         f"{digest:015x}" for (size, digest), ranks in ranks_of.items())
        raise DataError(f"dataset {images.name!r} split {images.split!r} differs between ranks ({seen}): every node "
                        f"must see the same files under {str(path)!r}")
    return images
