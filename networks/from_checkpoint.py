"""Rebuild the networks a checkpoint holds: its encoder (and projection head), weights loaded.

Used by main_linear.py, main_tsne.py and any script that reads a checkpoint of
main_supcon.py or main_ce.py (ours or the reference's), including the reference
author's released ImageNet SupCon ResNet-50, whose encoder is stored in
torchvision's layout (see ``from_torchvision_layout``).

In Python, the encoder of such a file is::

    from supcon.system.checkpoint import load_checkpoint
    from networks.from_checkpoint import encoder_from_checkpoint
    encoder, model = encoder_from_checkpoint(load_checkpoint('supcon.pth'), 'supcon.pth')
    features = encoder(images)   # [N, 2048] pooled features

The scripts that read a checkpoint (main_linear.py, main_tsne.py, main_retrieval.py) take its
flags from ``add_checkpoint_arguments``.
"""

import re

from networks.encoders import build_encoder as build_backbone
from networks.encoders import check_model_name
from networks.resnet_big import MODEL_NAMES, SupConResNet
from supcon.errors import UserError

# torchvision's ResNet names a block's projection `downsample`; the reference (and we) `shortcut`
_TORCHVISION_BLOCK = re.compile(r'^encoder\.layer\d+\.\d+\.downsample\.')
# what a checkpoint of our ResNets (or of none recorded: the reference's released one) records
_OURS = (None, *MODEL_NAMES)
# blocks per stage -> our model name, for a torchvision-layout encoder without recorded options
_DEPTHS = {
    (2, 2, 2, 2, False): 'resnet18',
    (3, 4, 6, 3, False): 'resnet34',
    (3, 4, 6, 3, True): 'resnet50',
    (3, 4, 23, 3, True): 'resnet101',
}


def from_torchvision_layout(state):
    """``(state, model, stem)`` with a torchvision-layout encoder renamed to ours, or None.

    The reference author's ImageNet checkpoint holds ``encoder.*`` in torchvision's ResNet
    layout (``downsample.0/1``, a 7x7 stride-2 ``conv1`` with max-pool, an ``fc`` that the
    encoder does not use) plus ``head.0/2.*`` (``module.`` prefixes are already stripped).
    Our ResNet with ``stem='imagenet'`` computes the same function with the same tensors,
    so renaming ``downsample`` to ``shortcut`` and dropping ``fc`` is the whole conversion.
    """
    if not any(_TORCHVISION_BLOCK.match(key) for key in state):
        return None
    renamed = {}
    for key, value in state.items():
        if key.startswith('encoder.fc.'):
            continue
        if _TORCHVISION_BLOCK.match(key):
            key = key.replace('.downsample.', '.shortcut.', 1)
        renamed[key] = value
    blocks = []
    for stage in range(1, 5):
        indices = {
            int(m.group(1))
            for key in renamed
            for m in [re.match(rf'^encoder\.layer{stage}\.(\d+)\.', key)]
            if m
        }
        blocks.append(len(indices))
    bottleneck = any(re.match(r'^encoder\.layer1\.0\.conv3\.', key) for key in renamed)
    model = _DEPTHS.get(tuple(blocks) + (bottleneck,))
    if model is None:
        raise UserError(
            f'a torchvision-layout ResNet with {blocks} blocks per stage is not one'
            f' of {", ".join(MODEL_NAMES)}'
        )
    conv1 = renamed.get('encoder.conv1.weight')
    stem = 'imagenet' if conv1 is not None and conv1.shape[-1] == 7 else 'cifar'
    return renamed, model, stem


