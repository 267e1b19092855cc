"""Readers for the on-disk formats the datasets ship in, with errors that say what is wrong with which file.

All readers return uint8 arrays in (N, C, H, W) order and int64 labels.
"""
from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError


# ---- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally .gz): magic (0, 0, type, ndim), ndim big-endian int32 sizes, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise DataError(f"IDX file {str(path)!r} does not exist") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"IDX file {str(path)!r} cannot be read ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        types = ", ".join(f"{code:02X}" for code in sorted(_IDX_TYPES))
        raise DataError(f"IDX file {str(path)!r} starts with {raw[:4].hex(' ').upper() or 'nothing'}, not an IDX "
                        f"magic number (00 00, a type in {types}, the number of dimensions)")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {str(path)!r} is truncated inside its header")
    # Unsigned, and multiplied exactly: signed sizes could be negative, and a header whose negative sizes multiply
    # to the data's length passed the check below and failed in reshape with a traceback.
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"IDX file {str(path)!r} is truncated or padded: {len(raw) - header} data bytes for shape "
                        f"{tuple(shape)} (expected {expected})")
    # A copy: an array over the immutable bytes is read-only, and torch.from_numpy of it gives a tensor whose
    # in-place writes are undefined behaviour.
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()


# ---- CIFAR python pickles ------------------------------------------------------------------------------------------

class _RefusedGlobal(Exception):
    """A pickle asked for a callable that CIFAR batches never hold; raised before anything is called."""


