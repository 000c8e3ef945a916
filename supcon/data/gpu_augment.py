"""Training augmentation as batched tensor operations on the training device (``--gpu_aug``).

With ``--gpu_aug`` the data-loader workers only decode images and hand over uint8 tensors
(:func:`to_uint8_tensor`); :class:`DeviceAugment` then runs the random augmentation of the
whole batch on the device the model trains on (a GPU, or the CPU), built on kornia's
batched augmentations with independent random parameters for every image and every view.

Typical use::

    train_set = Dataset(..., transform=to_uint8_tensor(size))      # workers: decode only
    augment = DeviceAugment(size, mean, std, kind='supcon').to(device)
    for step, (images, labels) in enumerate(loader):
        images = images.to(device, non_blocking=True)               # uint8 [B, 3, H, W]
        views = augment(images, seed=mix_seed('gpu_aug', seed, epoch, step, rank))
        # views: float32 [2B, 3, size, size], view 0 of every image, then view 1

It replaces these torchvision pipelines of ``augment.py`` (the constants are shared):

* ``kind='supcon'`` (SupCon and SimCLR), two views, each
  ``RandomResizedCrop(size, scale=(0.2, 1.))``, ``RandomHorizontalFlip()``,
  ``RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)``, ``RandomGrayscale(p=0.2)``,
  ``ToTensor()``, ``Normalize(mean, std)``;
* ``kind='ce'`` (cross-entropy training), one view,
  ``RandomResizedCrop(size, scale=(0.2, 1.))``, ``RandomHorizontalFlip()``, ``ToTensor()``,
  ``Normalize(mean, std)``.

Differences from the torchvision pipeline
-----------------------------------------
What matches: the crop box is drawn by the same algorithm as torchvision's
``RandomResizedCrop.get_params`` (up to ten tries of an area fraction uniform in ``scale`` and
an aspect ratio log-uniform in ``ratio``, sides rounded half to even, the whole image as
fallback for a square input); the flip, the jitter gate (p=0.8) and the grayscale gate (p=0.2)
are drawn per image; the four jitter factors are drawn per image from torchvision's ranges
(brightness, contrast and saturation uniform in [0.6, 1.4], hue uniform in [-0.1, 0.1] of a full
turn) and applied with torchvision's formulas (kornia's ``ColorJitter``, not ``ColorJiggle``,
whose brightness is additive and saturation HSV-based): brightness multiplies, contrast blends
with the mean of the grayscale image, saturation blends with the grayscale image, hue rotates
the HSV hue, with the values clamped to [0, 1] as torchvision's tensor functions do. The
remaining differences:

1. Jitter order. torchvision applies the four colour adjustments in a random order drawn for
   each image; kornia draws one random order per call, so all images of one view of one batch
   share it (the two views draw their own). Brightness, contrast and saturation commute except
   for the clamping to [0, 1] between steps, so the shared order mostly decides where the hue
   rotation falls among them.
2. Precision. Everything runs in float32. torchvision's PIL path (the one ``data.py`` uses)
   rounds to 8 bits after every colour step, takes the contrast mean as a rounded integer and
   rotates hue in 8-bit HSV; the results differ by a few 1/255 steps.
3. Resize grid. The crop is resized by one batched bilinear warp (kornia's ``resample``
   cropping mode) that maps the crop's corner pixel centres onto the output's corner pixel
   centres, where torchvision resizes on the half-pixel grid: the output is shifted and scaled
   by under one input pixel. A crop larger than the output is not antialiased (PIL's resize
   is); with a canvas no larger than ``size`` (CIFAR at 32, or image folders loaded with
   ``to_uint8_tensor(size)``) every crop is enlarged or kept, and antialiasing does not arise.
   ``cropping_mode='slice'`` reproduces torchvision's tensor ``resized_crop`` exactly (half-pixel
   grid), but kornia then resizes image by image in a Python loop and reads the boxes back to
   the host, which is slower on a GPU.
4. Fallback position. When none of the ten tries fits, kornia places the fallback crop at a
   random position where torchvision centres it. For a square canvas the fallback is the whole
   image, so this never matters here.
5. Image folders. ``to_uint8_tensor(size)`` resizes every image to ``size`` x ``size`` in the
   worker (squashing its aspect ratio) so that a batch stacks; torchvision crops the
   full-resolution image in its own aspect ratio. Crop aspect ratios are therefore relative to
   the squashed image, and small crops are enlarged from fewer pixels (pass a larger canvas to
   ``to_uint8_tensor`` than to ``DeviceAugment`` to keep more detail, at more transfer cost).
6. Random streams. The parameters come from torch's CPU generator, seeded on every call from
   the ``seed`` argument, not from the loader workers' generators: runs are repeatable given
   the seed, but draw other numbers than the CPU pipeline.
"""

