"""``--train_subset N``: train on a fixed, class-balanced part of the training images.

For short benchmarks (docs/fashion-mnist.md's CPU protocol): every seed, method and script trains
on the same N images, drawn once, stratified by class (scikit-learn's ``train_test_split`` with
``random_state=0``, drawn by ``val_split.stratified_split`` as ``--val_split``'s hold-out), from
the training images that ``--val_split`` leaves; the evaluation split stays whole. main_linear.py
trains its classifier on the subset its checkpoint was pretrained on unless told otherwise. A
capability of ``supcon/capabilities.py``.
"""

import numpy as np

from supcon.data.val_split import stratified_split
from supcon.errors import UserError

#: Options a resume may not change.
FIXED = ('train_subset',)


def add_argument(group, from_checkpoint=False):
    """--train_subset, in the data flags' group of the training scripts; main_linear.py's
    (``from_checkpoint``) defaults to its checkpoint's."""
    group.add_argument(
        '--train_subset',
        type=int,
        default=None if from_checkpoint else 0,
        help='train on a fixed, class-balanced subset of this many training images (the same'
        ' for every seed and script; with --val_split, of the images it leaves); 0 = all'
        + (' (default: the subset --ckpt was pretrained on)' if from_checkpoint else ''),
    )


def check_options(opt, script):
    n = getattr(opt, 'train_subset', None)
    if n is not None and n < 0:
        raise UserError(f'--train_subset must be 0 (every image) or a number of images, got {n}')


def take_from_checkpoint(opt, saved):
    """main_linear.py: the classifier trains on the images the encoder was pretrained on."""
    if opt.train_subset is None:
        opt.train_subset = int(saved.get('train_subset') or 0)


def run_name(opt, script):
    n = getattr(opt, 'train_subset', None)
    return [f'sub{n}'] if n else []


def subset_indices(targets, n, classes=None):
    """Sorted indices of ``n`` of the images, stratified by class, fixed (random_state=0)."""
    targets = np.asarray(targets)
    total = len(targets)
    if n >= total:
        raise UserError(
            f'--train_subset {n} is not fewer than the {total} training images; use a smaller'
            f' number, or 0 for all of them'
        )
    labels = np.unique(targets, axis=0)
    if n < len(labels):
        raise UserError(
            f'--train_subset {n} is fewer than the {len(labels)} classes: a class-balanced'
            f' subset holds one image of each at least; use --train_subset {len(labels)} or more'
        )
    try:
        kept, _ = stratified_split(targets, n, total - n)
    except ValueError as exc:  # a class with a single image cannot be stratified
        raise UserError(f'--train_subset {n} cannot be drawn class by class: {exc}') from None
    return np.sort(kept)
