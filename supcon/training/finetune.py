"""main_linear.py --finetune: the encoder trains with the classifier instead of staying frozen.

Linear evaluation measures the pretrained features as they are; fine-tuning asks how good a
classifier the pretrained network becomes when all of it trains on the labels (solo-learn's
``--finetune``, MoCo v3's fine-tuning). What changes, and nothing else:

- the network: the checkpoint's encoder and main_linear.py's classifier as one module with
  main_ce.py's layout (``encoder.*``, ``fc.*``: ``SupCEResNet``), so the checkpoint holds the
  fine-tuned encoder and every reader of a main_ce.py checkpoint reads it (main_predict.py,
  main_export.py, main_retrieval.py, main_tsne.py);
- BatchNorm in training mode (main_linear.py's ``train`` puts the whole module in train mode)
  and the training augmentation of ``--aug`` (the reference's crop and flip by default);
- two parameter groups: the classifier at ``--learning_rate`` and the encoder at
  ``--encoder_lr``; the schedule and warm-up scale both alike (a group's ``lr_scale``,
  ``util.set_lr``), so the encoder's rate stays ``encoder_lr / learning_rate`` of the
  classifier's all along;
- the run name ends in ``_finetune`` (``_finetune_elr{X}`` with another ``--encoder_lr``).

Its options are declared as the training scripts' capabilities declare theirs: ``add_arguments``,
``check_options``, ``take_from_checkpoint``, ``run_name`` and ``FIXED``.
"""

import math

import torch.nn as nn

from networks.resnet_big import SupCEResNet
from supcon.errors import UserError
from supcon.system.runtime import unwrap
from supcon.training.optim import build_optimizer as build_plain_optimizer
from supcon.training.optim import lars_param_groups

DEFAULT_ENCODER_LR = 0.01


def add_arguments(parser):
    group = parser.add_argument_group('fine-tuning (not in the reference)')
    group.add_argument(
        '--finetune',
        action='store_true',
        help='train the encoder with the classifier (BatchNorm in training mode, the --aug'
        ' augmentation) instead of keeping it frozen; the checkpoint holds both',
    )
    group.add_argument(
        '--encoder_lr',
        type=float,
        default=DEFAULT_ENCODER_LR,
        help='--finetune: the encoder\'s learning rate, scheduled as --learning_rate is',
    )
    return group


def check_options(opt, script='linear'):
    """--encoder_lr only with --finetune, finite and positive."""
    if script != 'linear':
        return
    if not opt.finetune:
        if opt.encoder_lr != DEFAULT_ENCODER_LR:
            raise UserError('--encoder_lr is the learning rate of --finetune; add --finetune')
        return
    if not (math.isfinite(opt.encoder_lr) and opt.encoder_lr > 0):
        raise UserError(f'--encoder_lr must be a finite number > 0, got {opt.encoder_lr}')


def take_from_checkpoint(opt, saved):
    """The encoder's ViT patch size (``saved``: the pretraining checkpoint's options) becomes
    the run's, so that its checkpoint rebuilds the encoder it holds (networks/from_checkpoint.py)
    and its name says it (``_patch_{P}``), as main_supcon.py's does."""
    if getattr(opt, 'finetune', False) and saved.get('patch_size') is not None:
        opt.patch_size = saved['patch_size']


def run_name(opt, script='linear'):
    """``finetune``, then ``elr{X}`` for an --encoder_lr other than the default."""
    if script != 'linear' or not getattr(opt, 'finetune', False):
        return []
    other = opt.encoder_lr != DEFAULT_ENCODER_LR
    return ['finetune'] + ([f'elr{opt.encoder_lr}'] if other else [])


#: what a --resume may not change
FIXED = ('finetune', 'encoder_lr')


def trainable(encoder: nn.Module, classifier: nn.Module, opt):
    """``(nothing frozen, the network to train)``: main_linear.py's frozen encoder becomes the
    identity and its classifier the whole network, so its loop trains and saves all of it."""
    encoder.requires_grad_(True)
    network = SupCEResNet(opt.model, encoder=(encoder, encoder.feature_dim))
    network.fc = classifier.fc  # main_linear.py's classifier, as initialised there
    return nn.Identity(), network


def build_optimizer(opt, model):
    """The classifier's group(s) first (their rate is the one logged), then the encoder's,
    each with ``lr_scale = encoder_lr / learning_rate``; without --finetune, main_linear.py's
    optimizer of the classifier."""
    if not opt.finetune:
        return build_plain_optimizer(opt, model)
    network = unwrap(model)
    optimizer = build_plain_optimizer(opt, network.fc)
    scale = opt.encoder_lr / opt.learning_rate
    if (getattr(opt, 'optimizer', None) or 'sgd') == 'lars':
        groups = lars_param_groups(network.encoder, opt.weight_decay)
    else:
        groups = [{'params': [p for p in network.encoder.parameters() if p.requires_grad]}]
    for group in groups:
        optimizer.add_param_group(dict(group, lr=opt.encoder_lr, lr_scale=scale))
    return optimizer
