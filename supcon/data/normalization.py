"""--mean / --std: the data sets' normalisation constants and the safe parsing of the flags' text.

The text ("(0.4914, 0.4822, 0.4465)", the fork's form) is parsed by a regular expression, never
``eval``; ``resolve_mean_std`` gives what ``Normalize`` takes for every data set.
"""

import math
import re

from supcon.errors import UserError

# (mean, std) per channel of the training images scaled to [0, 1]. The CIFAR
# values are the reference SupContrast's; the digits values were computed from
# the 32x32 RGB training split this module builds, the fashion_mnist values from its 60,000
# training images (mean and population std of every pixel; tests recompute both).
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    'digits': ((0.3094, 0.3094, 0.3094), (0.3488, 0.3488, 0.3488)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's
    'fashion_mnist': ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
}


_NUMBER = r'[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?'


_TRIPLE = re.compile(
    rf'\s*[(\[]?\s*({_NUMBER})\s*[,\s]\s*({_NUMBER})\s*[,\s]\s*({_NUMBER})'
    rf'\s*,?\s*[)\]]?\s*'
)


_BRACKETS = {'(': ')', '[': ']'}


def parse_triple(text: str, flag: str) -> tuple[float, float, float]:
    """Parse "(0.1, 0.2, 0.3)", "0.1,0.2,0.3" or "[0.1 0.2 0.3]" into three floats."""
    error = UserError(
        f'{flag} must be three numbers such as "(0.4914, 0.4822, 0.4465)", got {text!r}'
    )
    match = _TRIPLE.fullmatch(str(text))
    if match is None:
        raise error
    stripped = str(text).strip()
    opening = stripped[:1] if stripped[:1] in _BRACKETS else ''
    closing = stripped[-1:] if stripped[-1:] in _BRACKETS.values() else ''
    if _BRACKETS.get(opening, '') != closing:  # "(1, 2, 3]" or "(1, 2, 3"
        raise error
    values = tuple(float(v) for v in match.groups())
    if not all(math.isfinite(v) for v in values):  # "1e999" overflows to inf
        raise error
    return values


def resolve_mean_std(dataset: str, mean_text: str | None, std_text: str | None):
    """(mean, std) for Normalize: --mean/--std text when given, else the data set's constants."""
    if dataset in ('path', 'csv') and not (mean_text and std_text):
        raise UserError(
            f'--dataset {dataset} needs --mean and --std of your images, e.g. '
            '--mean "(0.4914, 0.4822, 0.4465)" --std "(0.2023, 0.1994, 0.2010)"'
        )
    if dataset not in MEAN_STD and dataset not in ('path', 'csv'):  # pragma: no cover
        raise UserError(f'unknown --dataset {dataset!r}')
    default_mean, default_std = MEAN_STD.get(dataset, (None, None))
    mean = parse_triple(mean_text, '--mean') if mean_text else default_mean
    std = parse_triple(std_text, '--std') if std_text else default_std
    if min(std) <= 0:
        raise UserError(f'--std values must be > 0 (Normalize divides by them), got {std}')
    return mean, std
