"""Any timm model as the encoder.

``--model`` keeps ``resnet18/34/50/101`` for our CIFAR-stem ResNets
(``networks.resnet_big``); every other name is looked up in timm's registry,
e.g. ``vit_small_patch16_224``, ``vit_tiny_patch16_224``, ``convnext_tiny``,
``convnext_atto`` or ``resnet50d``. timm's own ``resnet50`` is reachable with a
tag, e.g. ``resnet50.a1_in1k`` (the tag only names the variant: nothing is
downloaded).

The encoder is built without a classifier (``num_classes=0``), so its forward
returns pooled features ``[B, feature_dim]``; the SupCon projection head and the
linear classifier are sized from ``feature_dim``. Weights are random unless a
local checkpoint is given with ``pretrained_file``; this module never downloads.

    encoder, dim = create_encoder('vit_tiny_patch16_224', size=32, patch_size=4)
"""

import difflib
import os

import torch

from networks.resnet_big import MODEL_NAMES
from supcon.errors import UserError

# Names that would make timm fetch from the network or from somewhere other
# than its registry (Hugging Face hub, local-dir:, ...).
_SCHEMES = ('hf-hub:', 'hf_hub:', 'local-dir:', 'timm/')


def _timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is in requirements.txt
        raise UserError('timm models need the timm package: pip install "timm>=1.0,<2"') from None
    return timm


def is_timm_model(name):
    """True when ``name`` is a timm model name rather than one of our ResNets.

    Our four names (resnet18/34/50/101) always mean ``networks.resnet_big``.
    Unknown names are False here; ``create_encoder`` explains them.
    """
    if name in MODEL_NAMES or not isinstance(name, str) or name.startswith(_SCHEMES):
        return False
    return bool(_timm().is_model(name))


def unknown_model_error(name):
    timm = _timm()
    base = name.split('.')[0].lower()
    known = timm.list_models()
    close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
    if not close and base:
        close = timm.list_models(f'*{base[:4]}*')[:5]
    hint = f"did you mean {', '.join(close)}? " if close else ''
    family = base.split('_')[0][:8] or 'vit'
    return UserError(
        f"--model {name} is not known: not one of {', '.join(MODEL_NAMES)} nor a timm model; "
        f"{hint}see timm.list_models('{family}*') for the names timm knows"
    )


def _create(name, **kwargs):
    """timm.create_model that tells which keyword the architecture refused."""
    timm = _timm()
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **kwargs), None
    except TypeError as error:
        refused = [k for k in kwargs if f'unexpected keyword argument {k!r}' in str(error)]
        if not refused:
            raise
        return None, refused[0]


def create_encoder(name, size, patch_size=None, pretrained_file=None):
    """Build timm model ``name`` as a feature extractor; returns ``(module, feature_dim)``.

    - ``timm.create_model(name, pretrained=False, num_classes=0)``: no classifier,
      forward gives pooled features ``[B, feature_dim]`` with
      ``feature_dim = model.num_features``.
    - ``img_size=size`` is passed when the architecture takes it (ViTs, Swin, ...);
      convolutional nets that take any input size are built without it.
    - ``patch_size`` (ViT-style models only) replaces the name's patch size, e.g.
      ``vit_tiny_patch16_224`` with ``size=32, patch_size=4`` sees an 8x8 grid.
    - ``pretrained_file``: a local timm state dict (``.pth``/``.pt``/``.bin`` read
      with ``torch.load(weights_only=True)``, or ``.safetensors``). Classifier
      keys are dropped, the architecture's own checkpoint filter is applied where
      timm has one (it resamples ViT position and patch embeddings to the new
      size), and anything that still does not fit is a one-line ``UserError``.
    """
    if name in MODEL_NAMES:
        raise UserError(f'{name!r} is one of our CIFAR ResNets; build it with networks.resnet_big')
    if not isinstance(name, str) or name.startswith(_SCHEMES):
        raise UserError(
            f'model {name!r}: only timm registry names are accepted (nothing is'
            ' downloaded); give weights with a local pretrained file instead'
        )
    if not _timm().is_model(name):
        raise unknown_model_error(name)

    kwargs = {'img_size': size}
    if patch_size is not None:
        kwargs['patch_size'] = patch_size
    model, refused = _create(name, **kwargs)
    if refused == 'img_size':
        kwargs.pop('img_size')
        model, refused = _create(name, **kwargs)
    if refused == 'patch_size':
        raise UserError(
            f'timm model {name!r} has no patch size to set; drop the patch size'
            ' option or pick a ViT-style model'
        )
    if model is None:  # pragma: no cover - _create raises for anything else
        raise UserError(f'timm model {name!r} refused {refused!r}')

    if pretrained_file is not None:
        load_pretrained(model, name, pretrained_file, size=size, patch_size=patch_size)
    return model, int(model.num_features)


# --------------------------------------------------------------------------- checkpoints


def _read_state_dict(path):
    if not os.path.isfile(path):
        raise UserError(f'pretrained file {path!r} not found')
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file

            state = load_file(path, device='cpu')
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # corrupt file, pickled objects, ...
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f'cannot read pretrained file {path!r} as a state dict (weights only): {detail}'
        ) from None
    # timm's training checkpoints wrap the weights; so do DataParallel ones.
    if isinstance(state, dict):
        for key in ('state_dict', 'model'):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f'pretrained file {path!r} holds no state dict of tensors')
    if state and all(k.startswith('module.') for k in state):
        state = {k[len('module.') :]: v for k, v in state.items()}
    return state


def _classifier_names(model):
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    names = cfg.get('classifier') or 'head'
    return (names,) if isinstance(names, str) else tuple(names)


def _architecture_filter(model):
    """The ``checkpoint_filter_fn(state_dict, model)`` of the model's timm module, if any."""
    import sys

    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, 'checkpoint_filter_fn', None)
    return fn if callable(fn) else None


def load_pretrained(model, name, path, size=None, patch_size=None):
    """Load the local checkpoint ``path`` into the classifier-less timm ``model``."""
    state = _read_state_dict(path)
    own = model.state_dict()
    classifiers = _classifier_names(model)
    state = {
        k: v
        for k, v in state.items()
        if k in own or not any(k == c or k.startswith(c + '.') for c in classifiers)
    }

    fn = _architecture_filter(model)
    if fn is not None:
        try:
            state = fn(state, model)
        except Exception:  # not this architecture's layout: judged by the comparison below
            pass

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing (e.g. {missing[0]!r})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected (e.g. {unexpected[0]!r})')
        if wrong:
            k = wrong[0]
            parts.append(
                f'{len(wrong)} of another shape (e.g. {k!r} '
                f'{list(state[k].shape)} vs {list(own[k].shape)})'
            )
        setting = f'size {size}' + (f', patch {patch_size}' if patch_size else '')
        raise UserError(
            f'pretrained file {path!r} does not fit timm model {name!r} ({setting}):'
            f" {', '.join(parts)} keys; give a checkpoint of the same architecture"
        )
    model.load_state_dict(state, strict=True)
    return model