def encoder_state(ckpt, key_encoder=False):
    """The checkpoint's ``encoder.*``/``head.*`` weights in our layout, and what it records.

    Returns ``(state, recorded)`` where ``recorded`` holds the options that rebuild the
    encoder (model, stem, size, patch_size) as far as the checkpoint tells them.
    ``key_encoder=True`` takes the momentum encoder of a ``--moco`` run instead.
    """
    saved = dict(ckpt.get('opt', {}))
    if key_encoder:
        moco, prefix = ckpt.get('moco'), 'key_encoder.model.'
        state = (
            {k[len(prefix) :]: v for k, v in moco.items() if k.startswith(prefix)}
            if isinstance(moco, dict)
            else {}
        )
        if not state:
            raise UserError(
                '--key_encoder needs a checkpoint of main_supcon.py --moco (it holds'
                ' the momentum encoder); drop --key_encoder for this one'
            )
    else:
        state = ckpt['model']
    # timm's ResNets name their projections `downsample` too: a checkpoint that records a
    # timm model is in that model's own layout, never the released torchvision one
    converted = from_torchvision_layout(state) if saved.get('model') in _OURS else None
    if converted is not None:
        state, model, stem = converted
        saved.update(model=saved.get('model', model), stem=stem)
    return state, saved


def checkpoint_model(ckpt, path, model=None):
    """(model, stem) of the encoder in a loaded checkpoint; ``model`` (--model) must agree.

    Checkpoints that do not record their model are taken to hold the reference's
    default resnet50 (a torchvision-layout encoder tells its own); the stem defaults
    to the reference's.
    """
    _, saved = encoder_state(ckpt)
    if model is None:
        model = saved.get('model', 'resnet50')
    check_model_name(model)
    if saved.get('model') not in (None, model):
        raise UserError(
            f'--ckpt {path} holds a {saved["model"]} encoder, not --model'
            f' {model}; pass --model {saved["model"]}'
        )
    return model, saved.get('stem', 'cifar')


def checkpoint_method(ckpt):
    """'SupCE' for a cross-entropy checkpoint (it has a classifier ``fc``), 'finetune' for a
    main_linear.py --finetune one (the same layout), else its --method."""
    if any(key.startswith('fc.') for key in ckpt['model']):
        return 'finetune' if ckpt.get('opt', {}).get('finetune') else 'SupCE'
    return ckpt.get('opt', {}).get('method', 'SupCon')


def encoder_from_checkpoint(ckpt, path, model=None, key_encoder=False):
    """The checkpoint's encoder with its weights loaded, in eval mode; returns (encoder, model).

    The encoder's feature width is ``encoder.feature_dim``.
    """
    model, stem = checkpoint_model(ckpt, path, model)
    state, saved = encoder_state(ckpt, key_encoder)
    encoder, dim = build_backbone(
        model, stem=stem, size=saved.get('size') or 32, patch_size=saved.get('patch_size')
    )
    load_encoder(encoder, state, path, model)
    encoder.feature_dim = dim
    return encoder.eval(), model


def head_from_checkpoint(ckpt, path, model, dim_in, key_encoder=False):
    """The projection head of a SupCon/SimCLR checkpoint, weights loaded, in eval mode.

    Its kind (mlp or linear) and width are read from the weights, because the
    reference's checkpoints (and ours) do not record them in their options.
    """
    state, _ = encoder_state(ckpt, key_encoder)
    if 'head.0.weight' in state and 'head.2.weight' in state:
        kind, feat_dim = 'mlp', state['head.2.weight'].shape[0]
    elif 'head.weight' in state:
        kind, feat_dim = 'linear', state['head.weight'].shape[0]
    elif any(key.startswith('fc.') for key in state):
        raise UserError(
            f'--features head needs a projection head, but --ckpt {path} is a'
            f' cross-entropy (SupCE) checkpoint with a classifier instead; use'
            f' --features encoder'
        )
    else:
        raise UserError(
            f'--features head needs a projection head, but --ckpt {path} has'
            f' no "head." weights; use --features encoder'
        )
    placeholder = (None, dim_in)  # only the head is kept
    head = SupConResNet(name=model, head=kind, feat_dim=feat_dim, encoder=placeholder).head
    head_state = {k[len('head.') :]: v for k, v in state.items() if k.startswith('head.')}
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError:
        raise UserError(
            f'--ckpt {path}: its projection head does not fit a {model}'
            f' encoder ({dim_in} features); pass the --model it'
            f' was trained with'
        ) from None
    return head.eval()


