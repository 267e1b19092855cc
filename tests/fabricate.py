"""Write small datasets in the real on-disk formats (CIFAR pickles, STL-10 binaries, IDX .gz, image folders).

Every image carries its label and its position in its file, so tests can check that images and labels stay paired
and in order, and that a reader transposes what the format stores transposed:

    row 0 of every channel       = the label (for STL-10 the 1-based label minus one, i.e. the 0-based class)
    pixel (1, 1) of channel 0    = the position of the image in its split, modulo 251
    column 0 below row 0          = 255 (so a row/column transpose moves 255 onto row 0)
    everything else               = random noise in 0..250

`decode_label` / `decode_index` read these back. Each `*_arrays` function returns the (N, C, H, W) uint8 images and
int64 labels that the matching `make_*` writes, so a test can compare a reader's output pixel for pixel.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

# A fixed fine -> coarse map for fabricated CIFAR-100 (7 is invertible mod 20, so each coarse class gets 5 fine
# classes). It differs from the IIC table (test_data_formats.IIC_COARSE) for most fine classes, so a loader that
# reads a hand-typed table instead of the pickle's coarse_labels fails.
CIFAR100_COARSE = np.array([(7 * fine + 3) % 20 for fine in range(100)], dtype=np.int64)

STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
CIFAR10_CLASSES = [f"c10_class_{i}" for i in range(10)]
CIFAR100_FINE = [f"fine_{i:02d}" for i in range(100)]
CIFAR100_COARSE_NAMES = [f"coarse_{i:02d}" for i in range(20)]


def decode_label(images) -> np.ndarray:
    """Labels written into row 0 (pixel (0, 1) of channel 0, which a transpose would turn into 255)."""
    return np.asarray(images)[:, 0, 0, 1].astype(np.int64)


def decode_index(images) -> np.ndarray:
    return np.asarray(images)[:, 0, 1, 1].astype(np.int64)


def fake_images(labels: np.ndarray, channels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, C, size, size) noise with the label and position markers described above."""
    labels = np.asarray(labels)
    n = len(labels)
    images = rng.integers(0, 251, size=(n, channels, size, size), dtype=np.uint8)
    images[:, :, 1:, 0] = 255
    images[:, :, 0, :] = labels[:, None, None].astype(np.uint8)
    images[:, 0, 1, 1] = (np.arange(n) % 251).astype(np.uint8)
    return images


