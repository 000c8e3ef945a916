"""Command-line helpers shared by the entry scripts: parsing, checks, warm-up set-up, printing.

Each script keeps the reference's flat argparse; these functions parse the
values the reference parsed by hand and refuse values that cannot work, with a
one-line ``UserError`` that names the flag and the fix.
"""

import math
import sys

from networks.timm_backbone import is_timm_model
from supcon import capabilities
from supcon.data.datasets import DATASET_NAMES
from supcon.errors import UserError
from supcon.system.checkpoint import plain_options
from supcon.system.runtime import is_main_process
from supcon.training import optim


def parse_decay_epochs(text):
    try:
        return [int(item) for item in str(text).split(',') if item.strip()]
    except ValueError:
        raise UserError(
            f'--lr_decay_epochs must be comma-separated epochs such as "700,800,900", got {text!r}'
        ) from None


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
            eta_min = opt.learning_rate * (opt.lr_decay_rate**3)
            opt.warmup_to = (
                eta_min
                + (opt.learning_rate - eta_min)
                * (1 + math.cos(math.pi * opt.warm_epochs / opt.epochs))
                / 2
            )
        else:
            opt.warmup_to = opt.learning_rate


def finish_run_name(opt, script, large_batch=256):
    """The tail of every run name after the reference's head: ``_cosine``, then the warm-up
    (``configure_warmup``, forced above ``large_batch`` as the reference does, ``_warm``), then
    the parts of the capabilities the reference does not have, only those in use, so that the
    reference's run names stay exactly as they were (``capabilities.run_name_parts``)."""
    if opt.cosine:
        opt.model_name = '{}_cosine'.format(opt.model_name)
    configure_warmup(opt, large_batch=large_batch)
    opt.model_name = '_'.join([opt.model_name] + capabilities.run_name_parts(opt, script))


def check_choice(value, choices, flag):
    if value not in choices:
        raise UserError(f'{flag} {value} is not known; choose one of {", ".join(choices)}')


#: Float flags of the training scripts: (their range in words, the test of a finite value).
FLOAT_FLAGS = {
    'learning_rate': ('> 0', lambda v: v > 0),
    'temp': ('> 0', lambda v: v > 0),
    'momentum': ('in [0, 1)', lambda v: 0 <= v < 1),
    'weight_decay': ('>= 0', lambda v: v >= 0),
    'lr_decay_rate': ('in (0, 1]', lambda v: 0 < v <= 1),
}


def check_float_option(opt, name):
    """Refuse NaN, infinity and out-of-range values of a float flag (when the script has it)."""
    value = getattr(opt, name, None)
    if value is None or name not in FLOAT_FLAGS:
        return
    words, in_range = FLOAT_FLAGS[name]
    if not math.isfinite(value) or not in_range(value):
        raise UserError(f'--{name} must be a finite number {words}, got {value}')


def check_common_options(opt):
    for name in (
        'batch_size',
        'epochs',
        'save_freq',
        'eval_freq',
        'print_freq',
        'size',
        'batch_size_val',
        'patch_size',
    ):
        value = getattr(opt, name, None)
        if value is not None and value < 1:
            raise UserError(f'--{name} must be a positive integer, got {value}')
    for name in FLOAT_FLAGS:
        check_float_option(opt, name)
    for name, value in sorted(vars(opt).items()):  # any other float flag: no NaN or infinity
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f'--{name} must be a finite number, got {value}')
    if opt.num_workers < 0:
        raise UserError(f'--num_workers must be 0 or more, got {opt.num_workers}')


def print_options(options):
    """Print the run's configuration (a dict such as ``Bookkeeper.options()``, or a Namespace)."""
    if not is_main_process():
        return
    if not isinstance(options, dict):
        options = plain_options(options)
    print('options:')
    for key, value in sorted(options.items()):
        print(f'  {key}: {value}')
    sys.stdout.flush()


