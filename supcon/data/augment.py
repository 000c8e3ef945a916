"""Training and test transforms, and the ``--aug`` choice.

Every training pipeline starts with ``RandomResizedCrop(size, scale=(0.2, 1))``
(``--crop_scale`` sets the 0.2: the smallest fraction of the image's area a crop keeps)
and ``RandomHorizontalFlip()`` and ends with ``ToTensor()`` and
``Normalize(mean, std)``; ``--aug`` picks what happens in between. SupCon and
SimCLR (``supcon_transform``) apply it twice per image (``TwoCropTransform``), or
``--n_views`` times plus ``--small_views`` smaller crops (``MultiCropTransform``,
``supcon/data/views.py``); cross-entropy and the linear classifier (``train_transform``) once.

======================  ==============================================  ============================
``--aug``               SupCon / SimCLR view (two per image)            cross-entropy / linear
======================  ==============================================  ============================
``simclr`` (default)    colour jitter (0.4, 0.4, 0.4, 0.1) with p=0.8,  crop + flip only (the
                        grayscale with p=0.2 (the reference pipeline)   reference pipeline)
``autoaugment``         torchvision ``AutoAugment``, ImageNet policy,   ``AutoAugment`` (ImageNet
                        in place of the jitter and grayscale            policy)
``randaugment``         torchvision ``RandAugment``, 2 ops, magnitude   the same ``RandAugment``
                        9 of 10, in place of the jitter and grayscale
``stacked_randaugment`` ``RandAugment``, 2 ops, magnitude 10 of 10,     the same as for SupCon
                        then the ``simclr`` jitter and grayscale
``crop``                crop + flip only: ``simclr`` without its        crop + flip only (the same
                        colour distortion                               as ``simclr``)
``none``                refused (two identical views teach nothing)     no augmentation: the test
                                                                        transform (a probe on fixed
                                                                        features)
======================  ==============================================  ============================

The test transform is the same for every ``--aug``: ``Resize((size, size))``,
``ToTensor()``, ``Normalize``.

Magnitudes. RandAugment's paper rates magnitude on a 0-10 scale (10 = the
largest distortion) and used N=2, M=9 for ResNet-50 on ImageNet. torchvision
splits its ranges into ``num_magnitude_bins`` steps (default 31, where its
default ``magnitude=9`` is only 30% of the range); here ``num_magnitude_bins=11``,
so ``magnitude=M`` means M/10 of each op's range, as in the paper and in the TF
Model Garden code. ``randaugment`` uses N=2, M=9. ``stacked_randaugment`` uses
N=2, M=10: the SupCon TF code (google-research/supcon, ``preprocessing.py``)
calls the Model Garden ``RandAugment()`` with its defaults, 2 layers at
magnitude 10; its plain ``RANDAUGMENT`` type instead takes the magnitude from
the ``--augmentation_magnitude`` flag.

Stacked RandAugment approximates the paper's. The paper (Khosla et al. 2020,
supplementary 14.2) describes it as SimAugment with "an additional
RandAugment step before doing the color jitter"; that is what is built here:
RandAugment, then ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``,
then ``RandomGrayscale(p=0.2)``. The TF implementation differs in ways
torchvision and this project's reference pipeline do not reproduce: it jitters
colour first (TF colour ops, strength set by ``--augmentation_magnitude``), runs
RandAugment between the jitter and the grayscale, and ends with optional
warping and Gaussian blur (blur p=0.5 by default); its crop is the Inception
crop with area (0.08, 1), not (0.2, 1).

What the paper found (Khosla et al., NeurIPS 2020, section 4 and supplementary
14.2, ImageNet): of AutoAugment, RandAugment, SimAugment and Stacked
RandAugment, AutoAugment gave the highest top-1 on ResNet-50 for both SupCon
and cross-entropy (78.7% for SupCon), and Stacked RandAugment the highest on
ResNet-200 for both losses; the authors conjecture that Stacked RandAugment is
the stronger augmentation and needs the larger model. They also note that
AutoAugment is the fastest of the four at run time. None of this was measured
on CIFAR; the reference PyTorch code (whose CIFAR numbers the paper reports)
uses the ``simclr`` pipeline.
"""

