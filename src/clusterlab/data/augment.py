"""Batched image augmentation on the training device, with random parameters drawn for the global batch.

SwAV's multi-crop (and the NPID / Super-AND / Self-Classifier pipelines, which are special cases of it) applied to
a whole uint8 batch at once: per crop a RandomResizedCrop with its own size and scale range, a horizontal flip,
colour jitter with probability p (brightness, contrast, saturation, hue in a random order per image, as
torchvision's ColorJitter), random greyscale and an optional Gaussian blur, then normalisation.

Why batched: per-image PIL transforms cap a GPU at a few thousand crops per second and dominate CPU time on
small images. Why parameters for the global batch: every rank draws the parameters of all samples of the global
batch from the same generator and keeps its own slice, so the crops a sample gets do not depend on the world
size and the generators of all ranks stay in step (one state to checkpoint).

Each operation equals its torchvision tensor counterpart for the same parameters (tests check this): the crop
is bilinear resizing of the crop box without antialiasing (torchvision's `resize(..., antialias=False)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

GREY_WEIGHTS = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class CropSpec:
    count: int
    size: int
    min_scale: float
    max_scale: float


@dataclass(frozen=True)
class ColorSpec:
    """Colour distortion of strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with probability `jitter_p`."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    flip_p: float = 0.5


def crop_specs(nmb_crops, size_crops, min_scale_crops, max_scale_crops) -> list[CropSpec]:
    lengths = {len(nmb_crops), len(size_crops), len(min_scale_crops), len(max_scale_crops)}
    if len(lengths) != 1:
        raise ConfigError(f"--nmb_crops {nmb_crops}, --size_crops {size_crops}, --min_scale_crops {min_scale_crops} "
                         f"and --max_scale_crops {max_scale_crops} must have the same length")
    for lo, hi in zip(min_scale_crops, max_scale_crops):
        if not 0 < lo <= hi:
            raise ConfigError(f"--min_scale_crops {min_scale_crops} and --max_scale_crops {max_scale_crops}: each "
                              f"range needs 0 < min <= max")
    return [CropSpec(int(n), int(s), float(lo), float(hi))
            for n, s, lo, hi in zip(nmb_crops, size_crops, min_scale_crops, max_scale_crops)]


# ---- parameters ----------------------------------------------------------------------------------------------------

