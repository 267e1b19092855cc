"""SCAN's strong augmentation, batched on the training device: horizontal flip, n operations drawn from a
RandAugment-style list, normalisation, then Cutout (wvangansbeke/Unsupervised-Classification@952ec31
data/augment.py `augment_list`, `Augment` and `Cutout`; utils/common_config.py, strategy "ours").

Per image: a flip with probability 1/2; then `num_ops` operations, each drawn uniformly (with replacement) from
the 14 below, each with a magnitude v = low + u (high - low), u uniform in [0, 1); the geometric ones negate v with
probability 1/2. The operations, as upstream's PIL calls do them, on images in [0, 1]:

    Identity; AutoContrast (per channel, min -> 0, max -> 1); Equalize (histogram, per channel, on 8-bit values);
    Rotate v in [-30, 30] degrees about the centre; Solarize v in [0, 256] (8-bit values >= v inverted);
    Color, Contrast, Brightness v in [0.05, 0.95] (blend with the grey image, its mean, black); Sharpness v in
    [0.05, 0.95] (blend with PIL's 3 x 3 smoothing, border kept); ShearX, ShearY v in [-0.1, 0.1] about the top-left
    corner; TranslateX, TranslateY v in [-0.1, 0.1] of the width / height; Posterize int(v), v in [4, 8] bits.

Geometric operations sample the nearest pixel and fill with black, as PIL's `transform` and `rotate`. Cutout
zeroes, after normalisation, a square of side 2 (l // 2) centred on a uniform pixel, l uniform in 1..length,
clipped at the border. Upstream's RandomCrop(crop_size) comes before the operations; every upstream recipe crops
the image's own size without padding, so it is the identity and is not drawn here.

Parameters are drawn for the global batch from this pipeline's generator (a rank applies its slice), as
augment.MultiCrop does, so the views do not depend on the world size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import adjust_brightness, adjust_contrast, adjust_saturation, host_to, normalize

# (name, low, high) in upstream's order; the index is what the generator draws.
OPERATIONS = (
    ("identity", 0.0, 1.0), ("autocontrast", 0.0, 1.0), ("equalize", 0.0, 1.0), ("rotate", -30.0, 30.0),
    ("solarize", 0.0, 256.0), ("color", 0.05, 0.95), ("contrast", 0.05, 0.95), ("brightness", 0.05, 0.95),
    ("sharpness", 0.05, 0.95), ("shear_x", -0.1, 0.1), ("translate_x", -0.1, 0.1), ("translate_y", -0.1, 0.1),
    ("posterize", 4.0, 8.0), ("shear_y", -0.1, 0.1),
)
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


@dataclass
class StrongParams:
    flip: torch.Tensor        # (n,) bool
    ops: torch.Tensor         # (n, num_ops) int64 indices into OPERATIONS
    magnitudes: torch.Tensor  # (n, num_ops) float64 v, mirrored where drawn
    cut_length: torch.Tensor  # (n,) int64 l in 1..length (0: no Cutout)
    cut_y: torch.Tensor       # (n,) int64 centre row
    cut_x: torch.Tensor       # (n,) int64 centre column

    def slice(self, start: int, stop: int) -> "StrongParams":
        return StrongParams(*(getattr(self, f)[start:stop] for f in self.__dataclass_fields__))


def sample_strong(n: int, height: int, width: int, num_ops: int, cutout: int,
                  generator: torch.Generator) -> StrongParams:
    flip = torch.rand(n, generator=generator) < 0.5
    ops = torch.randint(len(OPERATIONS), (n, num_ops), generator=generator)
    low = torch.tensor([op[1] for op in OPERATIONS], dtype=torch.float64)[ops]
    high = torch.tensor([op[2] for op in OPERATIONS], dtype=torch.float64)[ops]
    magnitudes = low + torch.rand(n, num_ops, generator=generator, dtype=torch.float64) * (high - low)
    geometric = torch.tensor([op[0] in GEOMETRIC for op in OPERATIONS])[ops]
    mirror = geometric & (torch.rand(n, num_ops, generator=generator) < 0.5)
    magnitudes = torch.where(mirror, -magnitudes, magnitudes)
    cut_length = (torch.randint(1, cutout + 1, (n,), generator=generator) if cutout
                  else torch.zeros(n, dtype=torch.long))
    cut_y = torch.randint(height, (n,), generator=generator)
    cut_x = torch.randint(width, (n,), generator=generator)
    return StrongParams(flip, ops, magnitudes, cut_length, cut_y, cut_x)


# ---- operations on float images in [0, 1], (n, C, H, W), with one magnitude per image --------------------------

def _eight_bit(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round()


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.autocontrast per channel: 8-bit values v -> int(v * 255 / (hi - lo) - lo * 255 / (hi - lo)),
    in float64 as its lookup table is computed, so that the truncation falls where PIL's does."""
    pixels = _eight_bit(images).double()
    low = pixels.amin(dim=(2, 3), keepdim=True)
    high = pixels.amax(dim=(2, 3), keepdim=True)
    spread = (high - low).clamp(min=1)
    scale = torch.full_like(spread, 255.0) / spread  # (not 255.0 / spread: torch takes the reciprocal, then multiplies)
    stretched = torch.trunc(pixels * scale + (-low * scale)).clamp(0, 255)
    return (torch.where(high > low, stretched, pixels) / 255).to(images.dtype)