def _latin1_bytes(text: str = "", encoding: str = "latin1") -> bytes:
    """What Python 3 pickles bytes as under protocol 2 (`_codecs.encode(text, 'latin1')`, `bytes()` when empty),
    admitted for exactly that use."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _RefusedGlobal(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


# Every global a CIFAR-10/100 python batch or meta file refers to: numpy's array and number reconstruction (the
# real files, written by Python 2's cPickle with numpy 1.x, name numpy.core; numpy 2 writes numpy._core; protocol 5
# rebuilds from a buffer) and Python 3's way of writing bytes under protocol 2. Taken from numpy itself, so that no
# private module is imported by name.
_NUMPY_RECONSTRUCT = np.zeros(1, np.uint8).__reduce__()[0]
_NUMPY_FROMBUFFER = np.zeros(1, np.uint8).__reduce_ex__(5)[0]
_NUMPY_SCALAR = np.int64(0).__reduce__()[0]  # a number from its dtype and bytes: labels re-exported as list(array)
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NUMPY_RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _NUMPY_FROMBUFFER,
    ("numpy.core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy._core.multiarray", "scalar"): _NUMPY_SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "bytes"): _latin1_bytes,
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads dicts, lists, strings, numbers and numpy arrays; any other global is refused before it is called, so a
    crafted file cannot run code (plain pickle.load would call whatever the file names, os.system included)."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _unpickle(path: Path, what: str):
    try:
        with open(path, "rb") as handle:
            return _CifarUnpickler(handle, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"{what} {str(path)!r} does not exist") from None
    except _RefusedGlobal as err:
        raise DataError(f"{what} {str(path)!r} asks for {err}, which no CIFAR python pickle holds (only dicts, "
                        f"lists, strings, numbers and numpy arrays are loaded): refused, nothing was run") from None
    except Exception as err:  # a corrupt pickle can raise nearly anything (AttributeError, ImportError, ...)
        raise DataError(f"{what} {str(path)!r} is corrupt ({type(err).__name__}: {err})") from None


def read_cifar_pickle(path: Path) -> dict:
    batch = _unpickle(path, "CIFAR batch")
    if not isinstance(batch, dict) or "data" not in batch:
        raise DataError(f"CIFAR batch {str(path)!r} has no 'data' entry (not a CIFAR python pickle)")
    try:
        data = np.asarray(batch["data"])
    except (TypeError, ValueError) as err:  # rows of different lengths
        raise DataError(f"CIFAR batch {str(path)!r} has data that is no array ({err})") from None
    # Casting to uint8 would wrap other values silently (floats in [0, 1] became a black image).
    if data.dtype != np.uint8 and (data.dtype.kind not in "iu" or (data.size and (data.min() < 0 or data.max() > 255))):
        span = f" from {data.min()} to {data.max()}" if data.size and data.dtype.kind in "iuf" else ""
        raise DataError(f"CIFAR batch {str(path)!r} has data of dtype {data.dtype}{span}, expected uint8 pixels "
                        f"(whole numbers 0..255)")
    data = data.astype(np.uint8, copy=False)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or not len(data):
        raise DataError(f"CIFAR batch {str(path)!r} has data of shape {data.shape}, expected (N, 3072) with N > 0 "
                        f"images")
    batch["data"] = data.reshape(-1, 3, 32, 32)
    return batch


def read_cifar(folder: Path, files: list[str], label_keys: dict[str, int]) -> tuple[np.ndarray, dict]:
    """Concatenate CIFAR batches; returns images and one int64 array per requested label key (key: its number of
    classes, the labels' range)."""
    images, labels = [], {key: [] for key in label_keys}
    for name in files:
        batch = read_cifar_pickle(folder / name)
        images.append(batch["data"])
        for key, classes in label_keys.items():
            if key not in batch:
                raise DataError(f"CIFAR batch {str(folder / name)!r} has no {key!r} labels")
            try:
                values = np.asarray(batch[key])
            except (TypeError, ValueError) as err:  # lists of lists
                raise DataError(f"CIFAR batch {str(folder / name)!r} has {key} that are no integers ({err})") from None
            if values.size and values.dtype.kind not in "iu":  # text; floats, which a cast truncated (0.5: 0)
                raise DataError(f"CIFAR batch {str(folder / name)!r} has {key} that are no integers (dtype "
                                f"{values.dtype}), expected whole numbers")
            values = values.astype(np.int64)
            if values.ndim != 1 or values.size != len(batch["data"]):
                raise DataError(f"CIFAR batch {str(folder / name)!r}: {values.size} {key} for "
                                f"{len(batch['data'])} images")
            # A label past the classes loaded, and failed later (kNN's votes) with a traceback or not at all.
            outside = np.flatnonzero((values < 0) | (values >= classes))
            if len(outside):
                raise DataError(f"CIFAR batch {str(folder / name)!r}: {key!r} holds {values[outside[0]]} (image "
                                f"{outside[0]}), outside the classes 0..{classes - 1}")
            labels[key].append(values)
    return np.concatenate(images), {key: np.concatenate(v) for key, v in labels.items()}


def read_cifar_meta(path: Path, key: str) -> list[str] | None:
    if not path.is_file():
        return None
    meta = _unpickle(path, "CIFAR meta file")
    names = meta.get(key) if isinstance(meta, dict) else None
    return list(names) if names is not None else None


# ---- STL-10 binaries -----------------------------------------------------------------------------------------------

STL10_SIZE = 96


STL10_IMAGE_BYTES = 3 * STL10_SIZE * STL10_SIZE


def stl10_image_count(path: Path) -> int:
    """How many images an STL-10 *_X.bin holds, from its size."""
    if not path.is_file():
        raise DataError(f"STL-10 file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0 or size % STL10_IMAGE_BYTES:
        raise DataError(f"STL-10 file {str(path)!r} holds {size} bytes, not a multiple of {STL10_IMAGE_BYTES}")
    return size // STL10_IMAGE_BYTES


def read_stl10_images(path: Path, out: np.ndarray) -> np.ndarray:
    """Fill `out` (N x 3 x 96 x 96, uint8) with the first N images of an STL-10 *_X.bin (uint8, 3 x 96 x 96 per
    image, each channel stored column-major), 256 images at a time: reading the whole file and then transposing it
    held two copies at once (2.2 GB more than the set for the 100,000 unlabelled images, in every process)."""
    with open(path, "rb") as handle:
        for start in range(0, len(out), 256):
            chunk = out[start:start + 256]
            raw = np.fromfile(handle, dtype=np.uint8, count=len(chunk) * STL10_IMAGE_BYTES)
            if raw.size != len(chunk) * STL10_IMAGE_BYTES:
                raise DataError(f"STL-10 file {str(path)!r} ends at image {start + raw.size // STL10_IMAGE_BYTES}, "
                                f"before the {len(out)} images its size promised (was it being written?)")
            chunk[:] = raw.reshape(-1, 3, STL10_SIZE, STL10_SIZE).transpose(0, 1, 3, 2)
    return out


def read_stl10_labels(path: Path, count: int) -> np.ndarray:
    """STL-10 *_y.bin: one uint8 per image, classes numbered 1..10 (returned as 0..9)."""
    if not path.is_file():
        raise DataError(f"STL-10 file {str(path)!r} does not exist")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1
    if len(labels) != count:
        images_file = path.with_name(path.name.replace("_y.bin", "_X.bin"))
        raise DataError(f"STL-10 files {str(images_file)!r} and {str(path)!r} do not match ({count} images, "
                        f"{len(labels)} labels): one of them is cut short or of another split")
    outside = np.flatnonzero((labels < 0) | (labels > 9))
    if len(outside):
        raise DataError(f"STL-10 file {str(path)!r} has labels outside 1..10 (the first: {labels[outside[0]] + 1} "
                        f"at image {outside[0]}; {len(outside)} of {count})")
    return labels