def sample_crop_boxes(n: int, height: int, width: int, scale: tuple, ratio: tuple = (3 / 4, 4 / 3),
                      generator: torch.Generator | None = None, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, h, w) for n images, torchvision's rule vectorised.

    Up to `attempts` draws of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio); the first draw that
    fits is kept, else the central crop with the aspect ratio clamped to `ratio`.
    """
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=generator,
                                                                    dtype=torch.float64))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, attempts, generator=generator, dtype=torch.float64))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(n, dtype=torch.long))
    rows = torch.arange(n)
    h, w, ok = h[rows, first].long(), w[rows, first].long(), fits.any(1)
    # Fallback, as torchvision: whole-image box with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fb_h, fb_w = height, int(round(height * ratio[1]))
    else:
        fb_w, fb_h = width, height
    h = torch.where(ok, h, torch.full_like(h, fb_h))
    w = torch.where(ok, w, torch.full_like(w, fb_w))
    u_top = torch.rand(n, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, generator=generator, dtype=torch.float64)
    top = torch.where(ok, torch.floor(u_top * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(ok, torch.floor(u_left * (width - w + 1)).long(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


@dataclass
class CropParams:
    boxes: torch.Tensor      # (n, 4) top, left, h, w
    flip: torch.Tensor       # (n,) bool
    jitter: torch.Tensor     # (n,) bool: colour jitter applied
    factors: torch.Tensor    # (n, 4) brightness, contrast, saturation, hue
    order: torch.Tensor      # (n, 4) a permutation of 0..3 per image
    grey: torch.Tensor       # (n,) bool
    blur: torch.Tensor       # (n,) bool
    sigma: torch.Tensor      # (n,)

    def slice(self, start: int, stop: int) -> "CropParams":
        return CropParams(*(getattr(self, f)[start:stop] for f in self.__dataclass_fields__))


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_params(n: int, image_size: int, crop: CropSpec, color: ColorSpec,
                  generator: torch.Generator | None = None) -> CropParams:
    boxes = sample_crop_boxes(n, image_size, image_size, (crop.min_scale, crop.max_scale), generator=generator)
    flip = torch.rand(n, generator=generator) < color.flip_p
    jitter = torch.rand(n, generator=generator) < color.jitter_p
    factors = torch.stack([
        _uniform(n, max(0.0, 1 - color.brightness), 1 + color.brightness, generator),
        _uniform(n, max(0.0, 1 - color.contrast), 1 + color.contrast, generator),
        _uniform(n, max(0.0, 1 - color.saturation), 1 + color.saturation, generator),
        _uniform(n, -color.hue, color.hue, generator),
    ], dim=1)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    grey = torch.rand(n, generator=generator) < color.grey_p
    blur = torch.rand(n, generator=generator) < color.blur_p
    sigma = _uniform(n, color.blur_sigma[0], color.blur_sigma[1], generator)
    return CropParams(boxes, flip, jitter, factors, order, grey, blur, sigma)


# ---- operations (float images in [0, 1], shape (n, C, H, W)) --------------------------------------------------------

def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Bilinear resize of each box to size x size, sampling points clamped inside the box (no antialias)."""
    n, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float64)
    top, left, h, w = boxes.unbind(1)
    steps = torch.arange(size, device=images.device, dtype=torch.float64) + 0.5
    ys = (top[:, None] + (steps[None] * h[:, None] / size - 0.5).clamp(min=0).minimum(h[:, None] - 1))
    xs = (left[:, None] + (steps[None] * w[:, None] / size - 0.5).clamp(min=0).minimum(w[:, None] - 1))
    if flip is not None:
        xs = torch.where(flip.to(images.device)[:, None], xs.flip(1), xs)
    grid_y = ((2 * ys + 1) / height - 1)[:, :, None].expand(n, size, size)
    grid_x = ((2 * xs + 1) / width - 1)[:, None, :].expand(n, size, size)
    grid = torch.stack([grid_x, grid_y], dim=-1).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_grey(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, one channel."""
    if images.shape[1] == 1:
        return images
    r, g, b = images.unbind(1)
    return (GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(images, other, factor):
    return (factor * images + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(images, factor):
    return _blend(images, torch.zeros_like(images), factor[:, None, None, None])


def adjust_contrast(images, factor):
    mean = to_grey(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor[:, None, None, None])


def adjust_saturation(images, factor):
    if images.shape[1] == 1:
        return images
    return _blend(images, to_grey(images), factor[:, None, None, None])


def _rgb_to_hsv(images):
    r, g, b = images.unbind(1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    equal = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(equal, ones, maxc)
    cr_divisor = torch.where(equal, ones, cr)
    rc, gc, bc = (maxc - r) / cr_divisor, (maxc - g) / cr_divisor, (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _hsv_to_rgb(images):
    h, s, v = images.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int32) % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    mask = i.unsqueeze(1) == torch.arange(6, device=i.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=1)
    a2 = torch.stack((t, v, v, q, p, p), dim=1)
    a3 = torch.stack((p, p, t, v, v, q), dim=1)
    a4 = torch.stack((a1, a2, a3), dim=1)
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask.to(images.dtype), a4)


def adjust_hue(images, factor):
    if images.shape[1] == 1:
        return images
    hsv = _rgb_to_hsv(images)
    hue = torch.remainder(hsv[:, 0] + factor[:, None, None], 1.0)
    return _hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))


_COLOUR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(images, factors, order, active):
    """Apply the four adjustments to the `active` images, each image in its own order."""
    out = images.clone()
    factors = factors.to(images.device, images.dtype)
    # Rows are chosen on the host, where the parameters are drawn: on a GPU, no synchronisation per operation.
    order, active = order.cpu(), active.cpu()
    for position in range(4):
        for op_index, op in enumerate(_COLOUR_OPS):
            chosen = active & (order[:, position] == op_index)
            if chosen.any():
                rows = chosen.nonzero().squeeze(1).to(images.device)
                out[rows] = op(out[rows], factors[rows, op_index])
    return out


def random_grey(images, active):
    if images.shape[1] == 1 or not active.any():
        return images
    grey = to_grey(images).expand_as(images)
    return torch.where(active.to(images.device)[:, None, None, None], grey, images)


def gaussian_blur(images, sigma, active, kernel_size: int):
    """Per-image Gaussian blur (separable, reflect padding) of the `active` images."""
    if not active.any():
        return images
    n, channels, _, _ = images.shape
    half = kernel_size // 2
    x = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (x[None] / sigma.to(images.device, images.dtype)[:, None]) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)
    flat = images.reshape(1, n * channels, *images.shape[2:])
    weight = kernels.repeat_interleave(channels, dim=0)
    flat = F.pad(flat, (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, weight[:, None, None, :], groups=n * channels)
    flat = F.conv2d(flat, weight[:, None, :, None], groups=n * channels)
    blurred = flat.reshape(images.shape)
    return torch.where(active.to(images.device)[:, None, None, None], blurred, images)


def normalize(images, mean, std):
    mean = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


# ---- the pipeline --------------------------------------------------------------------------------------------------

class MultiCrop:
    """uint8 batch -> list of normalised float crops, `sum(count)` of them, in the order of `crops`."""

    def __init__(self, crops: list[CropSpec], color: ColorSpec, mean, std, image_size: int, seed: int):
        self.crops, self.color, self.mean, self.std, self.image_size = crops, color, mean, std, image_size
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_crops(self) -> int:
        return sum(c.count for c in self.crops)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def sample(self, global_batch: int) -> list[CropParams]:
        """Parameters of every crop of every sample of the global batch (same on all ranks)."""
        return [sample_params(global_batch, self.image_size, crop, self.color, self.generator)
                for crop in self.crops for _ in range(crop.count)]

    def apply(self, images_uint8: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
        images = images_uint8.float().div_(255.0)
        crops = resized_crop(images, params.boxes, size, params.flip)
        crops = color_jitter(crops, params.factors, params.order, params.jitter)
        crops = random_grey(crops, params.grey)
        if self.color.blur_p > 0:
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
            crops = gaussian_blur(crops, params.sigma, params.blur, kernel)
        return normalize(crops, self.mean, self.std)

    def __call__(self, images_uint8: torch.Tensor, global_batch: int | None = None, offset: int = 0
                 ) -> list[torch.Tensor]:
        """Crops of this rank's `images_uint8`, which are samples offset..offset+n of a global batch."""
        n = images_uint8.shape[0]
        all_params = self.sample(global_batch or n)
        sizes = [crop.size for crop in self.crops for _ in range(crop.count)]
        return [self.apply(images_uint8, p.slice(offset, offset + n), s) for p, s in zip(all_params, sizes)]


def eval_view(images_uint8: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """The test transform: the whole image resized to `size` (if it differs), normalised."""
    images = images_uint8.float().div_(255.0)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(images, mean, std)