import numpy as np
import torch
import torch.nn as nn

from supcon.data.augment import (
    CROP_RATIO,
    CROP_SCALE,
    GRAYSCALE_P,
    JITTER,
    JITTER_P,
    crop_scales,
)
from supcon.data.sampling import mix_seed

__all__ = ['DeviceAugment', 'MultiCropAugment', 'ToUint8Tensor', 'to_uint8_tensor', 'KINDS']

KINDS = ('supcon', 'ce')

_SEED_MOD = 2**63


# --------------------------------------------------------------------------- loader side


class ToUint8Tensor:
    """Loader transform: PIL image (or HWC uint8 array) -> uint8 tensor [3, H, W], RGB.

    With ``size`` given, the image is first resized to ``size`` x ``size`` with PIL's bilinear
    filter (which, unlike a plain bilinear sample, averages over the source footprint when it
    shrinks, i.e. is antialiased), so that images of different shapes stack into one batch.
    The aspect ratio is not kept. Without ``size`` the image keeps its shape (CIFAR). A class
    rather than a closure so that it pickles into spawned loader workers.
    """

    def __init__(self, size=None):
        if size is not None:
            size = int(size)
            if size <= 0:
                raise ValueError(f'size must be a positive integer, got {size}')
        self.size = size

    def __call__(self, image):
        from PIL import Image

        if isinstance(image, torch.Tensor):
            tensor = image
            if tensor.dtype != torch.uint8 or tensor.dim() != 3 or tensor.shape[0] != 3:
                raise ValueError(
                    f'expected a uint8 tensor [3, H, W], got {tuple(tensor.shape)} {tensor.dtype}'
                )
            if self.size is not None and tuple(tensor.shape[1:]) != (self.size, self.size):
                image = Image.fromarray(tensor.permute(1, 2, 0).numpy())
            else:
                return tensor
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if image.mode != 'RGB':
            image = image.convert('RGB')
        if self.size is not None and image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        array = np.array(image, dtype=np.uint8, copy=True)  # [H, W, 3], writable
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __repr__(self):
        return f'{type(self).__name__}(size={self.size})'


def to_uint8_tensor(size=None):
    """The loader-side transform for ``--gpu_aug``; see :class:`ToUint8Tensor`."""
    return ToUint8Tensor(size)


# --------------------------------------------------------------------------- device side


def _three(values, name):
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f'{name} needs 3 values (R, G, B), got {len(values)}')
    return values