from torchvision import transforms

from supcon.errors import UserError
from util import TwoCropTransform

AUG_NAMES = ('simclr', 'autoaugment', 'randaugment', 'stacked_randaugment', 'crop')
# main_ce.py and main_linear.py may also train on the plain test transform
CLASSIFIER_AUG_NAMES = AUG_NAMES + ('none',)

RANDAUGMENT_NUM_OPS = 2
RANDAUGMENT_MAGNITUDE = 9
STACKED_RANDAUGMENT_MAGNITUDE = 10
MAGNITUDE_BINS = 11  # magnitudes 0..10, the RandAugment paper's scale

# The SimCLR pipeline of the reference, shared with the device pipeline (gpu_augment.py)
CROP_SCALE = (0.2, 1.0)  # RandomResizedCrop area fraction (the reference's, not SimCLR's 0.08)
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
JITTER_P = 0.8
GRAYSCALE_P = 0.2
# --small_views: the area range of the small crops. SwAV (0.05, 0.14) under full crops of (0.14, 1)
# and DINO (0.05, 0.4) under (0.4, 1) both start at 5% and end where the full crops begin; the
# same rule under the reference's (0.2, 1) gives (0.05, 0.2), so a small crop is never as large
# as a full one.
SMALL_CROP_SCALE = (0.05, CROP_SCALE[0])


def _check(aug, names=AUG_NAMES):
    if aug == 'none' and 'none' not in names:
        raise UserError(
            "--aug none would give SupCon/SimCLR two identical views of each image;"
            " it is for main_linear.py and main_ce.py: pick another --aug"
        )
    if aug not in names:
        raise UserError(f"unknown augmentation {aug!r}; expected one of {', '.join(names)}")


def _crop_flip(size, scale=CROP_SCALE):
    return [
        transforms.RandomResizedCrop(size=size, scale=scale, ratio=CROP_RATIO),
        transforms.RandomHorizontalFlip(),
    ]


def _colour():
    """The SimCLR colour distortion of the reference SupContrast code."""
    return [
        transforms.RandomApply([transforms.ColorJitter(*JITTER)], p=JITTER_P),
        transforms.RandomGrayscale(p=GRAYSCALE_P),
    ]


def _randaugment(magnitude):
    return transforms.RandAugment(
        num_ops=RANDAUGMENT_NUM_OPS, magnitude=magnitude, num_magnitude_bins=MAGNITUDE_BINS
    )


def _policy(aug, contrastive):
    """The ops between crop+flip and ToTensor for ``aug``."""
    if aug == 'simclr':
        return _colour() if contrastive else []
    if aug == 'crop':
        return []
    if aug == 'autoaugment':
        return [transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET)]
    if aug == 'randaugment':
        return [_randaugment(RANDAUGMENT_MAGNITUDE)]
    return [_randaugment(STACKED_RANDAUGMENT_MAGNITUDE)] + _colour()  # stacked_randaugment


def _finish(mean, std):
    return [transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)]


class MultiCropTransform:
    """``views`` augmentations of one image by ``transform``, then ``small_views`` by
    ``small_transform``: a list of ``views + small_views`` tensors, the full-size ones first."""

    def __init__(self, transform, views, small_transform=None, small_views=0):
        self.transform, self.views = transform, int(views)
        self.small_transform, self.small_views = small_transform, int(small_views)

    def __call__(self, x):
        full = [self.transform(x) for _ in range(self.views)]
        return full + [self.small_transform(x) for _ in range(self.small_views)]


def crop_scales(crop_scale=CROP_SCALE[0]):
    """The area ranges of the full and the small crops for ``--crop_scale``: ``(crop_scale, 1)``
    and ``(0.05, crop_scale)``, the defaults ``CROP_SCALE`` and ``SMALL_CROP_SCALE``."""
    return (float(crop_scale), CROP_SCALE[1]), (SMALL_CROP_SCALE[0], float(crop_scale))


