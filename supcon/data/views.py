"""More views per image: ``--n_views V`` and multi-crop (``--small_views K --small_size S``).

The reference makes two views of every image (``util.TwoCropTransform``), though its loss takes
any number (``features: [bsz, n_views, D]``). Here main_supcon.py can make V full-size views of
each image and K more small ones: crops of 5 to 20% of the image (``augment.SMALL_CROP_SCALE``;
SwAV and DINO take their small crops from 5% of the area up to where their full-size crops begin)
resized to S pixels, S = half of ``--size`` unless given. Each size is forwarded as its own batch
(one forward pass per size: BatchNorm normalises the small views among themselves, as in SwAV and
DINO), and every view of every size is an anchor of the loss, with every other view of its image
and of its class as positives. Both pipelines make them: the loader's workers
(``augment.MultiCropTransform``) and ``--gpu_aug`` (``gpu_augment.MultiCropAugment``). The
defaults (V = 2, K = 0) are the reference's two views, run names and numbers unchanged.

``ViewLayout`` is what the training step reads: the views per image of each size and how the
loader's list of views becomes one view-major tensor per size (the ``Batch.images`` of
``supcon/objectives/step.py``).

As a capability (``supcon/capabilities.py``) it declares ``--n_views``, ``--small_views`` and
``--small_size`` (main_supcon.py only), their checks, the run-name parts ``views{V}`` (V != 2) and
``small{K}x{S}`` (K > 0), and fixes them on resume. ``--moco`` is refused with other views than
the default two: its key encoder, queue and shuffle take the two full-size views of each image.
"""

from dataclasses import dataclass

import torch

from supcon.data.augment import CROP_SCALE
from supcon.errors import UserError

DEFAULT_VIEWS = 2

#: Options a resume may not change.
FIXED = ('n_views', 'small_views', 'small_size')


def add_arguments(parser):
    """--n_views, --small_views, --small_size (main_supcon.py)."""
    group = parser.add_argument_group('views (not in the reference; docs/views.md)')
    group.add_argument(
        '--n_views',
        type=int,
        default=DEFAULT_VIEWS,
        help='full-size augmented views of each image, all in the loss (the reference: 2)',
    )
    group.add_argument(
        '--small_views',
        type=int,
        default=0,
        help='multi-crop: this many more views of each image, cropped from a smaller area range'
        ' (5 to 20%% of the image, below the full views\' 20 to 100%%, as SwAV and DINO split'
        ' theirs) and resized to --small_size; 0: off',
    )
    group.add_argument(
        '--small_size',
        type=int,
        default=None,
        help='--small_views: their side in pixels (half of --size when not given)',
    )
    return group


