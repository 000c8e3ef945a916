"""Transforms and --aug: shapes, normalisation, the reference pipelines bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from supcon.data.augment import (
    AUG_NAMES,
    RANDAUGMENT_MAGNITUDE,
    STACKED_RANDAUGMENT_MAGNITUDE,
    check_options,
    run_name,
    supcon_transform,
    train_transform,
)
from supcon.data.augment import test_transform as eval_transform  # a test_* name would be collected
from util import TwoCropTransform, UserError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
SIZE = 32


@pytest.fixture(scope='module')
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))


# The pipelines data.py held before they moved here, rebuilt as they were.
def old_supcon_transform(size, mean, std):
    return TwoCropTransform(
        transforms.Compose(
            [
                transforms.RandomResizedCrop(size=size, scale=(0.2, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
                transforms.ToTensor(),
                transforms.Normalize(mean=mean, std=std),
            ]
        )
    )


def old_train_transform(size, mean, std):
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size=size, scale=(0.2, 1.0)),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ]
    )


def old_test_transform(size, mean, std):
    return transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(mean=mean, std=std),
        ]
    )


def _assert_normalised(x):
    assert isinstance(x, torch.Tensor)
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    low, high = (0 - mean) / std, (1 - mean) / std  # [0, 1] pixels after Normalize
    assert (x >= low - 1e-5).all() and (x <= high + 1e-5).all()
    assert x.mean().abs() < 2.0  # roughly centred, not raw [0, 1] or [0, 255]


@pytest.mark.parametrize('aug', AUG_NAMES)
def test_every_aug_gives_normalised_tensors(aug, image):
    torch.manual_seed(0)
    views = supcon_transform(SIZE, MEAN, STD, aug=aug)(image)
    assert isinstance(views, list) and len(views) == 2
    for view in views:
        _assert_normalised(view)
    assert not torch.equal(views[0], views[1])
    _assert_normalised(train_transform(SIZE, MEAN, STD, aug=aug)(image))


def test_test_transform_resizes_and_normalises(image):
    _assert_normalised(eval_transform(SIZE, MEAN, STD)(image))
    assert torch.equal(
        eval_transform(SIZE, MEAN, STD)(image), old_test_transform(SIZE, MEAN, STD)(image)
    )


@pytest.mark.parametrize('seed', [0, 1, 7])
def test_simclr_is_the_old_pipeline_bit_for_bit(seed, image):
    pairs = [
        (supcon_transform(SIZE, MEAN, STD), old_supcon_transform(SIZE, MEAN, STD)),
        (supcon_transform(SIZE, MEAN, STD, 'simclr'), old_supcon_transform(SIZE, MEAN, STD)),
        (train_transform(SIZE, MEAN, STD), old_train_transform(SIZE, MEAN, STD)),
        (train_transform(SIZE, MEAN, STD, 'simclr'), old_train_transform(SIZE, MEAN, STD)),
    ]
    for new, old in pairs:
        torch.manual_seed(seed)
        a = new(image)
        torch.manual_seed(seed)
        b = old(image)
        a = torch.stack(a) if isinstance(a, list) else a
        b = torch.stack(b) if isinstance(b, list) else b
        assert torch.equal(a, b)
    assert repr(supcon_transform(SIZE, MEAN, STD).transform) == repr(
        old_supcon_transform(SIZE, MEAN, STD).transform
    )
    assert repr(train_transform(SIZE, MEAN, STD)) == repr(old_train_transform(SIZE, MEAN, STD))


def _ops(compose):
    return [type(t).__name__ for t in compose.transforms]


def test_pipelines_hold_the_named_ops():
    head, tail = ['RandomResizedCrop', 'RandomHorizontalFlip'], ['ToTensor', 'Normalize']
    colour = ['RandomApply', 'RandomGrayscale']
    expected = {
        'simclr': (colour, []),
        'autoaugment': (['AutoAugment'], ['AutoAugment']),
        'randaugment': (['RandAugment'], ['RandAugment']),
        'stacked_randaugment': (['RandAugment'] + colour, ['RandAugment'] + colour),
        'crop': ([], []),
    }
    for aug, (supcon_ops, ce_ops) in expected.items():
        supcon = supcon_transform(SIZE, MEAN, STD, aug).transform
        ce = train_transform(SIZE, MEAN, STD, aug)
        assert _ops(supcon) == head + supcon_ops + tail, aug
        assert _ops(ce) == head + ce_ops + tail, aug

    auto = supcon_transform(SIZE, MEAN, STD, 'autoaugment').transform.transforms[2]
    assert auto.policy == transforms.AutoAugmentPolicy.IMAGENET
    plain = train_transform(SIZE, MEAN, STD, 'randaugment').transforms[2]
    stacked = supcon_transform(SIZE, MEAN, STD, 'stacked_randaugment').transform.transforms
    assert (plain.num_ops, plain.magnitude, plain.num_magnitude_bins) == (
        2,
        RANDAUGMENT_MAGNITUDE,
        11,
    )
    assert (stacked[2].num_ops, stacked[2].magnitude, stacked[2].num_magnitude_bins) == (
        2,
        STACKED_RANDAUGMENT_MAGNITUDE,
        11,
    )
    jitter = stacked[3]
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], transforms.ColorJitter)
    assert stacked[4].p == 0.2


def test_unknown_aug_is_a_one_line_user_error():
    for build in (supcon_transform, train_transform):
        with pytest.raises(UserError) as info:
            build(SIZE, MEAN, STD, aug='cutmix')
        assert 'cutmix' in str(info.value) and 'autoaugment' in str(info.value)
        assert '\n' not in str(info.value)


def test_aug_none_trains_classifiers_on_the_test_transform_and_is_refused_for_supcon(image):
    plain = train_transform(SIZE, MEAN, STD, aug='none')
    expected = old_test_transform(SIZE, MEAN, STD)(image)
    torch.manual_seed(0)
    for _ in range(3):  # no randomness left: every call gives the test transform's tensor
        assert torch.equal(plain(image), expected)
    with pytest.raises(UserError, match='two identical views') as info:
        supcon_transform(SIZE, MEAN, STD, aug='none')
    assert '\n' not in str(info.value) and 'main_linear.py' in str(info.value)


def _crops(transform):
    """The area ranges of the RandomResizedCrops of a (multi-view) transform, full size first."""
    composes = [transform.transform] + [getattr(transform, 'small_transform', None)]
    return [c.transforms[0].scale for c in composes if c is not None]


@pytest.mark.parametrize('seed', [0, 1])
def test_crop_scale_sets_the_smallest_area_of_every_crop(seed, image):
    assert _crops(supcon_transform(SIZE, MEAN, STD, crop_scale=0.5)) == [(0.5, 1.0)]
    multi = supcon_transform(SIZE, MEAN, STD, 'crop', 3, 2, 16, crop_scale=0.6)
    assert _crops(multi) == [(0.6, 1.0), (0.05, 0.6)]  # small crops end where full ones begin
    assert train_transform(SIZE, MEAN, STD, crop_scale=0.5).transforms[0].scale == (0.5, 1.0)
    # --crop_scale 1 keeps the whole image: every crop is the image resized (the aspect ratio
    # the crop may draw is 1 at the whole area), identical across draws; and 'crop' is
    # simclr without its colour ops, so that view equals the test transform's image mirrored
    # or not
    torch.manual_seed(seed)
    square = Image.fromarray(np.asarray(image)[:36, :36])
    views = supcon_transform(SIZE, MEAN, STD, 'crop', crop_scale=1.0)(square)
    whole = eval_transform(SIZE, MEAN, STD)(square)
    for view in views:
        assert torch.allclose(view, whole, atol=1e-6) or torch.allclose(
            view, whole.flip(-1), atol=1e-6
        )


class _Opt:
    def __init__(self, **kw):
        self.aug, self.crop_scale, self.gpu_aug, self.small_views = 'simclr', 0.2, False, 0
        self.__dict__.update(kw)


@pytest.mark.parametrize(
    'options,fragment',
    [
        ({'crop_scale': 0.0}, 'from above 0 to 1'),
        ({'crop_scale': 1.5}, 'from above 0 to 1'),
        ({'crop_scale': 0.5, 'aug': 'none'}, '--aug none makes no crops'),
        ({'crop_scale': 0.05, 'small_views': 2}, 'must be above 0.05'),
        ({'aug': 'crop', 'gpu_aug': True}, '--gpu_aug implements the simclr augmentation only'),
    ],
)
def test_crop_scale_outside_its_range_is_a_one_line_error(options, fragment):
    with pytest.raises(UserError, match=fragment) as info:
        check_options(_Opt(**options), 'supcon')
    assert '\n' not in str(info.value)


def test_the_run_name_names_a_crop_scale_other_than_the_references():
    assert run_name(_Opt(), 'supcon') == []
    assert run_name(_Opt(crop_scale=0.5), 'ce') == ['crop_scale_0.5']
    assert run_name(_Opt(aug='crop', crop_scale=0.8), 'supcon') == ['aug_crop', 'crop_scale_0.8']
