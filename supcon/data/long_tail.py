"""``--imbalance_ratio``: a long-tailed training split, as CIFAR-10-LT is cut from CIFAR-10.

Only the training split is cut; the evaluation split stays whole, so accuracy is measured on
every class alike (docs/long-tail.md).
"""

import math

import numpy as np

from supcon.data.sampling import mix_seed
from supcon.errors import UserError


def long_tail_indices(targets, num_classes, ratio, seed):
    """The exponential long tail of CIFAR-10-LT (Cao et al. 2019), sorted indices of ``targets``.

    Class i (in the data set's order) keeps int(n_max * ratio ** (-i / (C - 1))) of its images,
    at least 1 and at most what it has; n_max is the largest class. The images kept are a
    random choice drawn from ``seed`` alone, so every rank and a resumed run keep the same ones.
    Unlabelled images (-1: a CSV row without labels) belong to no class and are all kept.
    """
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise UserError(
            '--imbalance_ratio cuts each class to a long tail of its images, which needs one label'
            ' per image, but the training CSV has rows with several labels; drop --imbalance_ratio'
        )
    labelled = targets >= 0
    counts = np.bincount(targets[labelled], minlength=num_classes)
    rng = np.random.default_rng(mix_seed('imbalance', seed))
    kept = []
    for i in range(num_classes):
        wanted = counts.max() * ratio ** (-i / (num_classes - 1)) if num_classes > 1 else counts[i]
        members = np.flatnonzero(targets == i)
        kept.append(rng.permutation(members)[: min(max(int(wanted), 1), len(members))])
    kept.append(np.flatnonzero(~labelled))
    return np.sort(np.concatenate(kept))


#: Options a resume may not change.
FIXED = ('imbalance_ratio',)


def add_argument(group, from_checkpoint=False):
    """--imbalance_ratio, in the data flags' group of the training scripts; main_linear.py's
    (``from_checkpoint``) defaults to the ratio its checkpoint was pretrained with."""
    group.add_argument(
        '--imbalance_ratio',
        type=float,
        default=None if from_checkpoint else 1.0,
        help='long-tailed training split: class i keeps n_max * R ** (-i / (C - 1)) of its'
        ' images (CIFAR-10-LT\'s profile), chosen by the seed; the evaluation split is'
        ' untouched; 1 = off'
        + (' (default: the ratio and seed --ckpt was pretrained with)' if from_checkpoint else ''),
    )


def check_options(opt, script):
    ratio = getattr(opt, 'imbalance_ratio', None)
    if ratio is not None and not (math.isfinite(ratio) and ratio >= 1):
        raise UserError(
            f'--imbalance_ratio must be a finite number >= 1 (the most frequent class over the'
            f' rarest; 1 keeps every image), got {ratio}'
        )


def take_from_checkpoint(opt, saved):
    """main_linear.py: the classifier trains on the images the encoder was pretrained on, the
    checkpoint's long tail (its ratio unless --imbalance_ratio says otherwise, drawn with its
    run's seed)."""
    if opt.imbalance_ratio is None:
        opt.imbalance_ratio = float(saved.get('imbalance_ratio') or 1.0)
    opt.imbalance_seed = saved.get('seed')


def run_name(opt, script):
    ratio = getattr(opt, 'imbalance_ratio', None)
    return [f'imb{ratio:g}'] if ratio not in (None, 1) else []
