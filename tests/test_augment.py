"""Batched augmentation (clusterlab.data.augment) against torchvision's tensor functions, one image at a time."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from clusterlab.data import augment
from clusterlab.data.augment import ColorSpec, CropSpec, MultiCrop
from clusterlab.data.randaugment import OPERATIONS, StrongAugment
from clusterlab.data.loader import GlobalBatches
from clusterlab.errors import ConfigError
from conftest import HostCopies

OPS = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}


def uint8_images(n, channels=3, size=20, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple, ratio: tuple = (3 / 4, 4 / 3),
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomResizedCrop boxes (top, left, h, w) for n images of one size, as training draws them: the uniforms,
    then the box rule."""
    return augment.crop_boxes(augment.draw_crop_uniforms(n, generator), height, width, scale, ratio)


def float_images(n, channels=3, size=20, seed=0) -> torch.Tensor:
    """What the pipeline works on: uint8 / 255, with some saturated pixels so clamping matters."""
    return uint8_images(n, channels, size, seed).float() / 255


# ---- colour operations, per-image factors vs torchvision -----------------------------------------------------------

@pytest.mark.parametrize("index,factors", [
    (0, [0.0, 0.5, 1.0, 1.3, 1.8, 2.5]),
    (1, [0.0, 0.5, 1.0, 1.3, 1.8, 2.5]),
    (2, [0.0, 0.5, 1.0, 1.3, 1.8, 2.5]),
    (3, [-0.5, -0.2, -0.01, 0.0, 0.13, 0.5]),
])
def test_colour_op_matches_torchvision(index, factors):
    images = float_images(len(factors), seed=index)
    ours = augment._COLOUR_OPS[index](images, torch.tensor(factors))
    reference = torch.stack([OPS[index](img, f) for img, f in zip(images, factors)])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    if index != 3:
        # Not trivially equal to the input (factor 1 / hue 0 excepted).
        assert (ours - images).abs().amax(dim=(1, 2, 3))[[0, 5]].min() > 0.1


@pytest.mark.parametrize("index,factors", [(0, [0.4, 1.7]), (1, [0.3, 1.9])])
def test_brightness_contrast_on_grey_images(index, factors):
    images = float_images(2, channels=1, seed=3)
    ours = augment._COLOUR_OPS[index](images, torch.tensor(factors))
    reference = torch.stack([OPS[index](img, f) for img, f in zip(images, factors)])
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_grey_images_pass_saturation_hue_and_greyscale_untouched():
    images = float_images(4, channels=1, seed=4)
    assert torch.equal(augment.adjust_saturation(images, torch.full((4,), 0.2)), images)
    assert torch.equal(augment.adjust_hue(images, torch.full((4,), 0.3)), images)
    assert torch.equal(augment.random_grey(images, torch.ones(4, dtype=torch.bool)), images)
    # Full jitter on grey images = brightness and contrast only, in each image's order.
    factors = torch.tensor([[1.5, 0.5, 0.1, 0.4]] * 4)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3], [2, 3, 1, 0], [3, 2, 0, 1]])
    out = augment.color_jitter(images, factors, order, torch.ones(4, dtype=torch.bool))
    for i in range(4):
        expected = images[i]
        for op in order[i].tolist():
            if op < 2:
                expected = OPS[op](expected, factors[i, op].item())
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)
    assert out.shape == images.shape


def test_greyscale_matches_torchvision():
    images = float_images(5, seed=5)
    active = torch.tensor([True, False, True, False, True])
    out = augment.random_grey(images, active)
    for i in range(5):
        expected = TF.rgb_to_grayscale(images[i], num_output_channels=3) if active[i] else images[i]
        torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)
    assert torch.equal(augment.random_grey(images, torch.zeros(5, dtype=torch.bool)), images)