def equalize_float(images: torch.Tensor) -> torch.Tensor:
    return equalize(_eight_bit(images).to(torch.uint8)).float() / 255


def equalize(images: torch.Tensor) -> torch.Tensor:
    """torchvision's equalize (uint8 images, each channel its own histogram), for the whole batch at once and without
    reading from the device (torchvision's loops over images and channels and reads twice per channel: about 440
    waits for the GPU per SCAN step). A channel's step, the sum of its histogram without its last non-zero bin, // 255,
    is (pixels - count of its largest value) // 255; step 0 leaves the channel as it is."""
    n, c, h, w = images.shape
    flat = images.reshape(n * c, h * w).long()
    histogram = torch.zeros(n * c, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(1, flat, torch.ones_like(flat))
    step = (h * w - histogram.gather(1, flat.amax(dim=1, keepdim=True))) // 255
    lut = (torch.cumsum(histogram, 1) + step // 2) // step.clamp(min=1)
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    return torch.where(step == 0, flat, lut.gather(1, flat)).to(torch.uint8).reshape(n, c, h, w)


def solarize_at(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    above = _eight_bit(images) >= threshold[:, None, None, None]
    return torch.where(above, 1 - images, images)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = (2 ** (8 - bits.floor())).to(images.dtype)[:, None, None, None]
    return torch.div(_eight_bit(images), step, rounding_mode="floor") * step / 255


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH kernel (centre 5, others 1, / 13) on the interior, border pixels unchanged."""
    channels = images.shape[1]
    kernel = torch.ones(3, 3, device=images.device, dtype=images.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(channels, 1, 3, 3)
    smooth = images.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(images, kernel, groups=channels)
    return (factor[:, None, None, None] * images + (1 - factor[:, None, None, None]) * smooth).clamp(0, 1)


def affine_matrices(names: list[str], magnitudes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 2, 3) maps from output pixel centres (x + 0.5, y + 0.5, 1) to input coordinates, as PIL's
    Image.transform(AFFINE, data) and Image.rotate (counter-clockwise by v degrees about the centre)."""
    n = len(names)
    matrices = torch.zeros(n, 2, 3, dtype=torch.float64)
    matrices[:, 0, 0] = matrices[:, 1, 1] = 1
    for i, (name, v) in enumerate(zip(names, magnitudes.tolist())):
        if name == "shear_x":
            matrices[i, 0, 1] = v
        elif name == "shear_y":
            matrices[i, 1, 0] = v
        elif name == "translate_x":
            matrices[i, 0, 2] = v * width
        elif name == "translate_y":
            matrices[i, 1, 2] = v * height
        elif name == "rotate":
            angle = -math.radians(v)
            cos, sin = math.cos(angle), math.sin(angle)
            cx, cy = width / 2, height / 2
            matrices[i] = torch.tensor([[cos, sin, cx - cos * cx - sin * cy],
                                        [-sin, cos, cy + sin * cx - cos * cy]], dtype=torch.float64)
    return matrices


def warp(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Nearest-pixel sampling of each image at its matrix's input coordinates, black outside."""
    _, _, height, width = images.shape
    device = images.device
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device) + 0.5,
                            torch.arange(width, dtype=torch.float64, device=device) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(-1, 3)
    source = points @ host_to(matrices, images).transpose(1, 2)  # (n, H*W, 2) input x, y
    col, row = source[..., 0].floor().long(), source[..., 1].floor().long()
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    flat = row.clamp(0, height - 1) * width + col.clamp(0, width - 1)
    gathered = images.flatten(2).gather(2, flat[:, None, :].expand(-1, images.shape[1], -1))
    return (gathered * inside[:, None, :]).reshape(images.shape)


def apply_operation(name: str, images: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Operation `name` on every image of `images`, image i with magnitude v[i] (on the host)."""
    v = v.to(images.dtype)  # the geometric matrices are built on the host from these rounded magnitudes
    if name in GEOMETRIC:
        return warp(images, affine_matrices([name] * len(images), v.double(), *images.shape[-2:]))
    v = host_to(v, images)
    if name == "identity":
        return images
    if name == "autocontrast":
        return autocontrast(images)
    if name == "equalize":
        return equalize_float(images)
    if name == "solarize":
        return solarize_at(images, v)
    if name == "color":
        return adjust_saturation(images, v)
    if name == "contrast":
        return adjust_contrast(images, v)
    if name == "brightness":
        return adjust_brightness(images, v)
    if name == "sharpness":
        return sharpness(images, v)
    if name == "posterize":
        return posterize(images, v)
    raise ValueError(f"unknown operation {name!r}")


def cutout(images: torch.Tensor, params: StrongParams) -> torch.Tensor:
    _, _, height, width = images.shape
    half = (params.cut_length // 2)[:, None]
    rows, cols = torch.arange(height)[None], torch.arange(width)[None]
    in_rows = (rows >= params.cut_y[:, None] - half) & (rows < params.cut_y[:, None] + half)
    in_cols = (cols >= params.cut_x[:, None] - half) & (cols < params.cut_x[:, None] + half)
    holes = host_to(in_rows[:, :, None] & in_cols[:, None, :], images)
    return images.masked_fill(holes[:, None], 0.0)


class StrongAugment:
    """uint8 batch -> normalised float strong views (one per image)."""

    def __init__(self, num_ops: int, cutout_length: int, mean, std, seed: int):
        self.num_ops, self.cutout_length, self.mean, self.std = num_ops, cutout_length, mean, std
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def sample(self, global_batch: int, height: int, width: int) -> StrongParams:
        return sample_strong(global_batch, height, width, self.num_ops, self.cutout_length, self.generator)

    def apply(self, images_uint8: torch.Tensor, params: StrongParams) -> torch.Tensor:
        images = images_uint8.float().div_(255.0)
        images = torch.where(host_to(params.flip, images)[:, None, None, None], images.flip(-1), images)
        for slot in range(params.ops.shape[1]):
            for index, (name, _, _) in enumerate(OPERATIONS):
                chosen = (params.ops[:, slot] == index).nonzero().squeeze(1)
                if len(chosen):
                    on_device = host_to(chosen, images)
                    images[on_device] = apply_operation(name, images[on_device], params.magnitudes[chosen, slot])
        return cutout(normalize(images, self.mean, self.std), params)

    def __call__(self, images_uint8: torch.Tensor, global_batch: int, offset: int) -> torch.Tensor:
        n, _, height, width = images_uint8.shape
        params = self.sample(global_batch, height, width).slice(offset, offset + n)
        return self.apply(images_uint8, params)
