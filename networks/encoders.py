"""The encoder a ``--model`` name stands for: one of our ResNets, or any timm model.

``resnet18/34/50/101`` are ``networks.resnet_big``'s CIFAR-stem ResNets with the reference's
state-dict keys (``--stem imagenet`` for torchvision's stem); every other name is built by
timm without its classifier (``networks.timm_backbone``). Either way the result is a module
that maps images to pooled features, and its feature width, which sizes the projection head
and the linear classifier.

As a capability (``supcon/capabilities.py``) it declares the backbone flags of the training
scripts: ``--model``, ``--stem``, ``--patch_size``, ``--pretrained``.
"""

import os
import re

from networks.resnet_big import MODEL_NAMES, STEMS, model_dict
from networks.timm_backbone import create_encoder, is_timm_model, unknown_model_error
from supcon.errors import UserError


def build_encoder(name, stem='cifar', size=32, patch_size=None, pretrained_file=None):
    """``(encoder, feature width)`` for ``--model name``; flags that cannot apply are refused."""
    if name in MODEL_NAMES:
        if stem not in STEMS:
            raise UserError(f'--stem {stem} is not known; choose one of {", ".join(STEMS)}')
        if patch_size is not None:
            raise UserError(
                f'--patch_size is for timm ViT-style models, not --model {name}; drop --patch_size'
            )
        if pretrained_file is not None:
            raise UserError(
                f'--pretrained loads a local timm checkpoint, not --model {name};'
                f' drop --pretrained (use --resume to continue one of our runs)'
            )
        constructor, dim = model_dict[name]
        return constructor(stem=stem), dim
    if stem != 'cifar':
        raise UserError(
            f'--stem is for our ResNets ({", ".join(MODEL_NAMES)}); the timm model'
            f' {name} has its own stem: drop --stem'
        )
    return create_encoder(name, size, patch_size=patch_size, pretrained_file=pretrained_file)


def is_known_model(name):
    """True for our ResNets and for any name in timm's registry (nothing is downloaded)."""
    return name in MODEL_NAMES or is_timm_model(name)


def check_model_name(name):
    """Refuse an unknown ``--model`` at parse time, with close matches from timm's registry."""
    if not is_known_model(name):
        raise unknown_model_error(name)


#: Options a resume may not change (--model and --stem are fixed for every script).
FIXED = ('patch_size', 'pretrained')


def add_arguments(parser):
    """--model and the backbone flags the reference does not have (main_supcon.py, main_ce.py)."""
    parser.add_argument(
        '--model',
        type=str,
        default='resnet50',
        help=', '.join(MODEL_NAMES) + ' (CIFAR-stem ResNets), or any timm model'
        ' name, e.g. vit_small_patch16_224, convnext_tiny',
    )
    parser.add_argument(
        '--stem',
        type=str,
        default=None,
        help=', '.join(STEMS) + ' for our ResNets: imagenet (7x7 stride-2 conv +'
        ' max-pool) makes large images far cheaper; default: imagenet for'
        ' --dataset imagenet, else cifar',
    )
    parser.add_argument(
        '--patch_size',
        type=int,
        default=None,
        help='timm ViT-style models: patch size (e.g. 4 for 32x32 images)',
    )
    parser.add_argument(
        '--pretrained',
        type=str,
        default=None,
        help='timm models: a local timm checkpoint to start from (never downloaded)',
    )


def check_options(opt, script):
    """An unknown --model is refused at parse time; --stem defaults to the data set's."""
    if script == 'linear':  # the checkpoint's encoder (networks/from_checkpoint.py)
        return
    check_model_name(opt.model)
    if opt.stem is None:
        opt.stem = 'imagenet' if opt.dataset == 'imagenet' else 'cifar'


def run_name(opt, script):
    """``stem_{stem}`` (not in main_linear.py: there the stem is the checkpoint's, not a
    choice), ``patch_{P}``, ``pretrained_{file}``."""
    parts = []
    if script != 'linear' and getattr(opt, 'stem', 'cifar') != 'cifar':
        parts.append(f'stem_{opt.stem}')
    if getattr(opt, 'patch_size', None) is not None:
        parts.append(f'patch_{opt.patch_size}')
    if getattr(opt, 'pretrained', None):
        parts.append(f'pretrained_{file_tag(opt.pretrained)}')
    return parts


def file_tag(path):
    """A run-name part for a file: its name without the extension, in safe characters."""
    name = os.path.splitext(os.path.basename(os.path.normpath(str(path))))[0]
    return re.sub(r'[^A-Za-z0-9_.+-]+', '-', name).strip('-.') or 'file'