def test_colour_jitter_order_is_per_image():
    # Same image, same factors, two orders: clamping after a strong brightness makes the order matter.
    image = float_images(1, seed=6)[0]
    images = image.expand(4, -1, -1, -1).contiguous()
    factors = torch.tensor([[1.8, 0.3, 1.6, 0.2]] * 4)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2], [3, 2, 1, 0], [2, 0, 3, 1]])
    active = torch.tensor([True, True, True, False])
    out = augment.color_jitter(images, factors, order, active)
    for i in range(4):
        expected = image
        if active[i]:
            for op in order[i].tolist():
                expected = OPS[op](expected, factors[i, op].item())
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    assert torch.equal(out[3], image)
    assert (out[0] - out[1]).abs().max() > 0.05 and (out[0] - out[2]).abs().max() > 0.05
    assert torch.equal(images[0], image)  # the input is not modified in place


# ---- crops ---------------------------------------------------------------------------------------------------------

def _reference_crop(image, box, size, flip):
    top, left, h, w = box.tolist()
    out = TF.resized_crop(image, top, left, h, w, [size, size], InterpolationMode.BILINEAR, antialias=False)
    return TF.hflip(out) if flip else out


@pytest.mark.parametrize("size,scale", [(16, (0.08, 1.0)), (32, (0.05, 0.3)), (7, (0.5, 1.0)), (20, (1.0, 1.0))])
def test_resized_crop_and_flip_match_torchvision(size, scale):
    # Down- and up-sampling (crops of a 20x20 image to 7, 16, 20 and 32 pixels).
    images = float_images(12, size=20, seed=7)
    generator = torch.Generator().manual_seed(size)
    boxes = sample_crop_boxes(12, 20, 20, scale, generator=generator)
    flip = torch.arange(12) % 2 == 0
    ours = augment.resized_crop(images, boxes, size, flip)
    reference = torch.stack([_reference_crop(img, b, size, f) for img, b, f in zip(images, boxes, flip)])
    assert ours.shape == (12, 3, size, size)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    unflipped = augment.resized_crop(images, boxes, size)
    torch.testing.assert_close(unflipped[1::2], ours[1::2], atol=0, rtol=0)
    torch.testing.assert_close(unflipped[0::2], ours[0::2].flip(-1), atol=1e-6, rtol=0)


def test_resized_crop_of_non_square_image_and_boxes():
    images = float_images(3, size=30, seed=8)[:, :, :, :24]  # 30 high, 24 wide
    boxes = torch.tensor([[0, 0, 30, 24], [3, 5, 11, 19], [29, 23, 1, 1]])
    ours = augment.resized_crop(images.contiguous(), boxes, 9, torch.tensor([False, True, False]))
    reference = torch.stack([_reference_crop(img, b, 9, f)
                             for img, b, f in zip(images, boxes, [False, True, False])])
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
    assert torch.allclose(ours[2], images[2, :, 29, 23][:, None, None].expand(3, 9, 9))


def blur_kernel(sigma: float, side: int) -> list[int]:
    """torchvision's kernel size for PIL's GaussianBlur(sigma): 3 sigma either side, at most the side less one."""
    reach = min(math.ceil(3 * sigma), side - 1)
    return [2 * reach + 1] * 2