def supcon_transform(
    size,
    mean,
    std,
    aug='simclr',
    n_views=2,
    small_views=0,
    small_size=None,
    crop_scale=CROP_SCALE[0],
):
    """The augmented views of each image, for SupCon and SimCLR: two by default (the reference's
    ``TwoCropTransform``); ``n_views`` full-size ones and ``small_views`` crops of
    ``SMALL_CROP_SCALE`` resized to ``small_size`` otherwise; ``crop_scale`` is ``--crop_scale``
    (``crop_scales``)."""
    _check(aug)
    full_scale, small_scale = crop_scales(crop_scale)

    def pipeline(side, scale):
        crop = _crop_flip(side, scale)
        return transforms.Compose(crop + _policy(aug, contrastive=True) + _finish(mean, std))

    if n_views == 2 and not small_views:
        return TwoCropTransform(pipeline(size, full_scale))
    small = pipeline(small_size, small_scale) if small_views else None
    return MultiCropTransform(pipeline(size, full_scale), n_views, small, small_views)


def train_transform(size, mean, std, aug='simclr', crop_scale=CROP_SCALE[0]):
    """Augmentation for cross-entropy and linear-classifier training."""
    _check(aug, CLASSIFIER_AUG_NAMES)
    if aug == 'none':
        return test_transform(size, mean, std)
    scale = crop_scales(crop_scale)[0]
    return transforms.Compose(
        _crop_flip(size, scale) + _policy(aug, contrastive=False) + _finish(mean, std)
    )


def test_transform(size, mean, std):
    # The fork skipped this resize, so 300x300 test images reached a network
    # trained on --size crops. It is a no-op when images already have that size.
    return transforms.Compose([transforms.Resize((size, size))] + _finish(mean, std))


#: Options a resume may not change.
FIXED = ('aug', 'crop_scale')


def check_options(opt, script):
    if getattr(opt, 'gpu_aug', False) and opt.aug != 'simclr':
        raise UserError(
            f'--gpu_aug implements the simclr augmentation only; drop --gpu_aug or'
            f' use --aug simclr (not {opt.aug})'
        )
    crop = getattr(opt, 'crop_scale', CROP_SCALE[0])
    if crop == CROP_SCALE[0]:
        return
    if not 0 < crop <= 1:
        raise UserError(
            f'--crop_scale is the smallest fraction of the image a crop keeps: from above 0 to 1'
            f' (the reference\'s is {CROP_SCALE[0]}), got {crop}'
        )
    if getattr(opt, 'aug', 'simclr') == 'none':
        raise UserError('--aug none makes no crops, so --crop_scale has nothing to set; drop one')
    if getattr(opt, 'small_views', 0) and crop <= SMALL_CROP_SCALE[0]:
        raise UserError(
            f'--small_views crops between {SMALL_CROP_SCALE[0]} of the image and --crop_scale,'
            f' so --crop_scale must be above {SMALL_CROP_SCALE[0]} with them (got {crop})'
        )


def run_name(opt, script):
    parts = [f'aug_{opt.aug}'] if getattr(opt, 'aug', 'simclr') != 'simclr' else []
    crop = getattr(opt, 'crop_scale', CROP_SCALE[0])
    return parts + ([f'crop_scale_{crop:g}'] if crop != CROP_SCALE[0] else [])


def add_augmentation_arguments(parser, classifier=False, gpu_aug=True):
    """``--aug`` (and ``--gpu_aug``). ``classifier=True`` (main_ce.py, main_linear.py) also
    offers ``--aug none``, training on the test transform."""
    group = parser.add_argument_group('augmentation (not in the reference)')
    names = CLASSIFIER_AUG_NAMES if classifier else AUG_NAMES
    extra = '; none: no augmentation, training images get the test transform' if classifier else ''
    group.add_argument(
        '--aug',
        type=str,
        default='simclr',
        choices=names,
        help='training augmentation (augment.py has the table); simclr is the reference\'s' + extra,
    )
    group.add_argument(
        '--crop_scale',
        type=float,
        default=CROP_SCALE[0],
        help='smallest fraction of the image\'s area a random crop keeps (RandomResizedCrop\'s'
        ' scale=(crop_scale, 1)); the reference\'s 0.2',
    )
    if not gpu_aug:
        return group
    group.add_argument(
        '--gpu_aug',
        action='store_true',
        help='loader workers only decode; crops, flips and colour run batched on'
        ' the training device (kornia; docs/backbones.md)',
    )
    return group
