"""Image files (`--dataset imagefolder`): what the loader workers do, and why it is exact and independent of the
world size.

Crops from the original image. The main process draws, from the augmentation's generator and for the whole global
batch, every crop's random numbers (`augment.draw_crop_uniforms`: an area-fraction and a log-aspect uniform for
each of up to 10 attempts, then two position uniforms), with the flip and colour parameters, exactly as for an
in-memory set. A worker opens the image, reads its width and height from the header, turns the numbers into a box
on that size with torchvision's RandomResizedCrop rule (`augment.crop_boxes`: the first attempt that fits, else the
centre crop with the aspect ratio clamped), decodes the image, cuts each box and resizes it to its crop size (PIL
bilinear with antialiasing, as torchvision's RandomResizedCrop on a PIL image does) and returns uint8 crops. A box
depends only on the random numbers and on the image, never on the worker, the rank or the world size. Nothing is
scanned ahead (no size cache, nothing written into the data folder): the worker opens up to 64 images of its
batch, reads their headers, computes their boxes in one call of the rule, then decodes and closes them one by one
(each file is opened once). Flips, colour jitter, greyscale, blur and normalisation
run batched on the training device (`MultiCrop.apply_cut`).

JPEG draft. When every crop of an image is at least 2, 4 or 8 times smaller than its box in both directions, the
worker lets libjpeg decode the image at 1/2, 1/4 or 1/8 of its size (PIL's `draft`, DCT scaling; the largest such
factor) and cuts the same boxes, scaled, from it: every crop covers the same part of the image and is still
downsampled; its pixels differ from those of a full decode by the DCT scaling's filtering. Otherwise (most
224-pixel ImageNet crops) the whole image is decoded.

Test view (`augment.EvalView`). The shorter side resized to `resize` (torchvision's Resize rule), then the centre
crop x crop (CenterCrop's rule), with the same draft rule.

Unreadable files. A file that cannot be decoded (corrupt, truncated, zero bytes, not an image) is replaced by the
next file of the dataset's order that decodes (index i+1, i+2, ..., wrapping around), so what a sample gets
depends only on the data; the sample keeps its own index and label. The worker returns the replacements it made
with the batch; the loader (loader.py) reports each bad file on one line and counts them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DataError, one_line
from .augment import EvalView, crop_boxes

GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# 16-bit grey: Pillow's I;16 modes, and its 32-bit "I" from formats that store at most 16 bits a sample (a 16-bit
# PGM; a 16-bit PNG in older Pillow versions). Any other "I", and "F", has no known range to scale from.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
SIXTEEN_BIT_FORMATS = frozenset({"PNG", "PPM"})
# Files tried after an unreadable one before the search for a substitute gives up.
SUBSTITUTE_SEARCH = 64
# Images a worker holds open at once (headers read, then decoded one by one): each file is opened once, and a batch
# of any size stays far below the open-files limit.
OPEN_AT_ONCE = 64
DRAFT_FACTORS = (8, 4, 2)


@dataclass(frozen=True)
class CropJob:
    """Random-resized crops of the images `indices`: uniforms (n, crops, 22) and one CropSpec per crop."""

    step: int
    indices: np.ndarray
    uniforms: np.ndarray
    crops: tuple


@dataclass(frozen=True)
class ViewJob:
    """The test view of the images `indices`."""

    step: int
    indices: np.ndarray
    view: EvalView


class Unreadable(Exception):
    """A file PIL cannot decode; the message is one line."""


def open_image(path: str):
    """The image with its header read (nothing decoded yet), or Unreadable."""
    from PIL import Image

    try:
        return Image.open(path)
    except Exception as err:  # whatever PIL raises on a bad file (OSError, SyntaxError, ValueError, ...)
        raise Unreadable(one_line(err)) from None


def decode(image, mode: str, reduction: int = 1):
    """Decode `image` (from open_image) in `mode` ("L" or "RGB"); a JPEG at 1/`reduction` of its size where libjpeg
    can, a 16-bit grey image scaled to 8 bits (`eight_bits`). Returns (image, the reduction applied). An image of
    32-bit samples is a DataError: nothing says which of its values is white."""
    sixteen_bits = image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format in SIXTEEN_BIT_FORMATS)
    if image.mode in ("I", "F") and not sixteen_bits:
        raise DataError(f"image file {image.filename!r} has mode {image.mode!r} (32-bit samples of unknown range); "
                        f"save it with 8 or 16 bits per sample")
    try:
        applied = 1
        # Asking for (width // r, height // r) makes PIL pick exactly the factor r (never 2r); None: no draft
        # (another format, or a JPEG that libjpeg cannot scale, which is then decoded whole).
        if reduction > 1 and image.format == "JPEG" and image.draft(None, (image.width // reduction,
                                                                           image.height // reduction)):
            applied = reduction
        image.load()
        if sixteen_bits:
            image = eight_bits(image)
        return (image if image.mode == mode else image.convert(mode)), applied
    except Exception as err:  # decoding errors of a bad file: truncated data, broken chunks, decompression bombs
        raise Unreadable(one_line(err)) from None


def eight_bits(image):
    """A 16-bit grey image as mode L: each value v becomes round(v / 257), the nearest of the 256 levels (an 8-bit x
    is x * 257 in 16 bits; 65535 is white). v >> 8 maps the same range but floors, up to a level darker; PIL's
    convert("L") clips every value above 255 to white."""
    from PIL import Image

    values = np.asarray(image, dtype=np.uint32)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def draft_reduction(shortest_ratio: float) -> int:
    """The largest JPEG draft factor (8, 4, 2) that keeps every output downsampled: `shortest_ratio` is the
    smallest ratio of box side to output side over the outputs of the image; 1 when none fits."""
    return next((factor for factor in DRAFT_FACTORS if factor <= shortest_ratio), 1)


def resized_region(image, box: tuple, size: int):
    """The region box = (left, top, right, bottom), in `image`'s pixels (fractional after a draft), resized to
    size x size with PIL's antialiased bilinear filter. The filter reads no pixel outside the box's whole-pixel
    hull, so an integer box gives exactly PIL's crop-then-resize (torchvision's resized_crop on a PIL image)."""
    from PIL import Image

    left, top, right, bottom = box
    hull = (math.floor(left), math.floor(top), min(math.ceil(right), image.width), min(math.ceil(bottom), image.height))
    region = image.crop(hull)
    return region.resize((size, size), Image.BILINEAR,
                         box=(left - hull[0], top - hull[1], right - hull[0], bottom - hull[1]))


def centre_view(image, view: EvalView):
    """Resize(view.resize) then CenterCrop(view.crop) of a decoded image, torchvision's rules for both."""
    from PIL import Image

    width, height = image.size
    if width <= height:
        new_width, new_height = view.resize, int(view.resize * height / width)
    else:
        new_width, new_height = int(view.resize * width / height), view.resize
    resized = image.resize((new_width, new_height), Image.BILINEAR)
    top = int(round((new_height - view.crop) / 2.0))
    left = int(round((new_width - view.crop) / 2.0))
    return resized.crop((left, top, left + view.crop, top + view.crop))