@pytest.mark.parametrize("size", [16, 5])
def test_gaussian_blur_matches_torchvision_with_a_kernel_of_its_own_sigma(size):
    images = float_images(4, size=size, seed=size)
    sigma = torch.tensor([0.1, 0.7, 1.5, 2.0], dtype=torch.float64)
    active = torch.tensor([True, False, True, True])
    out = augment.gaussian_blur(images, sigma, active)
    for i in range(4):
        expected = TF.gaussian_blur(images[i], blur_kernel(sigma[i].item(), size), [sigma[i].item()] * 2) \
            if active[i] else images[i]
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
    assert (out[3] - images[3]).abs().max() > 0.05
    for i in (0, 2):  # its own kernel, whatever its batch-mates draw
        alone = augment.gaussian_blur(images[i:i + 1], sigma[i:i + 1], active[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], alone, atol=1e-6, rtol=0)
    grey = float_images(2, channels=1, size=size, seed=1)
    out = augment.gaussian_blur(grey, sigma[2:], torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(out[1], TF.gaussian_blur(grey[1], blur_kernel(2.0, size), [2.0, 2.0]), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_blur_follows_pil_at_32_px(sigma):
    """Self-Classifier's CIFAR views blur 32 px images by PIL's GaussianBlur, radius up to 2: a kernel cut at a tenth
    of the image (3 taps) left them up to 0.19 sharper than PIL's away from the border; within PIL's 8-bit rounding
    and box approximation now, on a smooth image at sigma 1 and more (below about 0.5 a sampled Gaussian barely
    blurs, where PIL's box passes keep a spread of sigma: docs/methods/selfclassifier.md)."""
    generator = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=32, mode="bilinear")
    image = (smooth[0] * 255).round().to(torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius=sigma))
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
    ours = augment.gaussian_blur(image[None].float() / 255, torch.tensor([sigma]), torch.tensor([True]))[0]
    inside = (slice(None), slice(6, 26), slice(6, 26))  # PIL repeats the edge pixel, torchvision reflects
    assert (ours - reference)[inside].abs().max() < 0.015


def test_normalize_and_eval_view():
    images = uint8_images(3, size=12, seed=9)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = augment.eval_view(images, 12, mean, std)
    expected = (images.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    resized = augment.eval_view(images, 20, mean, std)
    reference = torch.stack([TF.normalize(TF.resize(img.float() / 255, [20, 20], antialias=True), mean, std)
                             for img in images])
    torch.testing.assert_close(resized, reference, atol=1e-5, rtol=0)


# ---- crop boxes ----------------------------------------------------------------------------------------------------

def _reference_boxes(n, height, width, scale, ratio, generator, attempts=10):
    """torchvision's RandomResizedCrop.get_params per image, written out, on the same uniforms as the batched code
    (drawn in its order: area fractions, log aspects, then the top and left positions)."""
    u_area = torch.rand(n, attempts, generator=generator, dtype=torch.float64)
    u_aspect = torch.rand(n, attempts, generator=generator, dtype=torch.float64)
    u_top = torch.rand(n, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, generator=generator, dtype=torch.float64)
    boxes, fitted = [], []
    for i in range(n):
        for a in range(attempts):
            target = height * width * (scale[0] + (scale[1] - scale[0]) * u_area[i, a].item())
            log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_aspect[i, a].item())
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(u_top[i].item() * (height - h + 1))
                left = int(u_left[i].item() * (width - w + 1))
                boxes.append((top, left, h, w))
                fitted.append(True)
                break
        else:
            in_ratio = width / height
            if in_ratio < min(ratio):
                w, h = width, int(round(width / min(ratio)))
            elif in_ratio > max(ratio):
                h, w = height, int(round(height * max(ratio)))
            else:
                w, h = width, height
            boxes.append(((height - h) // 2, (width - w) // 2, h, w))
            fitted.append(False)
    return torch.tensor(boxes), torch.tensor(fitted)


@pytest.mark.parametrize("height,width,scale,ratio", [
    (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
    (96, 64, (0.14, 1.0), (3 / 4, 4 / 3)),
    (8, 8, (0.05, 0.14), (3 / 4, 4 / 3)),
    (20, 50, (0.5, 1.0), (0.5, 2.0)),
    (10, 10, (0.9, 1.0), (3.0, 4.0)),   # mostly does not fit: the fallback
])
def test_crop_boxes_follow_torchvision_rule(height, width, scale, ratio):
    n = 300
    boxes = sample_crop_boxes(n, height, width, scale, ratio, generator=torch.Generator().manual_seed(11))
    reference, fitted = _reference_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(11))
    assert boxes.dtype == torch.long and boxes.shape == (n, 4)
    assert torch.equal(boxes, reference)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # Fitted draws: area fraction in the scale range and aspect in the ratio range, up to the rounding of h and w.
    hf, wf, area = h[fitted].double(), w[fitted].double(), height * width
    assert ((hf - 0.5) * (wf - 0.5) <= scale[1] * area + 1e-9).all()
    assert ((hf + 0.5) * (wf + 0.5) >= scale[0] * area - 1e-9).all()
    assert ((wf - 0.5) / (hf + 0.5) <= ratio[1] + 1e-9).all() and ((wf + 0.5) / (hf - 0.5) >= ratio[0] - 1e-9).all()


def test_crop_boxes_distribution_matches_torchvision():
    torch.manual_seed(0)
    theirs = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(1500)], dtype=torch.float64)
    ours = sample_crop_boxes(4000, 32, 32, (0.08, 1.0), generator=torch.Generator().manual_seed(1)).double()
    for column in range(4):
        assert abs(ours[:, column].mean() - theirs[:, column].mean()) < 0.6
    frac = lambda b: (b[:, 2] * b[:, 3] / 1024).mean()  # noqa: E731
    assert abs(frac(ours) - frac(theirs)) < 0.03