def _labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Every class present (when n >= num_classes), in a shuffled order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def _split_arrays(sizes: dict, num_classes: int, channels: int, size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in sizes.items():
        labels = _labels(n, num_classes, rng)
        out[split] = (fake_images(labels, channels, size, rng), labels)
    return out


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the real CIFAR files (protocol 2): every str and bytes as a Python 2
    byte string (SHORT_BINSTRING / BINSTRING, which Python 3 reads back as str under encoding='latin1'), and numpy's
    array reconstructor under numpy 1.x's module name, numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)
    _RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]

    def __init__(self, handle):
        super().__init__(handle, protocol=2)

    def save_byte_string(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_byte_string
    dispatch[bytes] = save_byte_string

    def save_global(self, obj, name=None) -> None:
        if obj is not self._RECONSTRUCT:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
        self.memoize(obj)


def _write_pickle(path: Path, obj, protocol: int | None) -> None:
    """protocol None: Python 2's format, as the real CIFAR files; else pickle.dump with that protocol."""
    with open(path, "wb") as handle:
        if protocol is None:
            Python2Pickler(handle).dump(obj)
        else:
            pickle.dump(obj, handle, protocol=protocol)


# ---- CIFAR ---------------------------------------------------------------------------------------------------------

def cifar10_arrays(n_train=100, n_test=50, seed=0) -> dict:
    return _split_arrays({"train": n_train, "test": n_test}, 10, 3, 32, seed)


def make_cifar10(root, n_train=100, n_test=50, seed=0, protocol=None):
    """root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}: the train split spread over 5 batches,
    pickled as Python 2 did for the real files (protocol None) or with a given pickle protocol."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = cifar10_arrays(n_train, n_test, seed)
    images, labels = arrays["train"]
    for number, rows in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
        _write_pickle(folder / f"data_batch_{number}",
                      {"batch_label": f"training batch {number} of 5", "labels": labels[rows].tolist(),
                       "data": images[rows].reshape(len(rows), -1),
                       "filenames": [f"img_{i}.png" for i in rows.tolist()]}, protocol)
    images, labels = arrays["test"]
    _write_pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels.tolist(),
                                          "data": images.reshape(len(labels), -1),
                                          "filenames": [f"img_{i}.png" for i in range(len(labels))]}, protocol)
    _write_pickle(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 10000,
                                            "num_vis": 3072}, protocol)
    return root


def cifar100_arrays(n_train=100, n_test=50, seed=0) -> dict:
    """Images carry the FINE label in row 0; coarse labels are CIFAR100_COARSE[fine]."""
    return _split_arrays({"train": n_train, "test": n_test}, 100, 3, 32, seed)


def make_cifar100(root, n_train=100, n_test=50, seed=0, protocol=None):
    """root/cifar-100-python/{train, test, meta} with fine_labels and coarse_labels = CIFAR100_COARSE[fine], pickled
    as make_cifar10 says."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, fine) in cifar100_arrays(n_train, n_test, seed).items():
        _write_pickle(folder / split, {"batch_label": f"{split}ing batch 1 of 1", "fine_labels": fine.tolist(),
                                       "coarse_labels": CIFAR100_COARSE[fine].tolist(),
                                       "data": images.reshape(len(fine), -1),
                                       "filenames": [f"img_{i}.png" for i in range(len(fine))]}, protocol)
    _write_pickle(folder / "meta", {"fine_label_names": CIFAR100_FINE, "coarse_label_names": CIFAR100_COARSE_NAMES},
                  protocol)
    return root


# ---- STL-10 --------------------------------------------------------------------------------------------------------

def stl10_arrays(n_train=50, n_test=30, n_unlabeled=40, seed=0) -> dict:
    """Row-major (N, 3, 96, 96) images; labels 0..9 (written as 1..10), -1 for the unlabeled split."""
    arrays = _split_arrays({"train": n_train, "test": n_test, "unlabeled": n_unlabeled}, 10, 3, 96, seed)
    images, _ = arrays["unlabeled"]
    arrays["unlabeled"] = (images, np.full(len(images), -1, dtype=np.int64))
    return arrays


def make_stl10(root, n_train=50, n_test=30, n_unlabeled=40, seed=0):
    """root/stl10_binary/{train,test}_{X,y}.bin, unlabeled_X.bin, class_names.txt (channels column-major)."""
    folder = Path(root) / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in stl10_arrays(n_train, n_test, n_unlabeled, seed).items():
        # STL-10 stores each 96x96 channel column-major (MATLAB order).
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    return root


# ---- Fashion-MNIST (IDX) -------------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: 0, 0, 0x08, ndim, the sizes as big-endian int32, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def fashion_mnist_arrays(n_train=100, n_test=50, seed=0) -> dict:
    return _split_arrays({"train": n_train, "test": n_test}, 10, 1, 28, seed)


def make_fashion_mnist(root, n_train=100, n_test=50, seed=0):
    """root/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in fashion_mnist_arrays(n_train, n_test, seed).items():
        prefix = "train" if split == "train" else "t10k"
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(idx_bytes(images[:, 0]))
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(idx_bytes(labels))
    return root


# ---- image folders -------------------------------------------------------------------------------------------------

def imagefolder_classes(classes=3) -> list[str]:
    return [f"class_{chr(ord('a') + i)}" for i in range(classes)]


def imagefolder_arrays(n_per_class=5, classes=3, size=28, grey=True, seed=0) -> dict:
    """Per split, images in the order the loader lists them (class folders sorted, files sorted in each)."""
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "val"):
        labels = np.repeat(np.arange(classes), n_per_class).astype(np.int64)
        out[split] = (fake_images(labels, 1 if grey else 3, size, rng), labels)
    return out


def make_imagefolder(root, n_per_class=5, classes=3, size=28, grey=True, seed=0):
    """root/{train,val}/class_X/NNNN.png, grey (mode L) or RGB."""
    from PIL import Image

    names = imagefolder_classes(classes)
    for split, (images, labels) in imagefolder_arrays(n_per_class, classes, size, grey, seed).items():
        for position, (image, label) in enumerate(zip(images, labels)):
            folder = Path(root) / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = image[0] if grey else image.transpose(1, 2, 0)
            # A 2-D uint8 array becomes mode L, (H, W, 3) mode RGB.
            Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"{position:04d}.png")
    return root


def make_mixed_imagefolder(root, n_per_class=5, classes=2, seed=0, jpeg=True):
    """root/{train,val}/class_X/NNNN.{png,jpg}: noise images of 12 to 40 pixels a side (aspect ratios up to about
    3:1 either way), every third one grey (mode L), every other one a JPEG of quality 90 (`jpeg` False: all PNG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = imagefolder_classes(classes)
    for split in ("train", "val"):
        for label in range(classes):
            folder = Path(root) / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                width, height = (int(v) for v in rng.integers(12, 41, 2))
                grey = i % 3 == 0
                pixels = rng.integers(0, 256, (height, width) if grey else (height, width, 3), dtype=np.uint8)
                if jpeg and i % 2:
                    Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
                else:
                    Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def spoil_image_files(paths) -> dict:
    """Make the given image files unreadable, one way each in turn: a PNG with zeroed bytes in its pixel data
    (corrupt), a JPEG cut in half (truncated), zero bytes, text. Returns {path: how}."""
    from PIL import Image

    ways = ("corrupt", "truncated", "zero-byte", "not an image")
    spoiled = {}
    for number, path in enumerate(paths):
        path = Path(path)
        way = ways[number % len(ways)]
        if way == "corrupt":
            Image.open(path).convert("RGB").save(path, format="PNG")
            data = bytearray(path.read_bytes())
            middle = len(data) // 2
            data[middle: middle + 8] = bytes(8)
            path.write_bytes(bytes(data))
        elif way == "truncated":
            Image.open(path).convert("RGB").save(path, format="JPEG", quality=90)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif way == "zero-byte":
            path.write_bytes(b"")
        else:
            path.write_text("not an image\n")
        spoiled[str(path)] = way
    return spoiled
