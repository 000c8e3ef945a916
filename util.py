"""What the reference's ``util.py`` holds, with the same names and signatures.

Users' own scripts import these (``from util import TwoCropTransform, AverageMeter,
adjust_learning_rate, warmup_learning_rate, accuracy, set_optimizer, save_model``), so
they stay here; ``UserError`` is the one-line error every script prints (defined in
``supcon.errors``). Of the project it imports only the two leaf modules ``supcon.errors``
and ``supcon.system.atomic`` (the one atomic write), so every other module may import it.
"""

import argparse
import math

import numpy as np
import torch

from supcon.errors import NonFiniteLossError, UserError  # noqa: F401 (re-exported)
from supcon.system.atomic import atomic_save


class TwoCropTransform:
    """Two independent augmentations of one image: the positive pair of contrastive learning."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, x):
        return [self.transform(x), self.transform(x)]


class AverageMeter:
    """Running value, sum, count and average."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0

    def state_dict(self):
        return {'sum': self.sum, 'count': self.count}

    def load_state_dict(self, state):
        self.sum, self.count = float(state['sum']), int(state['count'])
        self.avg = self.sum / self.count if self.count else 0.0


def correct_counts(output, target, topk=(1,)):
    """Number of samples whose label is among the top-k predictions, per k."""
    maxk = min(max(topk), output.shape[1])
    _, pred = output.topk(maxk, 1, True, True)
    hits = pred.t().eq(target.view(1, -1))
    return [hits[: min(k, maxk)].reshape(-1).float().sum() for k in topk]


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent, as the reference's ``accuracy``."""
    with torch.no_grad():
        batch_size = target.size(0)
        return [c.mul(100.0 / batch_size) for c in correct_counts(output, target, topk)]


# --------------------------------------------------------------------------- schedule


def learning_rate_at(opt, epoch):
    """Epoch learning rate of the reference: cosine to lr * rate**3, or step decay."""
    lr = opt.learning_rate
    if opt.cosine:
        eta_min = lr * (opt.lr_decay_rate**3)
        lr = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * epoch / opt.epochs)) / 2
    else:
        steps = int(np.sum(epoch > np.asarray(opt.lr_decay_epochs)))
        if steps > 0:
            lr = lr * (opt.lr_decay_rate**steps)
    return lr


def adjust_learning_rate(args, optimizer, epoch):
    """Set every parameter group's learning rate to the schedule's value for ``epoch``."""
    set_lr(optimizer, learning_rate_at(args, epoch))


def warmup_learning_rate(args, epoch, batch_id, total_batches, optimizer):
    """Per-batch linear warm-up over the first ``warm_epochs`` epochs (1-based); sets the lr."""
    if args.warm and epoch <= args.warm_epochs:
        p = (batch_id + (epoch - 1) * total_batches) / (args.warm_epochs * total_batches)
        set_lr(optimizer, args.warmup_from + p * (args.warmup_to - args.warmup_from))


def set_lr(optimizer, lr):
    # a group's lr_scale (MAE's name) keeps its rate a fixed multiple of the schedule's:
    # main_linear.py --finetune's encoder, at --encoder_lr (supcon/training/finetune.py)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)


def set_optimizer(opt, model):
    return torch.optim.SGD(
        model.parameters(),
        lr=opt.learning_rate,
        momentum=opt.momentum,
        weight_decay=opt.weight_decay,
    )


def save_model(model, optimizer, opt, epoch, save_file):
    """Save as the reference does: ``{'opt', 'model', 'optimizer', 'epoch'}``, ``opt`` a Namespace.

    Written to a temporary file and renamed, so an interrupted save leaves the
    previous file (or none), never a truncated one. Prints ``==> Saving...``.
    """
    print('==> Saving...')
    state = {
        'opt': opt if isinstance(opt, argparse.Namespace) else argparse.Namespace(**vars(opt)),
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'epoch': epoch,
    }
    atomic_save(state, save_file)
    del state
