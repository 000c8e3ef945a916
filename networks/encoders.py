"""The encoder a ``--model`` name stands for: one of our ResNets, or any timm model.

``resnet18/34/50/101`` are ``networks.resnet_big``'s CIFAR-stem ResNets with the reference's
state-dict keys (``--stem imagenet`` for torchvision's stem); every other name is built by
timm without its classifier (``networks.timm_backbone``). Either way the result is a module
that maps images to pooled features, and its feature width, which sizes the projection head
and the linear classifier.
"""

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