def check_options(opt, script):
    """Refuse what cannot work, in one line; --small_size defaults to half of --size."""
    if script != 'supcon':
        return
    if opt.n_views < 1 or opt.small_views < 0:
        raise UserError(
            f'--n_views must be 1 or more and --small_views 0 or more'
            f' (got {opt.n_views} and {opt.small_views})'
        )
    if opt.n_views + opt.small_views < 2:
        raise UserError(
            f'--n_views {opt.n_views} with --small_views {opt.small_views} gives each image one'
            f' view: an anchor needs another view of its image; use --n_views 2 or add'
            f' --small_views'
        )
    if not opt.small_views:
        if opt.small_size is not None:
            raise UserError(
                '--small_size only acts with --small_views; add --small_views K or drop it'
            )
    else:
        if opt.small_size is None:
            opt.small_size = max(1, opt.size // 2)
        if not 1 <= opt.small_size <= opt.size:
            raise UserError(
                f'--small_size must be from 1 to --size {opt.size} (the full views\' side),'
                f' got {opt.small_size}'
            )
        from networks.resnet_big import MODEL_NAMES

        if opt.model not in MODEL_NAMES:
            raise UserError(
                f'--small_views feeds the network a second input side, which timm models built'
                f' for --size (ViTs) may refuse; use one of {", ".join(MODEL_NAMES)} or drop'
                f' --small_views'
            )
        _check_cpu_bf16_side(opt)
    if getattr(opt, 'moco', False) and (opt.n_views != DEFAULT_VIEWS or opt.small_views):
        raise UserError(
            '--moco takes the two full-size views of each image (its keys, queue and shuffle);'
            ' drop --n_views/--small_views or --moco'
        )


def _stride2_inputs(side, stem):
    """The map sides the stride-2 3x3 convolutions of our ResNets see for an input ``side``."""
    sides = []
    side = -(-side // 4) if stem == 'imagenet' else side  # 7x7 stride-2 conv, stride-2 max-pool
    for _ in range(3):  # the first blocks of layer2, layer3, layer4
        sides.append(side)
        side = -(-side // 2)
    return sides


def _check_cpu_bf16_side(opt):
    """Refuse small views that would meet PyTorch's broken CPU bfloat16 weight gradient.

    On the CPU under bfloat16 autocast, oneDNN's weight gradient of a 3x3 stride-2 convolution
    whose input map is 1x1 reads memory it never wrote (torch 2.14: a different, often NaN,
    gradient on every call; docs/views.md); our ResNets reach that layer for sides up to 4
    (CIFAR stem) or 16 (ImageNet stem). ``--cpu_bf16_wgrad matmul`` computes those gradients
    itself and is not affected."""
    import torch

    device = str(getattr(opt, 'device', 'auto'))
    on_cpu = device == 'cpu' or (device == 'auto' and not torch.cuda.is_available())
    bf16 = getattr(opt, 'amp', False) and getattr(opt, 'amp_dtype', 'auto') in ('auto', 'bfloat16')
    if not (on_cpu and bf16) or getattr(opt, 'cpu_bf16_wgrad', 'onednn') == 'matmul':
        return
    stem = getattr(opt, 'stem', 'cifar')
    if 1 in _stride2_inputs(opt.small_size, stem):
        smallest = next(
            s for s in range(opt.small_size, 10**4) if 1 not in _stride2_inputs(s, stem)
        )
        raise UserError(
            f'--small_size {opt.small_size} under CPU bfloat16 --amp: {opt.model} then meets'
            f' a stride-2 convolution on a 1x1 map, whose bfloat16 weight gradient PyTorch'
            f' computes wrongly on the CPU (docs/views.md); use --small_size {smallest} or more,'
            f' or --cpu_bf16_wgrad matmul'
        )


def run_name(opt, script):
    parts = []
    if getattr(opt, 'n_views', DEFAULT_VIEWS) != DEFAULT_VIEWS:
        parts.append(f'views{opt.n_views}')
    if getattr(opt, 'small_views', 0):
        parts.append(f'small{opt.small_views}x{opt.small_size}')
    return parts


@dataclass(frozen=True)
class ViewLayout:
    """The views per image: ``full`` at --size, ``small`` at ``small_size`` (0: none)."""

    full: int = DEFAULT_VIEWS
    small: int = 0
    small_size: int | None = None

    @classmethod
    def of(cls, opt):
        """The run's layout; options without the flags (other scripts) get the default."""
        small = getattr(opt, 'small_views', 0) or 0
        return cls(
            getattr(opt, 'n_views', DEFAULT_VIEWS),
            small,
            getattr(opt, 'small_size', None) if small else None,
        )

    @property
    def total(self):
        """Views per image over both sizes: the loss's n_views."""
        return self.full + self.small

    @property
    def counts(self):
        """Views per image of each size in ``Batch.images``' order: [full] or [full, small]."""
        return [self.full] + ([self.small] if self.small else [])

    def group(self, views):
        """The loader's list of ``total`` tensors [bsz, C, H, W] (view v of every image) as one
        view-major tensor per size, [full * bsz, ...] then [small * bsz, ...]."""
        if len(views) != self.total:
            raise ValueError(f'expected {self.total} views per image, got {len(views)}')
        groups = [torch.cat(list(views[: self.full]))]
        if self.small:
            groups.append(torch.cat(list(views[self.full :])))
        return groups

    def loader_transform(self, size, mean, std, aug='simclr', crop_scale=CROP_SCALE[0]):
        """The loader workers' transform that makes these views (``augment.supcon_transform``)."""
        from supcon.data.augment import supcon_transform

        return supcon_transform(
            size, mean, std, aug, self.full, self.small, self.small_size, crop_scale
        )

    def device_augment(self, size, mean, std, crop_scale=CROP_SCALE[0]):
        """--gpu_aug's ``MultiCropAugment`` that makes these views on the device."""
        from supcon.data.gpu_augment import MultiCropAugment

        return MultiCropAugment(
            size, mean, std, self.full, self.small, self.small_size, crop_scale=crop_scale
        )
