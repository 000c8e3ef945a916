"""Tests of gpu_augment (the --gpu_aug device-side augmentation), all on the CPU."""

import math
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip('kornia')

from supcon.data.gpu_augment import DeviceAugment, MultiCropAugment, to_uint8_tensor  # noqa: E402
from supcon.data.sampling import mix_seed  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _batch(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _unnormalise(out):
    return out * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (ties handled exactly)."""
    a, b = torch.sort(a.double())[0], torch.sort(b.double())[0]
    points = torch.cat([a, b]).unique()
    cdf_a = torch.searchsorted(a, points, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, points, right=True).double() / len(b)
    return (cdf_a - cdf_b).abs().max().item()


def _ks_critical(n, m, alpha=0.001):
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def _within_binomial(count, n, p, sigmas=4.5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def _boxes(params):
    """(scale, ratio) of the crop boxes kornia drew, relative to the input's area."""
    src = params['crop']['src']  # [B, 4, 2] corners (x, y), inclusive
    w = src[:, 1, 0] - src[:, 0, 0] + 1
    h = src[:, 2, 1] - src[:, 1, 1] + 1
    return w, h


# --------------------------------------------------------------------------- shape, dtype, values


@pytest.mark.parametrize('kind,views', [('supcon', 2), ('ce', 1)])
def test_shape_dtype_device(kind, views):
    aug = DeviceAugment(24, MEAN, STD, kind)
    out = aug(_batch(5, 32), seed=1)
    assert out.shape == (views * 5, 3, 24, 24)
    assert out.dtype == torch.float32 and out.device.type == 'cpu'
    assert len(aug.last_params) == views
    assert aug(_batch(0), seed=1).shape == (0, 3, 24, 24)


def test_constant_image_is_normalised():
    values = torch.tensor([0, 37, 128, 200, 255], dtype=torch.uint8)
    images = values.view(-1, 1, 1, 1).expand(-1, 3, 32, 32).clone()
    images[:, 1] = 255 - images[:, 1]
    expected = (
        images[:, :, :1, :1].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(STD).view(1, 3, 1, 1)
    for aug in (
        DeviceAugment(32, MEAN, STD, 'ce'),
        DeviceAugment(16, MEAN, STD, 'supcon', jitter_p=0, gray_p=0),
    ):
        out = aug(images, seed=3)
        ref = expected.repeat(aug.views, 1, 1, 1).expand_as(out)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_rejects_bad_input():
    aug = DeviceAugment(8, MEAN, STD, 'ce')
    with pytest.raises(TypeError):
        aug(_batch(2).float(), seed=0)
    with pytest.raises(ValueError):
        aug(_batch(2)[:, :1], seed=0)
    with pytest.raises(ValueError):
        DeviceAugment(8, MEAN, STD, 'simclr')
    with pytest.raises(ValueError):
        DeviceAugment(8, MEAN[:2], STD, 'ce')


# --------------------------------------------------------------------------- randomness and seeds


def test_same_seed_same_output_and_global_rng_untouched():
    aug = DeviceAugment(32, MEAN, STD, 'supcon')
    images = _batch(16)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = aug(images, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    second = aug(images, seed=7)
    assert torch.equal(first, second)
    assert not torch.equal(first, aug(images, seed=8))
    assert torch.equal(torch.get_rng_state(), state)
    # a fresh module gives the same result: the seed alone fixes the draw
    assert torch.equal(first, DeviceAugment(32, MEAN, STD, 'supcon')(images, seed=7))
    # huge and negative seeds are accepted
    assert aug(images, seed=2**70 + 5).shape == first.shape
    assert aug(images, seed=-3).shape == first.shape


def test_the_one_seed_mixer_gives_distinct_device_augment_seeds():
    seeds = {
        mix_seed('gpu_aug', 0, epoch, step, rank)
        for epoch in range(3)
        for step in range(20)
        for rank in range(4)
    }
    assert len(seeds) == 3 * 20 * 4
    assert mix_seed('gpu_aug', 5, 1, 2, 3) == mix_seed('gpu_aug', 5, 1, 2, 3)
    assert all(0 <= s < 2**63 for s in seeds)


def test_identical_images_get_different_crops_and_views_differ():
    image = _batch(1, 32, seed=5)
    images = image.expand(8, -1, -1, -1).contiguous()
    out = DeviceAugment(32, MEAN, STD, 'ce')(images, seed=11)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.equal(out[i], out[j]), (i, j)
    aug = DeviceAugment(32, MEAN, STD, 'supcon')
    views = aug(images, seed=11)
    view0, view1 = views[:8], views[8:]
    for i in range(8):
        assert not torch.equal(view0[i], view1[i])
    # per-image colour parameters too
    factors = aug.last_params[0]['jitter']['brightness_factor']
    assert len(set(factors.tolist())) == 8


def test_views_are_view_major():
    """Row b of the output is view 0 of image b, row B + b view 1 of image b."""
    # constant images, one value each, no colour: every view of image b stays that constant
    values = torch.arange(0, 250, 31, dtype=torch.uint8)
    images = values.view(-1, 1, 1, 1).expand(-1, 3, 20, 20).contiguous()
    out = DeviceAugment(16, MEAN, STD, 'supcon', jitter_p=0, gray_p=0)(images, seed=2)
    pixel = _unnormalise(out)[:, 0, 0, 0]
    expected = torch.cat([values, values]).float() / 255
    torch.testing.assert_close(pixel, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- distributions


def test_crop_scale_and_ratio_match_torchvision():
    from torchvision.transforms import RandomResizedCrop

    n, side = 2000, 32
    aug = DeviceAugment(side, MEAN, STD, 'ce')
    aug(torch.zeros(n, 3, side, side, dtype=torch.uint8), seed=123)
    w, h = _boxes(aug.last_params[0])
    assert (w >= 1).all() and (w <= side).all() and (h >= 1).all() and (h <= side).all()
    ours_scale, ours_ratio = (w * h).double() / side**2, w.double() / h.double()

    torch.manual_seed(321)
    image = torch.zeros(3, side, side)
    boxes = [
        RandomResizedCrop.get_params(image, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
        for _ in range(n)
    ]
    tv_h = torch.tensor([b[2] for b in boxes], dtype=torch.float64)
    tv_w = torch.tensor([b[3] for b in boxes], dtype=torch.float64)
    tv_scale, tv_ratio = tv_w * tv_h / side**2, tv_w / tv_h

    critical = _ks_critical(n, n)
    assert _ks_statistic(ours_scale, tv_scale) < critical
    assert _ks_statistic(ours_ratio, tv_ratio) < critical
    # and the KS check has teeth: torchvision's default scale (0.08, 1) is told apart
    other = [
        RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
        for _ in range(n)
    ]
    other_scale = torch.tensor([b[2] * b[3] / side**2 for b in other], dtype=torch.float64)
    assert _ks_statistic(ours_scale, other_scale) > critical


def test_crop_position_is_uniform_over_the_valid_range():
    n, side = 2000, 32
    aug = DeviceAugment(side, MEAN, STD, 'ce')
    aug(torch.zeros(n, 3, side, side, dtype=torch.uint8), seed=5)
    src = aug.last_params[0]['crop']['src']
    w, h = _boxes(aug.last_params[0])
    x0, y0 = src[:, 0, 0], src[:, 0, 1]
    assert (x0 >= 0).all() and (x0 + w <= side).all() and (y0 >= 0).all() and (y0 + h <= side).all()
    # relative start position (start + 0.5) / (free + 1) is uniform on (0, 1)
    rel = (x0 + 0.5) / (side - w + 1)
    assert abs(rel.mean().item() - 0.5) < 0.03


def test_colour_jitter_grayscale_and_flip_rates():
    n = 1000
    # constant colourful images: crop and flip leave them unchanged, so every change is colour
    g = torch.Generator().manual_seed(0)
    colours = torch.randint(40, 216, (n, 3), generator=g, dtype=torch.uint8)
    colours[:, 0] = 30  # keep each image clearly coloured
    colours[:, 2] = 220
    images = colours.view(n, 3, 1, 1).expand(-1, -1, 16, 16).contiguous()
    aug = DeviceAugment(16, MEAN, STD, 'supcon')
    out = _unnormalise(aug(images, seed=99))
    pixel = out[:, :, 0, 0]
    torch.testing.assert_close(out, pixel[:, :, None, None].expand_as(out), atol=1e-5, rtol=0)
    source = (colours.float() / 255).repeat(2, 1)

    jitter = torch.cat([p['jitter']['batch_prob'] for p in aug.last_params]).bool()
    gray = torch.cat([p['gray']['batch_prob'] for p in aug.last_params]).bool()
    flip = torch.cat([p['flip']['batch_prob'] for p in aug.last_params]).bool()
    total = 2 * n
    assert _within_binomial(int(jitter.sum()), total, 0.8)
    assert _within_binomial(int(gray.sum()), total, 0.2)
    assert _within_binomial(int(flip.sum()), total, 0.5)

    # the recorded gates are what happened to the pixels
    changed = (pixel - source).abs().amax(1) > 1e-4
    is_gray = (pixel.amax(1) - pixel.amin(1)) < 1e-5
    assert torch.equal(is_gray, gray)
    assert torch.equal(changed[~gray], jitter[~gray])

    for view in aug.last_params:
        params = view['jitter']
        for key in ('brightness_factor', 'contrast_factor', 'saturation_factor'):
            assert params[key].min() >= 0.6 and params[key].max() <= 1.4, key
            assert params[key].max() - params[key].min() > 0.7, key  # spread over the range
        hue = params['hue_factor']
        assert hue.min() >= -0.1 and hue.max() <= 0.1 and hue.max() - hue.min() > 0.18
        assert sorted(params['order'].tolist()) == [0, 1, 2, 3]


def test_jitter_follows_torchvision_formulas():
    """With the factors kornia drew, torchvision's tensor functions give the same image."""
    import torchvision.transforms.functional as TF

    images = _batch(6, 16, seed=4)
    aug = DeviceAugment(
        16, MEAN, STD, 'supcon', jitter_p=1.0, gray_p=0, scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    out = _unnormalise(aug(images, seed=21))[:6]
    params = aug.last_params[0]
    names = ('brightness', 'contrast', 'saturation', 'hue')
    functions = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    flips = params['flip']['batch_prob'].bool()
    for i in range(6):
        ref = images[i].float() / 255
        if flips[i]:
            ref = ref.flip(-1)
        for k in params['jitter']['order'].tolist():
            ref = functions[k](ref, params['jitter'][f'{names[k]}_factor'][i].item())
        torch.testing.assert_close(out[i], ref, atol=2e-4, rtol=0)


def test_flip_reverses_a_horizontal_ramp():
    n = 400
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).view(1, 1, 1, 32)
    images = ramp.expand(n, 3, 32, -1).contiguous()
    aug = DeviceAugment(32, MEAN, STD, 'ce')
    out = _unnormalise(aug(images, seed=8))[:, 0, 0]
    flipped = out[:, 0] > out[:, -1]
    assert torch.equal(flipped, aug.last_params[0]['flip']['batch_prob'].bool())
    assert _within_binomial(int(flipped.sum()), n, 0.5)


def test_ce_kind_has_no_colour_change():
    g = torch.Generator().manual_seed(1)
    gray = torch.randint(0, 256, (32, 1, 24, 24), dtype=torch.uint8, generator=g).expand(
        -1, 3, -1, -1
    )
    aug = DeviceAugment(20, MEAN, STD, 'ce')
    out = _unnormalise(aug(gray.contiguous(), seed=4))
    assert out.shape == (32, 3, 20, 20)
    torch.testing.assert_close(out[:, 1], out[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, 2], out[:, 0], atol=1e-5, rtol=0)
    assert set(aug.last_params[0]) == {'crop', 'flip'}
    # values stay within the source image's range (no brightness/contrast change)
    assert out.min() >= -1e-5 and out.max() <= 1 + 1e-5


def test_full_crop_is_the_identity():
    """scale=ratio=1 keeps the whole image; without a flip the output is the input."""
    images = _batch(8, 16, seed=9)
    aug = DeviceAugment(16, MEAN, STD, 'ce', scale=(1.0, 1.0), ratio=(1.0, 1.0))
    out = _unnormalise(aug(images, seed=0))
    flips = aug.last_params[0]['flip']['batch_prob'].bool()
    ref = images.float() / 255
    ref[flips] = ref[flips].flip(-1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_slice_mode_matches_torchvision_resized_crop():
    import torchvision.transforms.functional as TF

    images = _batch(6, 32, seed=2)
    aug = DeviceAugment(32, MEAN, STD, 'ce', cropping_mode='slice')
    out = _unnormalise(aug(images, seed=6))
    src = aug.last_params[0]['crop']['src'].long()
    flips = aug.last_params[0]['flip']['batch_prob'].bool()
    for i in range(6):
        x0, y0 = src[i, 0].tolist()
        x1, y1 = src[i, 2].tolist()
        ref = TF.resized_crop(
            images[i].float() / 255, y0, x0, y1 - y0 + 1, x1 - x0 + 1, [32, 32], antialias=True
        )
        if flips[i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- loader side


def test_to_uint8_tensor():
    from PIL import Image

    array = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    tensor = to_uint8_tensor()(Image.fromarray(array))
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 30, 40)
    assert torch.equal(tensor, torch.from_numpy(array).permute(2, 0, 1))
    resized = to_uint8_tensor(16)(Image.fromarray(array))
    assert resized.shape == (3, 16, 16) and resized.is_contiguous()
    gray = to_uint8_tensor(8)(Image.fromarray(array[..., 0]))  # mode 'L' -> RGB
    assert gray.shape == (3, 8, 8) and torch.equal(gray[0], gray[1])
    assert to_uint8_tensor()(array).shape == (3, 30, 40)
    transform = pickle.loads(pickle.dumps(to_uint8_tensor(12)))  # picklable for workers
    assert transform(Image.fromarray(array)).shape == (3, 12, 12)
    # a batch from the loader goes straight into the augmentation
    batch = torch.stack([to_uint8_tensor(16)(Image.fromarray(array)) for _ in range(3)])
    assert DeviceAugment(16, MEAN, STD, 'supcon')(batch, seed=0).shape == (6, 3, 16, 16)


def test_crop_scale_bounds_the_full_and_the_small_crops_areas():
    n, side = 500, 32
    aug = MultiCropAugment(side, MEAN, STD, views=2, small_views=2, small_size=16, crop_scale=0.6)
    aug(torch.zeros(n, 3, side, side, dtype=torch.uint8), seed=9)
    for part, low, high in ((aug.full, 0.6, 1.0), (aug.small, 0.05, 0.6)):
        for params in part.last_params:
            w, h = _boxes(params)
            area = (w * h).double() / side**2
            # integer boxes round each side by at most half a pixel
            slack = (w + h).double() / side**2
            assert (area >= low - slack).all() and (area <= high + slack).all()
            assert area.min() < low + 0.1 and area.max() > high - 0.1  # the range is used