def test_crop_boxes_fallback_is_the_centre_crop():
    # scale > 1 never fits: the whole (square) image, or the centre with the aspect clamped into the ratio range.
    boxes = sample_crop_boxes(5, 24, 24, (1.5, 2.0), generator=torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0, 0, 24, 24]] * 5
    wide = sample_crop_boxes(3, 20, 60, (1.5, 2.0), generator=torch.Generator().manual_seed(0))
    assert wide.tolist() == [[0, 16, 20, 27]] * 3  # w = round(20 * 4/3) = 27, left = (60 - 27) // 2
    tall = sample_crop_boxes(3, 60, 20, (1.5, 2.0), generator=torch.Generator().manual_seed(0))
    assert tall.tolist() == [[16, 0, 27, 20]] * 3  # h = round(20 / (3/4)) = 27, top = (60 - 27) // 2


def test_crop_boxes_deterministic_for_a_seed():
    draw = lambda seed: sample_crop_boxes(50, 32, 32, (0.2, 1.0),  # noqa: E731
                                                  generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


# ---- the pipeline --------------------------------------------------------------------------------------------------

CROPS = [CropSpec(2, 16, 0.3, 1.0), CropSpec(3, 8, 0.05, 0.3)]
COLOR = ColorSpec(blur_p=0.5)
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)


def _multicrop(seed=7, color=COLOR, crops=CROPS, mean=MEAN, std=STD):
    return MultiCrop(crops, color, mean, std, image_size=24, seed=seed)


@pytest.mark.parametrize("world_size", [2, 4])
def test_multicrop_does_not_depend_on_the_world_size(world_size):
    images = uint8_images(8, size=24, seed=12)
    single = _multicrop()
    ranks = [_multicrop() for _ in range(world_size)]  # one object per process, same seed
    for step in range(2):  # the generators stay in step across batches
        whole = single(images)
        assert len(whole) == 5 and [c.shape[-1] for c in whole] == [16, 16, 8, 8, 8]
        share = 8 // world_size
        parts = [m(images[r * share:(r + 1) * share], global_batch=8, offset=r * share) for r, m in enumerate(ranks)]
        for crop in range(5):
            torch.testing.assert_close(torch.cat([p[crop] for p in parts]), whole[crop], atol=1e-6, rtol=0)
    # Not degenerate: the two crops of the same size differ.
    assert (whole[0] - whole[1]).abs().max() > 0.1


