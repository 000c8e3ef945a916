"""Command-line helpers shared by the entry scripts: parsing, checks, warm-up set-up, printing.

Each script keeps the reference's flat argparse; these functions parse the
values the reference parsed by hand and refuse values that cannot work, with a
one-line ``UserError`` that names the flag and the fix.
"""
import math
import sys

import torch

from runtime import is_main_process
from util import UserError


def parse_decay_epochs(text):
    try:
        return [int(item) for item in str(text).split(',') if item.strip()]
    except ValueError:
        raise UserError(f'--lr_decay_epochs must be comma-separated epochs such as'
                        f' "700,800,900", got {text!r}') from None


def configure_warmup(opt, large_batch=256):
    """Reference warm-up: from 0.01 over 10 epochs, forced on for large batches.

    ``large_batch=None`` keeps warm-up opt-in (the reference's linear script).
    """
    if large_batch is not None and opt.batch_size > large_batch:
        opt.warm = True
    if opt.warm:
        opt.model_name = '{}_warm'.format(opt.model_name)
        opt.warmup_from = 0.01
        opt.warm_epochs = 10
        if opt.cosine:
            eta_min = opt.learning_rate * (opt.lr_decay_rate ** 3)
            opt.warmup_to = eta_min + (opt.learning_rate - eta_min) * (
                1 + math.cos(math.pi * opt.warm_epochs / opt.epochs)) / 2
        else:
            opt.warmup_to = opt.learning_rate


def check_choice(value, choices, flag):
    if value not in choices:
        raise UserError(f'{flag} {value} is not known; choose one of {", ".join(choices)}')


def check_common_options(opt):
    for name in ('batch_size', 'epochs', 'save_freq', 'print_freq', 'size', 'batch_size_val'):
        value = getattr(opt, name, None)
        if value is not None and value < 1:
            raise UserError(f'--{name} must be a positive integer, got {value}')
    if opt.learning_rate <= 0:
        raise UserError(f'--learning_rate must be positive, got {opt.learning_rate}')
    if opt.num_workers < 0:
        raise UserError(f'--num_workers must be 0 or more, got {opt.num_workers}')


def print_options(opt):
    if not is_main_process():
        return
    print('options:')
    for key, value in sorted(plain_options(opt).items()):
        print(f'  {key}: {value}')
    sys.stdout.flush()


def plain_options(opt):
    """The options as a dict of plain values, safe for ``weights_only`` loading."""
    plain = {}
    for key, value in vars(opt).items():
        if isinstance(value, torch.device):
            value = str(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            plain[key] = value
        elif isinstance(value, (list, tuple)) and all(
                isinstance(v, (bool, int, float, str)) for v in value):
            plain[key] = list(value)
    return plain
