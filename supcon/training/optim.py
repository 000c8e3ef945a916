"""Optimisers for ``--optimizer sgd|lars``.

``sgd`` (the default) is the reference's plain SGD: ``util.set_optimizer``, one
group over every parameter, ``lr=opt.learning_rate``, ``momentum=opt.momentum``,
``weight_decay=opt.weight_decay``.

``lars`` is timm's maintained LARS (``timm.optim.Lars``, You et al. 2017,
arXiv:1708.03888), which the SupCon paper used for its ImageNet pre-training.
For each parameter ``w`` with gradient ``g`` in an adapted group timm computes

    trust = trust_coeff * ||w|| / (||g|| + weight_decay * ||w|| + eps)
            (1.0 when ||w|| or ||g|| is zero)
    d     = trust * (g + weight_decay * w)
    buf   = momentum * buf + d          (buf = d on the first step)
    w    -= lr * buf

and a group that is not adapted takes the plain step ``buf = momentum * buf +
g``, ``w -= lr * buf`` (identical to ``torch.optim.SGD`` with momentum and no
weight decay). Choices made here:

- two groups, the usual exclusion of SimCLR, BYOL and solo-learn:
  weights (``ndim > 1``: conv kernels, linear matrices) get ``weight_decay`` and
  the trust-ratio adaptation (``always_adapt=True``, so they are adapted even
  with ``--weight_decay 0``); biases and normalisation scales/shifts
  (``ndim <= 1``) get neither (``weight_decay=0``, ``always_adapt=False``).
  Parameters a timm model lists in ``no_weight_decay()`` (a ViT's ``pos_embed``
  and ``cls_token``) join the second group, as timm itself treats them.
  Only parameters with ``requires_grad`` are optimised;
- ``trust_coeff=0.001`` (the eta of the LARS paper and of SimCLR),
  ``eps=1e-8`` (only guards the division), ``trust_clip=False`` (LARS, not
  LARC: the trust ratio is not clipped at 1/lr), no Nesterov, no dampening;
- both groups start with the same ``lr`` and ``momentum`` as SGD; the
  schedule and warm-up keep setting ``param_group['lr']`` on every group.

timm's denominator ``||g|| + wd * ||w||`` is the LARS paper's; SimCLR's TF code
uses ``||g + wd * w||`` instead (equal when ``g`` and ``w`` point the same way,
and the two differ little in practice).
"""

import util

OPTIMIZER_NAMES = ('sgd', 'lars')

LARS_TRUST_COEFF = 1e-3
LARS_EPS = 1e-8
LARS_TRUST_CLIP = False


def _no_decay_names(model):
    """Full names of the parameters timm models ask to keep out of weight decay."""
    names = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, 'no_weight_decay', None)
        if not callable(fn):
            continue
        try:
            listed = fn()
        except Exception:
            continue
        for name in listed or ():
            names.add(f'{prefix}.{name}' if prefix else name)
    return names


def lars_param_groups(model, weight_decay):
    """``[weights, biases_and_norms]`` groups for LARS (empty groups left out)."""
    skip = _no_decay_names(model)
    adapted, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in skip:
            plain.append(param)
        else:
            adapted.append(param)
    groups = []
    if adapted:
        groups.append({'params': adapted, 'weight_decay': weight_decay, 'always_adapt': True})
    if plain:
        groups.append({'params': plain, 'weight_decay': 0.0, 'always_adapt': False})
    return groups


#: Options a resume may not change.
FIXED = ('optimizer',)


def add_argument(parser):
    """--optimizer sgd|lars."""
    parser.add_argument(
        '--optimizer',
        type=str,
        default='sgd',
        choices=OPTIMIZER_NAMES,
        help='lars: timm\'s LARS for large batches, biases and norms excluded (optim.py)',
    )


def run_name(opt, script):
    return [opt.optimizer] if getattr(opt, 'optimizer', 'sgd') != 'sgd' else []


def build_optimizer(opt, model, extra=()):
    """The optimiser ``opt.optimizer`` names (``sgd`` when the attribute is missing).

    The parameters of the ``extra`` modules (e.g. the joint classifier of
    supcon/objectives/probe.py) join it as groups of their own with the optimiser's settings:
    one more group, or two for LARS (weights adapted, biases not).
    """
    name = getattr(opt, 'optimizer', None) or 'sgd'
    if name == 'sgd':
        optimizer = util.set_optimizer(opt, model)
        for module in extra:
            optimizer.add_param_group({'params': list(module.parameters())})
        return optimizer
    if name == 'lars':
        from timm.optim import Lars

        groups = lars_param_groups(model, opt.weight_decay)
        if not groups:
            raise util.UserError('the model has no trainable parameters to optimise')
        optimizer = Lars(
            groups,
            lr=opt.learning_rate,
            momentum=opt.momentum,
            weight_decay=opt.weight_decay,
            trust_coeff=LARS_TRUST_COEFF,
            eps=LARS_EPS,
            trust_clip=LARS_TRUST_CLIP,
        )
        for module in extra:
            for group in lars_param_groups(module, opt.weight_decay):
                optimizer.add_param_group(group)
        return optimizer
    raise util.UserError(
        f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}"
    )