def test_multicrop_uneven_last_batch_via_global_batches():
    # 10 samples, global batch 8, no drop_last: the last global batch has 2 samples spread over 4 ranks.
    data = uint8_images(10, size=24, seed=13)
    single = GlobalBatches(10, 8, 1, 0, seed=0, drop_last=False)
    ranks = [GlobalBatches(10, 8, 4, r, seed=0, drop_last=False) for r in range(4)]
    m_single, m_ranks = _multicrop(), [_multicrop() for _ in range(4)]
    for step in range(len(single)):
        idx, total, offset = single.local_indices(0, step)
        whole = m_single(data[idx], global_batch=total, offset=offset)
        outputs = []
        for batches, m in zip(ranks, m_ranks):
            idx, total, offset = batches.local_indices(0, step)
            outputs.append(m(data[idx], global_batch=total, offset=offset))
        for crop in range(5):
            torch.testing.assert_close(torch.cat([o[crop] for o in outputs]), whole[crop], atol=1e-6, rtol=0)


def test_multicrop_resume_from_state_dict():
    images = uint8_images(4, size=24, seed=14)
    m = _multicrop()
    m(images)
    state = m.state_dict()
    expected = m(images)
    other = _multicrop(seed=99)
    other.load_state_dict(state)
    for a, b in zip(other(images), expected):
        assert torch.equal(a, b)


def test_multicrop_equals_the_operations_in_order():
    images = uint8_images(6, size=24, seed=15)
    m = _multicrop(color=ColorSpec(jitter_p=0.5, grey_p=0.5, blur_p=0.5, solarize_p=0.5))
    params = m.sample(6)
    crop = m.apply(images, params[0], 16)
    x = images.float() / 255
    expected = []
    for i in range(6):
        y = _reference_crop(x[i], params[0].boxes[i], 16, bool(params[0].flip[i]))
        if params[0].jitter[i]:
            for op in params[0].order[i].tolist():
                y = OPS[op](y, params[0].factors[i, op].item())
        if params[0].grey[i]:
            y = TF.rgb_to_grayscale(y, 3)
        if params[0].blur[i]:
            y = TF.gaussian_blur(y, blur_kernel(params[0].sigma[i].item(), 16), [params[0].sigma[i].item()] * 2)
        if params[0].solarize[i]:
            y = TF.solarize(y, 0.5)
        expected.append(TF.normalize(y, MEAN, STD))
    assert params[0].solarize.any() and not params[0].solarize.all()
    torch.testing.assert_close(crop, torch.stack(expected), atol=2e-4, rtol=0)


def test_each_crop_group_takes_its_own_colour_settings():
    """BYOL's asymmetric views: view 1 always blurred and never solarised, view 2 the other way round."""
    from clusterlab.methods import DataInfo
    from clusterlab.methods.base import build_multicrop
    from clusterlab.programs.train import parse_args

    args = parse_args("pretrain", ["--dataset", "digits", "--nmb_crops", "1", "1", "--size_crops", "16", "16",
                                   "--min_scale_crops", "0.3", "0.3", "--max_scale_crops", "1", "1",
                                   "--blur_p", "1", "0", "--solarize_p", "0", "1", "--color_strength", "0.5",
                                   "--output_dir", "unused"])
    m = build_multicrop(args, DataInfo(3, 24, 100, 10, MEAN, STD))
    first, second = (crop.color for crop in m.crops)
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.0, 1.0)
    assert first.brightness == second.brightness == 0.5 * args.brightness
    view1, view2 = m.sample(8)
    assert view1.blur.all() and not view1.solarize.any() and not view2.blur.any() and view2.solarize.all()
    with pytest.raises(ConfigError, match="--grey_p .*one per crop group"):
        build_multicrop(parse_args("pretrain", ["--grey_p", "0.1", "0.2", "0.3", "--output_dir", "unused"]),
                        DataInfo(3, 24, 100, 10, MEAN, STD))
    # The strength scales the hue jitter of its group. Past 0.5 training refuses it (test_cli_errors.py); a run that
    # older code trained so still builds, for its evaluations.
    strong = parse_args("pretrain", ["--hue", "0.4", "--color_strength", "1", "2", "--nmb_crops", "1", "1",
                                     "--size_crops", "16", "16", "--min_scale_crops", "0.3", "0.3",
                                     "--max_scale_crops", "1", "1", "--output_dir", "unused"])
    hues = [crop.color.hue for crop in build_multicrop(strong, DataInfo(3, 24, 100, 10, MEAN, STD)).crops]
    assert hues == [0.4, 0.8]


