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


def host_to(values: torch.Tensor, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Parameters drawn on the host, on `images`' device. Non-blocking: a copy from pageable memory is staged at once
    and does not wait for the work queued on the GPU, which a blocking copy would do at every parameter of every
    crop."""
    return values.to(images.device, dtype or values.dtype, non_blocking=True)


@dataclass(frozen=True)
class ColorSpec:
    """Colour distortion of strength s: ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with probability `jitter_p`; then
    greyscale, Gaussian blur and solarisation (x -> 1 - x where x >= 0.5, as BYOL's asymmetric views use it),
    each with its own probability."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grey_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    flip_p: float = 0.5
    solarize_p: float = 0.0


@dataclass(frozen=True)
class CropSpec:
    """A group of `count` crops of one size and scale range; `color` gives the group its own colour settings
    (asymmetric views), None the pipeline's."""

    count: int
    size: int
    min_scale: float
    max_scale: float
    color: ColorSpec | None = None


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

def draw_crop_uniforms(n: int, generator: torch.Generator | None = None, attempts: int = 10) -> torch.Tensor:
    """The random numbers of n RandomResizedCrops, float64 (n, 2 * attempts + 2): per attempt an area-fraction
    uniform, then per attempt a log-aspect uniform, then the top and left position uniforms. They do not depend on
    the image, so they can be drawn before the image is decoded; `crop_boxes` turns them into boxes."""
    area = torch.rand(n, attempts, generator=generator, dtype=torch.float64)
    aspect = torch.rand(n, attempts, generator=generator, dtype=torch.float64)
    top = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    left = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    return torch.cat([area, aspect, top, left], dim=1)


def crop_boxes(uniforms: torch.Tensor, height, width, scale: tuple, ratio: tuple = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, h, w) from `draw_crop_uniforms`, torchvision's rule vectorised.

    `height` and `width` are one size for all n images or one per image. Each attempt draws an area fraction
    ~ U(scale) and a log aspect ratio ~ U(log ratio); the first attempt that fits is kept, its position uniform in
    the image; if none fits, the central crop with the aspect ratio clamped into `ratio`.
    """
    n, attempts = uniforms.shape[0], (uniforms.shape[1] - 2) // 2
    height = torch.as_tensor(height, dtype=torch.float64).expand(n)
    width = torch.as_tensor(width, dtype=torch.float64).expand(n)
    target = (height * width)[:, None] * (scale[0] + (scale[1] - scale[0]) * uniforms[:, :attempts])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * uniforms[:, attempts: 2 * attempts])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    ok = fits.any(1)
    first = fits.float().argmax(1)  # the first attempt that fits (argmax returns the first maximum)
    rows = torch.arange(n)
    h, w = h[rows, first], w[rows, first]
    # Fallback, as torchvision: whole-image box with the aspect ratio clamped into `ratio`.
    in_ratio = width / height
    too_tall, too_wide = in_ratio < ratio[0], in_ratio > ratio[1]
    fallback_w = torch.where(too_wide, torch.round(height * ratio[1]), width)
    fallback_h = torch.where(too_tall, torch.round(width / ratio[0]), height)
    h, w = torch.where(ok, h, fallback_h), torch.where(ok, w, fallback_w)
    top = torch.where(ok, torch.floor(uniforms[:, 2 * attempts] * (height - h + 1)), (height - h) // 2)
    left = torch.where(ok, torch.floor(uniforms[:, 2 * attempts + 1] * (width - w + 1)), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1).long()


@dataclass
class CropParams:
    uniforms: torch.Tensor   # (n, 22) float64: the crop's random numbers (draw_crop_uniforms)
    boxes: torch.Tensor      # (n, 4) top, left, h, w
    flip: torch.Tensor       # (n,) bool
    jitter: torch.Tensor     # (n,) bool: colour jitter applied
    factors: torch.Tensor    # (n, 4) brightness, contrast, saturation, hue
    order: torch.Tensor      # (n, 4) a permutation of 0..3 per image
    grey: torch.Tensor       # (n,) bool
    blur: torch.Tensor       # (n,) bool
    sigma: torch.Tensor      # (n,)
    solarize: torch.Tensor   # (n,) bool

    def slice(self, start: int, stop: int) -> "CropParams":
        return CropParams(*(getattr(self, f)[start:stop] for f in self.__dataclass_fields__))

    def take(self, indices: torch.Tensor) -> "CropParams":
        return CropParams(*(getattr(self, f)[indices] for f in self.__dataclass_fields__))


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def sample_params(n: int, image_size: int, crop: CropSpec, color: ColorSpec,
                  generator: torch.Generator | None = None) -> CropParams:
    uniforms = draw_crop_uniforms(n, generator)
    boxes = crop_boxes(uniforms, image_size, image_size, (crop.min_scale, crop.max_scale))
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
    # drawn only when used, so the random stream of a pipeline without solarisation is what it always was
    solarize = (torch.rand(n, generator=generator) < color.solarize_p if color.solarize_p > 0
                else torch.zeros(n, dtype=torch.bool))
    return CropParams(uniforms, boxes, flip, jitter, factors, order, grey, blur, sigma, solarize)


# ---- operations (float images in [0, 1], shape (n, C, H, W)) --------------------------------------------------------

def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Bilinear resize of each box to size x size, sampling points clamped inside the box (no antialias)."""
    n, _, height, width = images.shape
    boxes = host_to(boxes, images, torch.float64)
    top, left, h, w = boxes.unbind(1)
    steps = torch.arange(size, device=images.device, dtype=torch.float64) + 0.5
    ys = (top[:, None] + (steps[None] * h[:, None] / size - 0.5).clamp(min=0).minimum(h[:, None] - 1))
    xs = (left[:, None] + (steps[None] * w[:, None] / size - 0.5).clamp(min=0).minimum(w[:, None] - 1))
    if flip is not None:
        xs = torch.where(host_to(flip, images)[:, None], xs.flip(1), xs)
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
    factors = host_to(factors, images, images.dtype)
    # Rows are chosen on the host, where the parameters are drawn: on a GPU, no synchronisation per operation.
    order, active = order.cpu(), active.cpu()
    for position in range(4):
        for op_index, op in enumerate(_COLOUR_OPS):
            chosen = active & (order[:, position] == op_index)
            if chosen.any():
                rows = host_to(chosen.nonzero().squeeze(1), images)
                out[rows] = op(out[rows], factors[rows, op_index])
    return out


def random_grey(images, active):
    if images.shape[1] == 1 or not active.any():
        return images
    grey = to_grey(images).expand_as(images)
    return torch.where(host_to(active, images)[:, None, None, None], grey, images)


def gaussian_blur(images, sigma, active):
    """Per-image Gaussian blur of the `active` images, as PIL's GaussianBlur(radius=sigma) of the upstream pipelines:
    no fixed kernel size, each image's kernel reaching ceil(3 sigma) pixels either side (99.7 % of the Gaussian's
    mass; at most the image's side less one), so that an image's blur depends on its own sigma alone, not on the
    batch it is drawn with. Separable, reflect padding: torchvision's gaussian_blur with kernel 2 ceil(3 sigma) + 1
    (a sampled Gaussian, which below sigma 0.5 blurs less than PIL's box passes)."""
    if not active.any():
        return images
    n, channels, height, width = images.shape
    reach = torch.ceil(3 * sigma.double()).clamp(1, min(height, width) - 1)
    half = int(reach[active].max())
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    kernels = torch.exp(-0.5 * (x[None] / sigma.double()[:, None]) ** 2) * (x.abs()[None] <= reach[:, None])
    kernels = host_to((kernels / kernels.sum(1, keepdim=True)).to(images.dtype), images)
    flat = images.reshape(1, n * channels, height, width)
    weight = kernels.repeat_interleave(channels, dim=0)
    flat = F.pad(flat, (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, weight[:, None, None, :], groups=n * channels)
    flat = F.conv2d(flat, weight[:, None, :, None], groups=n * channels)
    blurred = flat.reshape(images.shape)
    return torch.where(host_to(active, images)[:, None, None, None], blurred, images)


def solarize(images, active):
    """x -> 1 - x where x >= 0.5, on the `active` images (torchvision's solarize with threshold 0.5)."""
    if not active.any():
        return images
    flipped = torch.where(images >= 0.5, 1.0 - images, images)
    return torch.where(host_to(active, images)[:, None, None, None], flipped, images)


def normalize(images, mean, std):
    mean = host_to(torch.as_tensor(mean, dtype=images.dtype), images).view(1, -1, 1, 1)
    std = host_to(torch.as_tensor(std, dtype=images.dtype), images).view(1, -1, 1, 1)
    return (images - mean) / std


# ---- the pipeline --------------------------------------------------------------------------------------------------

@dataclass
class CutCrops:
    """One step's crops as the loader workers cut them from image files, for `MultiCrop.__call__`.

    `crops[i]`: uint8 (n, C, size, size), crop i of the pipeline already cut and resized; `params[i]`: its
    parameters, this rank's slice, with the boxes in each image's own pixels; `generator_state`: the augmentation
    generator's state once this step's parameters were drawn. The main process draws them ahead of the training
    loop (the workers need them before the step); the generator takes this state when the crops are used, so a
    checkpoint written after the step holds the state an uninterrupted run would have.
    """

    crops: list
    params: list
    generator_state: torch.Tensor


class MultiCrop:
    """uint8 batch -> list of normalised float crops, `sum(count)` of them, in the order of `crops`."""

    def __init__(self, crops: list[CropSpec], color: ColorSpec, mean, std, image_size: int, seed: int):
        self.crops, self.color, self.mean, self.std, self.image_size = crops, color, mean, std, image_size
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_crops(self) -> int:
        return sum(c.count for c in self.crops)

    @property
    def each_crop(self) -> list[CropSpec]:
        """One CropSpec per output crop, in output order."""
        return [crop for crop in self.crops for _ in range(crop.count)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def sample(self, global_batch: int, generator: torch.Generator | None = None) -> list[CropParams]:
        """Parameters of every crop of every sample of the global batch (same on all ranks), from `generator`
        (default: this pipeline's own)."""
        generator = generator or self.generator
        return [sample_params(global_batch, self.image_size, crop, crop.color or self.color, generator)
                for crop in self.each_crop]

    def apply(self, images_uint8: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
        """Crop, resize and flip whole images (in-memory sets), then the colour operations."""
        images = images_uint8.float().div_(255.0)
        return self.finish(resized_crop(images, params.boxes, size, params.flip), params)

    def apply_cut(self, crops_uint8: torch.Tensor, params: CropParams) -> torch.Tensor:
        """Flip crops the loader workers already cut and resized (image files), then the colour operations. The
        workers' crops are channels-last views of their (n, size, size, C) arrays; the float copy is laid out as
        torch's default (C, H, W) order, as in-memory sets' crops are: with channels-last inputs torch's oneDNN
        convolution backward on the CPU (torch 2.14) crashed the process (a segmentation fault) from 48 px crops
        on, and a (n, 1, H, W) view keeps channels-last strides through .contiguous()."""
        crops = crops_uint8.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        flip = host_to(params.flip, crops)[:, None, None, None]
        return self.finish(torch.where(flip, crops.flip(-1), crops), params)

    def finish(self, crops: torch.Tensor, params: CropParams) -> torch.Tensor:
        """Colour jitter, greyscale, blur, solarisation and normalisation of float crops (each operation only
        where its draw says so)."""
        crops = color_jitter(crops, params.factors, params.order, params.jitter)
        crops = random_grey(crops, params.grey)
        crops = gaussian_blur(crops, params.sigma, params.blur)
        crops = solarize(crops, params.solarize)
        return normalize(crops, self.mean, self.std)

    def __call__(self, images: torch.Tensor | CutCrops, global_batch: int | None = None, offset: int = 0
                 ) -> list[torch.Tensor]:
        """Crops of this rank's `images`, which are samples offset..offset+n of a global batch; or the crops the
        workers cut (CutCrops), whose parameters were drawn from this pipeline's generator ahead of the step."""
        if isinstance(images, CutCrops):
            self.generator.set_state(images.generator_state)
            return [self.apply_cut(crops, params) for crops, params in zip(images.crops, images.params)]
        n = images.shape[0]
        all_params = self.sample(global_batch or n)
        return [self.apply(images, p.slice(offset, offset + n), crop.size)
                for p, crop in zip(all_params, self.each_crop)]


@dataclass(frozen=True)
class EvalView:
    """The test view. Image files: the shorter side resized to `resize`, then the centre `crop` x `crop`
    (torchvision's Resize(resize) then CenterCrop(crop); ImageNet: 256 then 224), cut by the loader workers.
    In-memory sets: the whole image resized to `crop` (`eval_view`; `resize` does not apply)."""

    crop: int
    resize: int

    @classmethod
    def of(cls, crop: int, resize: int = 0) -> "EvalView":
        """`resize` 0: the crop size (a square image is then seen whole)."""
        resize = resize or crop
        if resize < crop:
            raise ConfigError(f"--eval_resize {resize} is smaller than the evaluation crop {crop} (--eval_crop, "
                              f"default the largest --size_crops): use a resize of at least {crop}")
        return cls(crop, resize)


# A crop or test view above this many times the images' size is a slip of the keyboard (--eval_crop 2240).
MAX_UPSCALE = 8


def refuse_oversized(sizes: dict[str, int], image_size: int) -> None:
    """Refuse crops and test views (flag: size) above MAX_UPSCALE x the images' (nominal) size: a batch of them ran
    out of memory, with a traceback or, killed by the kernel, without a word."""
    limit = MAX_UPSCALE * image_size
    for flag, size in sizes.items():
        if size > limit:
            raise ConfigError(f"{flag} {size}: more than {MAX_UPSCALE} times the images' {image_size} px; give at "
                              f"most {limit}")


def resized(images_uint8: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels in [0, 1], the whole image resized to `size` (if it differs)."""
    images = images_uint8.float().div_(255.0)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images


def eval_view(images_uint8: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """The test transform: the whole image resized to `size` (if it differs), normalised."""
    return normalize(resized(images_uint8, size), mean, std)