def load_encoder(encoder, state_dict, path, model_name):
    """Load the ``encoder.*`` weights of a checkpoint into ``encoder`` strictly."""
    prefix = 'encoder.'
    enc_state = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not enc_state:
        raise UserError(
            f'--ckpt {path} holds no encoder weights (no "encoder." keys); pass a'
            f' checkpoint written by main_supcon.py or main_ce.py'
        )
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in enc_state]
    unexpected = [k for k in enc_state if k not in expected]
    reshaped = [k for k in expected if k in enc_state and enc_state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        what = ', '.join(
            f'{len(keys)} {kind} (e.g. {keys[0]})'
            for kind, keys in (
                ('missing', missing),
                ('unexpected', unexpected),
                ('of another shape', reshaped),
            )
            if keys
        )
        raise UserError(
            f'--ckpt {path} does not fit a {model_name} encoder: {what} weights;'
            f' pass the --model it was trained with, or check that it is a'
            f' checkpoint of these scripts'
        )
    encoder.load_state_dict(enc_state, strict=True)


#: Per script that reads a checkpoint: what it does with it, in its flags' help and errors.
_READERS = {
    'linear': dict(
        ckpt='the pretraining checkpoint to evaluate',
        model_default='what the checkpoint records (resnet50 for one that does not say); when'
        ' given it must agree',
        key_encoder='evaluate the momentum (key) encoder of a --moco checkpoint instead of the'
        ' trained (query) encoder',
        features=None,
    ),
    'tsne': dict(
        ckpt='the checkpoint whose encoder to draw',
        model_default='what the checkpoint records (resnet50 for one that does not say); when'
        ' given it must agree',
        key_encoder='draw the momentum (key) encoder of a --moco checkpoint (default figure:'
        ' <ckpt name>_tsne_key_<features>.png)',
        features='the L2-normalised projections the contrastive loss saw (SupCon/SimCLR'
        ' checkpoints only)',
    ),
    'retrieval': dict(
        ckpt='the checkpoint whose encoder to measure',
        model_default='the checkpoint\'s',
        key_encoder='measure the momentum (key) encoder of a --moco checkpoint',
        features='the projections the contrastive loss saw (SupCon/SimCLR checkpoints only);'
        ' both L2-normalised',
    ),
}
_CKPT_EXAMPLE = './save/SupCon/cifar10_models/<run>/last.pth'


def add_ckpt_argument(parser, script):
    """--ckpt, the checkpoint ``script`` ('linear', 'tsne', 'retrieval') reads."""
    parser.add_argument(
        '--ckpt', type=str, default='', help=f'(required) {_READERS[script]["ckpt"]}'
    )


def add_checkpoint_arguments(parser, script, ckpt=True):
    """The flags of the scripts that read a checkpoint: --ckpt (unless ``ckpt=False``: the
    caller adds it where its help lists it, ``add_ckpt_argument``), --model, --key_encoder and,
    for main_tsne.py and main_retrieval.py, --features."""
    texts = _READERS[script]
    if ckpt:
        add_ckpt_argument(parser, script)
    named = 'the encoder in --ckpt: ' if script != 'retrieval' else ''
    parser.add_argument(
        '--model',
        type=str,
        default=None,
        help=f'{named}{", ".join(MODEL_NAMES)} or a timm name; default: {texts["model_default"]}',
    )
    parser.add_argument('--key_encoder', action='store_true', help=texts['key_encoder'])
    if texts['features'] is not None:
        parser.add_argument(
            '--features',
            type=str,
            default='encoder',
            choices=['encoder', 'head'],
            help=f'encoder: the pooled features linear evaluation uses; head: {texts["features"]}',
        )


def check_checkpoint_arguments(opt, script):
    """--ckpt is required (one line naming what to pass)."""
    if not opt.ckpt:
        what = _READERS[script]['ckpt'].replace(
            'the checkpoint whose encoder to', 'the checkpoint to'
        )
        raise UserError(f'--ckpt is required: pass {what}, e.g. {_CKPT_EXAMPLE}')


def run_name(opt, script):
    """main_linear.py evaluates the key encoder of a --moco checkpoint into its own folder."""
    return ['key_encoder'] if getattr(opt, 'key_encoder', False) else []