def test_without_solarisation_the_random_stream_is_unchanged():
    """A pipeline that never solarises draws exactly the numbers it drew before the option existed."""
    plain, solarising = _multicrop(), _multicrop(color=ColorSpec(blur_p=0.5, solarize_p=0.3))
    plain.sample(5)
    generator = torch.Generator().manual_seed(7)
    for crop in CROPS:
        for _ in range(crop.count):
            augment.draw_crop_uniforms(5, generator)
            torch.rand(5, generator=generator), torch.rand(5, generator=generator)  # flip, jitter
            [torch.rand(5, generator=generator, dtype=torch.float64) for _ in range(4)]  # factors
            torch.rand(5, 4, generator=generator)  # order
            torch.rand(5, generator=generator), torch.rand(5, generator=generator)  # grey, blur
            torch.rand(5, generator=generator, dtype=torch.float64)  # sigma
    assert torch.equal(plain.generator.get_state(), generator.get_state())
    solarising.sample(5)
    assert not torch.equal(solarising.generator.get_state(), generator.get_state())


def test_multicrop_identity_settings_give_the_normalised_image():
    images = uint8_images(3, size=24, seed=16)
    m = MultiCrop([CropSpec(1, 24, 1.0, 1.0)], ColorSpec(jitter_p=0, grey_p=0, blur_p=0, flip_p=0), MEAN, STD, 24, 0)
    (crop,) = m(images)
    torch.testing.assert_close(crop, augment.eval_view(images, 24, MEAN, STD), atol=1e-5, rtol=0)


def test_multicrop_on_grey_images_keeps_one_channel():
    images = uint8_images(4, channels=1, size=24, seed=17)
    m = _multicrop(color=ColorSpec(jitter_p=1.0, grey_p=1.0, blur_p=0.5), mean=(0.3,), std=(0.3,))
    crops = m(images)
    assert [tuple(c.shape) for c in crops] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 3
    assert all(torch.isfinite(c).all() for c in crops)


def test_crop_specs_lengths_must_agree():
    assert augment.crop_specs([2, 6], [32, 16], [0.14, 0.05], [1.0, 0.14]) == [CropSpec(2, 32, 0.14, 1.0),
                                                                               CropSpec(6, 16, 0.05, 0.14)]
    with pytest.raises(ConfigError) as info:
        augment.crop_specs([2, 6], [32], [0.14, 0.05], [1.0, 0.14])
    assert "\n" not in str(info.value) and "--size_crops" in str(info.value)


def test_augmentation_on_a_device_neither_waits_for_it_nor_reads_from_it():
    # The meta device stands for a GPU: same dispatch, no data; parameters are drawn on the host and sent over.
    color = ColorSpec(blur_p=0.5, solarize_p=0.3)
    images = torch.empty(16, 3, 24, 24, dtype=torch.uint8, device="meta")
    strong = StrongAugment(num_ops=4, cutout_length=8, mean=MEAN, std=STD, seed=0)
    params = strong.sample(16, 24, 24)
    # torchvision's equalize counts on the device (bincount reads its maximum back): every other operation, 4 times
    names = [name for name, _, _ in OPERATIONS]
    others = torch.tensor([i for i, name in enumerate(names) if name != "equalize"])
    params.ops = others[torch.arange(16 * 4) % len(others)].view(16, 4)
    with HostCopies() as copies:
        crops = _multicrop(color=color)(images)
        strong_view = strong.apply(images, params)
    assert [c.shape[-1] for c in crops] == [16, 16, 8, 8, 8] and strong_view.shape == images.shape
    assert copies.blocking == 0 and copies.non_blocking > 50
