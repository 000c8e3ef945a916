"""Rebuild the networks a checkpoint holds: its encoder (and projection head), weights loaded.

Used by main_linear.py, main_tsne.py and any script that reads a checkpoint of
main_supcon.py or main_ce.py (ours or the reference's).
"""
from networks.resnet_big import MODEL_NAMES, SupConResNet, feature_dim
from util import UserError


def checkpoint_model(ckpt, path, model=None):
    """(model, stem) of the encoder in a loaded checkpoint; ``model`` (--model) must agree.

    Checkpoints that do not record their model (none of ours) are taken to hold
    the reference's default resnet50; the stem defaults to the reference's.
    """
    saved = ckpt.get('opt', {})
    if model is None:
        model = saved.get('model', 'resnet50')
    if model not in MODEL_NAMES:
        raise UserError(f'--model {model} is not known; choose one of {", ".join(MODEL_NAMES)}')
    if saved.get('model') not in (None, model):
        raise UserError(f'--ckpt {path} holds a {saved["model"]} encoder, not --model'
                             f' {model}; pass --model {saved["model"]}')
    return model, saved.get('stem', 'cifar')


def checkpoint_method(ckpt):
    """'SupCE' for a cross-entropy checkpoint (it has a classifier ``fc``), else its --method."""
    if any(key.startswith('fc.') for key in ckpt['model']):
        return 'SupCE'
    return ckpt.get('opt', {}).get('method', 'SupCon')


def build_encoder(ckpt, path, model=None):
    """The checkpoint's encoder with its weights loaded, in eval mode; returns (encoder, model)."""
    model, stem = checkpoint_model(ckpt, path, model)
    encoder = SupConResNet(name=model, stem=stem).encoder
    load_encoder(encoder, ckpt['model'], path, model)
    return encoder.eval(), model


def build_head(ckpt, path, model):
    """The projection head of a SupCon/SimCLR checkpoint, weights loaded, in eval mode.

    Its kind (mlp or linear) and width are read from the weights, because the
    reference's checkpoints (and ours) do not record them in their options.
    """
    state = ckpt['model']
    if 'head.0.weight' in state and 'head.2.weight' in state:
        kind, feat_dim = 'mlp', state['head.2.weight'].shape[0]
    elif 'head.weight' in state:
        kind, feat_dim = 'linear', state['head.weight'].shape[0]
    elif any(key.startswith('fc.') for key in state):
        raise UserError(f'--features head needs a projection head, but --ckpt {path} is a'
                             f' cross-entropy (SupCE) checkpoint with a classifier instead; use'
                             f' --features encoder')
    else:
        raise UserError(f'--features head needs a projection head, but --ckpt {path} has'
                             f' no "head." weights; use --features encoder')
    head = SupConResNet(name=model, head=kind, feat_dim=feat_dim).head
    head_state = {k[len('head.'):]: v for k, v in state.items() if k.startswith('head.')}
    try:
        head.load_state_dict(head_state, strict=True)
    except RuntimeError:
        raise UserError(f'--ckpt {path}: its projection head does not fit a {model}'
                             f' encoder ({feature_dim(model)} features); pass the --model it'
                             f' was trained with') from None
    return head.eval()


def load_encoder(encoder, state_dict, path, model_name):
    """Load the ``encoder.*`` weights of a checkpoint into ``encoder`` strictly."""
    prefix = 'encoder.'
    enc_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not enc_state:
        raise UserError(f'--ckpt {path} holds no encoder weights (no "encoder." keys); pass a'
                        f' checkpoint written by main_supcon.py or main_ce.py')
    try:
        encoder.load_state_dict(enc_state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f'--ckpt {path} does not fit --model {model_name} ({first[:160]});'
                        f' pass the --model (and --stem) it was trained with') from None