class FileSource(torch.utils.data.Dataset):
    """The dataset the loader workers hold: `source[job]` runs a CropJob or a ViewJob and returns a dict of
    "step", "indices", "labels", "crops" (uint8 tensors, one per crop, (n, C, size, size)), "boxes" (n, crops, 4:
    top, left, h, w in each image's own pixels; CropJob only), "sizes" (n, 2: height, width of each image) and
    "bad" (one (index, path, reason, substitute path) per unreadable file replaced); "fatal" instead when no
    readable substitute was found or an image cannot be used (a DataError's message)."""

    def __init__(self, files: list, labels, channels: int):
        # The paths end to end in one numpy buffer, not a list of str: forked workers then share it without touching
        # reference counts, and it holds what the names hold (a fixed-width array of bytes gives every name the
        # longest one's width: one 500-byte path among 1.28 M short ones would take 640 MB).
        encoded = [os.fsencode(f) for f in files]
        self._path_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._path_ends = np.cumsum([len(name) for name in encoded], dtype=np.int64)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.channels = channels
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self._path_ends)

    def path(self, index: int) -> str:
        start = int(self._path_ends[index - 1]) if index else 0
        return os.fsdecode(self._path_bytes[start: self._path_ends[index]].tobytes())

    def __getitem__(self, job) -> dict:
        n = len(job.indices)
        cutting = isinstance(job, CropJob)
        sizes = [spec.size for spec in job.crops] if cutting else [job.view.crop]
        crops = [np.empty((n, size, size, self.channels), dtype=np.uint8) for size in sizes]
        image_sizes = torch.ones(n, 2, dtype=torch.long)  # (1, 1): an unreadable file's, until its substitute's
        boxes = torch.zeros(n, len(job.crops) if cutting else 1, 4, dtype=torch.long)
        bad = []
        indices = job.indices.tolist()
        try:
            for start in range(0, n, OPEN_AT_ONCE):
                stop = min(start + OPEN_AT_ONCE, n)
                opened = [self._open(index) for index in indices[start:stop]]
                try:
                    for row, image in enumerate(opened, start):
                        if not isinstance(image, Unreadable):
                            image_sizes[row] = torch.tensor([image.height, image.width])
                    if cutting:  # the chunk's boxes in one call of the box rule
                        boxes[start:stop] = self._boxes(job.uniforms[start:stop], job.crops, image_sizes[start:stop])
                    for row in range(start, stop):
                        image, opened[row - start] = opened[row - start], None
                        try:
                            outputs = self._outputs(job, image, boxes[row], sizes)
                        except Unreadable as err:
                            substitute, outputs = self._substitute(job, row, indices[row], err, image_sizes, boxes,
                                                                   sizes)
                            bad.append((indices[row], self.path(indices[row]), str(err), self.path(substitute)))
                        for out, pixels in zip(crops, outputs):
                            out[row] = np.asarray(pixels).reshape(out.shape[1:])
                finally:
                    for image in opened:
                        if image is not None and not isinstance(image, Unreadable):
                            image.close()
        except DataError as err:  # raised in a worker, it would reach the program wrapped in a traceback
            return {"fatal": str(err)}
        indices = torch.from_numpy(job.indices)
        # (n, C, size, size) views of the (n, size, size, C) arrays: channels-last strides, no copy here.
        return {"step": job.step, "indices": indices, "labels": self.labels[indices],
                "crops": [torch.from_numpy(c).permute(0, 3, 1, 2) for c in crops],
                "boxes": boxes, "sizes": image_sizes, "bad": bad}

    def _open(self, index: int):
        """The image of `index` with its header read, or the Unreadable saying why not."""
        try:
            return open_image(self.path(index))
        except Unreadable as err:
            return err

    def _outputs(self, job, image, boxes: torch.Tensor, sizes: list) -> list:
        """The job's crops (or test view) of one opened image, which is closed after; Unreadable when it cannot be
        decoded."""
        if isinstance(image, Unreadable):
            raise image
        with image:
            return self._crops(image, boxes, sizes) if isinstance(job, CropJob) else [self._view(image, job.view)]

    def _substitute(self, job, row: int, index: int, err: Unreadable, image_sizes, boxes, sizes) -> tuple:
        """(index, outputs) of the first readable file after the unreadable `index` in the dataset's order, its
        size and boxes (drawn from the row's own random numbers) written into the row; a DataError when none of
        the next SUBSTITUTE_SEARCH files reads."""
        for offset in range(1, min(SUBSTITUTE_SEARCH, len(self) - 1) + 1):
            candidate = (index + offset) % len(self)
            image = self._open(candidate)
            if not isinstance(image, Unreadable):
                image_sizes[row] = torch.tensor([image.height, image.width])
                if isinstance(job, CropJob):
                    boxes[row] = self._boxes(job.uniforms[row: row + 1], job.crops, image_sizes[row: row + 1])[0]
            try:
                return candidate, self._outputs(job, image, boxes[row], sizes)
            except Unreadable:
                continue
        raise DataError(f"no readable image among the {SUBSTITUTE_SEARCH} files after {self.path(index)} (which is "
                        f"unreadable: {err})")

    @staticmethod
    def _boxes(uniforms: np.ndarray, crops: tuple, image_sizes: torch.Tensor) -> torch.Tensor:
        """Boxes (m, crops, 4) from uniforms (m, crops, 22) for images of sizes (m, 2), each crop with its range."""
        m, count = len(image_sizes), len(crops)
        low = torch.tensor([spec.min_scale for spec in crops], dtype=torch.float64).repeat(m)[:, None]
        high = torch.tensor([spec.max_scale for spec in crops], dtype=torch.float64).repeat(m)[:, None]
        heights, widths = image_sizes.repeat_interleave(count, dim=0).unbind(1)
        flat = crop_boxes(torch.from_numpy(uniforms).reshape(m * count, uniforms.shape[-1]), heights, widths,
                          (low, high))
        return flat.reshape(m, count, 4)

    def _crops(self, image, boxes: torch.Tensor, sizes: list) -> list:
        """Decode once (drafted where every crop allows), then cut and resize each box."""
        shortest = min(min(h, w) / size for (_, _, h, w), size in zip(boxes.tolist(), sizes))
        decoded, reduction = decode(image, self.mode, draft_reduction(shortest))
        return [resized_region(decoded, (left / reduction, top / reduction, (left + w) / reduction,
                                         (top + h) / reduction), size)
                for (top, left, h, w), size in zip(boxes.tolist(), sizes)]

    def _view(self, image, view: EvalView):
        decoded, _ = decode(image, self.mode, draft_reduction(min(image.size) / view.resize))
        return centre_view(decoded, view)