def add_training_arguments(
    parser, epochs, learning_rate, lr_decay_epochs, lr_decay_rate=0.1, weight_decay=1e-4,
    num_workers_val=True,
):  # fmt: skip
    """The reference's printing, saving, loader and optimisation flags, each script's defaults
    given (``num_workers_val``: the scripts that score a test split every epoch get the fork's
    --num_workers_val and --eval_freq)."""
    parser.add_argument('--print_freq', type=int, default=10, help='print every N steps')
    parser.add_argument(
        '--save_freq', type=int, default=50, help='keep ckpt_epoch_N.pth every N epochs'
    )
    parser.add_argument(
        '--batch_size',
        type=int,
        default=256,
        help='global batch size (summed over GPUs and processes)',
    )
    parser.add_argument(
        '--num_workers',
        type=int,
        default=16,
        help='data loading workers per process, capped at the CPUs present',
    )
    if num_workers_val:
        parser.add_argument(
            '--num_workers_val',
            type=int,
            default=8,
            help='data loading workers for the test split (the fork\'s flag)',
        )
        parser.add_argument(
            '--eval_freq',
            type=int,
            default=1,
            help='score the test split every N epochs and after the last (the reference: every'
            ' epoch); training is the same whatever N',
        )
    parser.add_argument('--epochs', type=int, default=epochs, help='number of training epochs')

    # optimization
    parser.add_argument('--learning_rate', type=float, default=learning_rate, help='learning rate')
    parser.add_argument(
        '--lr_decay_epochs',
        type=str,
        default=lr_decay_epochs,
        help='comma-separated epochs after which the learning rate decays (without --cosine)',
    )
    parser.add_argument(
        '--lr_decay_rate', type=float, default=lr_decay_rate, help='decay rate for learning rate'
    )
    parser.add_argument('--weight_decay', type=float, default=weight_decay, help='weight decay')
    parser.add_argument('--momentum', type=float, default=0.9, help='momentum')
    optim.add_argument(parser)


def add_schedule_arguments(parser, sync_bn=True, trial=True):
    """The reference's "other setting" flags: --cosine, --syncBN, --warm, --trial."""
    parser.add_argument('--cosine', action='store_true', help='using cosine annealing')
    if sync_bn:
        parser.add_argument(
            '--syncBN',
            action='store_true',
            help='synchronise BatchNorm over processes (under torchrun)',
        )
    parser.add_argument('--warm', action='store_true', help='warm-up for large batch training')
    if trial:
        parser.add_argument('--trial', type=str, default='0', help='id for recording multiple runs')


#: Options a checkpoint's ``opt`` gives main_tsne.py when not given: (name, type).
CHECKPOINT_DEFAULTS = (
    ('dataset', str),
    ('size', int),
    ('data_folder', str),
    ('test_folder', str),
    ('data_csv', str),
    ('test_csv', str),
    ('mean', str),
    ('std', str),
)


def take_checkpoint_defaults(opt, recorded):
    """main_tsne.py: fill the data options not given from the checkpoint's ``recorded`` options;
    returns the flags taken, e.g. ``['--dataset digits', '--size 8']``.

    The folders and mean/std only when the data set is the checkpoint's; the size of a
    timm encoder always, and a different one is refused: it is built for that size.
    """
    taken = []
    if opt.dataset is None:
        opt.dataset = recorded.get('dataset')
        if opt.dataset not in DATASET_NAMES:
            opt.dataset = 'cifar10'  # the reference's default, for a file that does not say
        else:
            taken.append(f'--dataset {opt.dataset}')
    same_data = opt.dataset == recorded.get('dataset')
    timm_size = recorded.get('size') if is_timm_model(opt.model) else None
    if timm_size is not None and opt.size not in (None, timm_size):
        raise UserError(
            f'--size {opt.size} differs from the {timm_size} the {opt.model} encoder of'
            f' --ckpt {opt.ckpt} was built for; pass --size {timm_size} or drop --size'
        )
    for name, kind in CHECKPOINT_DEFAULTS:
        value = recorded.get(name)
        if name == 'dataset' or getattr(opt, name, None) is not None or type(value) is not kind:
            continue
        # a --dataset csv run records its CSVs as data_csv/test_csv and again as the folders
        # (csv_dataset.resolve_options), which that data set refuses: take the CSVs alone
        if opt.dataset == 'csv' and name in ('data_folder', 'test_folder'):
            continue
        if same_data or (name == 'size' and timm_size is not None):
            setattr(opt, name, value)
            taken.append(f'--{name} {value}')
    return taken