class DeviceAugment(nn.Module):
    """Random training augmentation of a uint8 batch on its own device (see the module docstring).

    Args:
        size: output side in pixels (square output).
        mean, std: per-channel RGB normalisation, as for ``transforms.Normalize``.
        kind: ``'supcon'`` (two views with colour jitter and grayscale) or ``'ce'`` (one view,
            crop and flip only).
        scale, ratio: ``RandomResizedCrop`` ranges (area fraction; width / height).
        jitter: ``(brightness, contrast, saturation, hue)`` strengths of the colour jitter.
        jitter_p, gray_p: probabilities of the colour jitter and of grayscale (``'supcon'``);
            0 turns them off.
        cropping_mode: ``'resample'`` (default; one batched warp) or ``'slice'`` (torchvision's
            exact resize grid, a per-image loop inside kornia).
        views: views per image (default: 2 for ``'supcon'``, 1 for ``'ce'``).

    Call: ``augment(images, seed)`` with ``images`` a uint8 tensor [B, 3, H, W] (RGB, 0..255)
    on any device, and ``seed`` an int (or None to draw from torch's global generator, which
    then advances). Returns float32 [V*B, 3, size, size] on the images' device, RGB,
    normalised with ``mean``/``std``; for ``'supcon'`` V=2 (or ``views``) and the views are
    stacked view-major (rows 0..B-1 are view 0 of images 0..B-1, rows B..2B-1 view 1), the
    order of ``torch.cat([view0, view1])``; for ``'ce'`` V=1. The same seed and input give the same
    output bit for bit, and a seeded call leaves torch's global RNG states unchanged. Runs
    without autograd and outside autocast. ``last_params`` holds the parameters drawn by the
    latest call, one dict per view (CPU tensors).
    """

    def __init__(
        self,
        size,
        mean,
        std,
        kind='supcon',
        *,
        scale=CROP_SCALE,
        ratio=CROP_RATIO,
        jitter=JITTER,
        jitter_p=JITTER_P,
        gray_p=GRAYSCALE_P,
        cropping_mode='resample',
        views=None,
    ):
        super().__init__()
        import kornia.augmentation as K  # imported here: only --gpu_aug needs kornia

        if kind not in KINDS:
            raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
        size = int(size)
        if size <= 0:
            raise ValueError(f'size must be a positive integer, got {size}')
        if cropping_mode not in ('resample', 'slice'):
            raise ValueError(f"cropping_mode must be 'resample' or 'slice', got {cropping_mode!r}")
        mean, std = _three(mean, 'mean'), _three(std, 'std')
        if min(std) <= 0:
            raise ValueError(f'std must be positive, got {std}')
        self.size, self.kind = size, kind
        self.views = (2 if kind == 'supcon' else 1) if views is None else int(views)
        if self.views < 1:
            raise ValueError(f'views must be a positive integer, got {views}')

        steps = [
            # align_corners=False: in 'slice' mode that is torchvision's half-pixel grid; 'resample'
            # mode maps corner pixel centres whatever the flag (difference 3 of the docstring).
            K.RandomResizedCrop(
                (size, size),
                scale=tuple(scale),
                ratio=tuple(ratio),
                resample='bilinear',
                align_corners=False,
                cropping_mode=cropping_mode,
            ),
            K.RandomHorizontalFlip(p=0.5),
        ]
        if kind == 'supcon':
            # ColorJitter (not ColorJiggle) follows torchvision's formulas and ranges.
            steps.append(K.ColorJitter(*jitter, p=float(jitter_p)))
            steps.append(K.RandomGrayscale(p=float(gray_p)))
        self.pipeline = K.AugmentationSequential(*steps)
        self._names = ['crop', 'flip', 'jitter', 'gray'][: len(steps)]
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.last_params = []

    def extra_repr(self):
        return f'size={self.size}, kind={self.kind!r}, views={self.views}'

    def forward(self, images, seed=None):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError(
                'DeviceAugment takes a uint8 tensor [B, 3, H, W]; got '
                f'{getattr(images, "dtype", type(images).__name__)}'
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f'DeviceAugment takes a uint8 tensor [B, 3, H, W]; got shape {tuple(images.shape)}'
            )
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f'seed must be an int or None, got {type(seed).__name__}')
        device = images.device
        if images.shape[0] == 0:
            self.last_params = []
            return torch.empty(0, 3, self.size, self.size, device=device, dtype=torch.float32)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            if seed is None:
                return self._augment(images)
            forked = [device] if device.type == 'cuda' else []
            with torch.random.fork_rng(devices=forked, device_type='cuda'):
                seed = int(seed) % _SEED_MOD
                # Seed only the generators forked above: torch.manual_seed would also reseed
                # every other GPU's generator, which fork_rng would not restore.
                torch.default_generator.manual_seed(seed)
                if forked:
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed)
                return self._augment(images)

    def _augment(self, images):
        x = images.to(torch.float32).div_(255.0)
        outputs, params = [], []
        for _ in range(self.views):
            outputs.append(self.pipeline(x))
            params.append(
                {name: dict(item.data) for name, item in zip(self._names, self.pipeline._params)}
            )
        self.last_params = params
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        # not in place: in 'slice' mode a whole-image crop can come back as a view of ``x``
        return (out - self.mean) / self.std


class MultiCropAugment(nn.Module):
    """``views`` full-size views and ``small_views`` small ones of every image, on the device
    (``--gpu_aug`` with ``--n_views`` / ``--small_views``; ``supcon/data/views.py``).

    The full views are ``DeviceAugment(size, ..., views=views)`` called with ``seed`` itself, so
    the default two views are the plain ``--gpu_aug``'s, bit for bit; the small views are crops
    of ``SMALL_CROP_SCALE`` resized to ``small_size``, with their own seed derived from
    ``seed``. Returns a list, one view-major tensor per size, the full-size one first:
    ``[full [views*B, 3, size, size], small [small_views*B, 3, small_size, small_size]]``
    (the second only with ``small_views``).
    """

    def __init__(
        self,
        size,
        mean,
        std,
        views=2,
        small_views=0,
        small_size=None,
        crop_scale=CROP_SCALE[0],
        **kwargs,
    ):
        super().__init__()
        full_scale, small_scale = crop_scales(crop_scale)
        self.full = DeviceAugment(
            size, mean, std, 'supcon', views=views, scale=full_scale, **kwargs
        )
        self.small = None
        if small_views:
            kwargs['scale'] = small_scale
            self.small = DeviceAugment(small_size, mean, std, 'supcon', views=small_views, **kwargs)

    def forward(self, images, seed=None):
        out = [self.full(images, seed=seed)]
        if self.small is not None:
            small_seed = None if seed is None else mix_seed('small_views', int(seed))
            out.append(self.small(images, seed=small_seed))
        return out
