"""``--val_split``: a fixed, stratified part of the training images held out for evaluation.

The split is scikit-learn's ``train_test_split(..., stratify=labels, random_state=0)``, so every
seed and every script holds out the same images. ``stratified_split`` draws it as scikit-learn
does, number for number (tests/test_data.py compares them), without importing scikit-learn,
which would add 0.85 s of CPU to the start of every run; the digits' train/test split and
``--train_subset`` use it too. A fraction it cannot split, or whose split would leave a class
with nothing to train on, is refused in one line that names a fraction that works.
"""

import math

import numpy as np
from torch.utils.data import Dataset

from supcon.errors import UserError

#: Options a resume may not change.
FIXED = ('val_split',)


def add_argument(group):
    """--val_split, in the data flags' group."""
    group.add_argument(
        '--val_split',
        type=float,
        default=0.0,
        help='hold out this fraction of the training images (stratified, the same'
        ' for every seed) and evaluate on it instead of the test split;'
        ' 0 = off (the reference\'s behaviour)',
    )


def check_fraction(opt):
    """Every script that reads data takes --val_split (``datasets.resolve_defaults``)."""
    if not 0.0 <= opt.val_split < 1.0 or not math.isfinite(opt.val_split):
        raise UserError(f'--val_split must be a fraction in [0, 1), got {opt.val_split}')


def run_name(opt, script):
    return [f'val_{opt.val_split}'] if getattr(opt, 'val_split', 0) else []


class SplitSubset(Dataset):
    """Part of a data set (``indices``), keeping its ``classes`` and matching ``targets``.

    ``size_note`` says where the part came from, for messages about its size.
    """

    def __init__(self, dataset, indices, size_note=''):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in self.indices]
        self.size_note = size_note

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


def stratified_split(targets, n_train, n_test, seed=0):
    """(train, test) indices of ``targets``, ``n_train`` and ``n_test`` of them drawn class by
    class: ``train_test_split(np.arange(len(targets)), train_size=n_train, test_size=n_test,
    stratify=targets, random_state=seed)`` of scikit-learn (StratifiedShuffleSplit). Rows of a
    2-D ``targets`` (multi-hot labels) are classes. ValueError where scikit-learn raises one: a
    class of one image, or fewer training or test images than classes."""
    targets = np.asarray(targets)
    if targets.ndim == 2:  # scikit-learn's key for a row of labels
        targets = np.array([' '.join(row.astype('str')) for row in targets])
    classes, inverse, counts = np.unique(targets, return_inverse=True, return_counts=True)
    # scikit-learn's messages, which the one-line errors of --train_subset quote
    if counts.min() < 2:
        raise ValueError(
            'The least populated classes in y have only 1 member, which is too few. The minimum'
            ' number of groups for any class cannot be less than 2. Classes with too few members'
            f' are: {classes[counts < 2].tolist()}'
        )
    for name, size in (('train_size', n_train), ('test_size', n_test)):
        if size < len(classes):
            raise ValueError(
                f'The {name} = {size} should be greater or equal to the number of classes ='
                f' {len(classes)}'
            )
    if n_train + n_test > len(targets):
        raise ValueError(
            f'The sum of train_size and test_size = {n_train + n_test}, should be smaller than the'
            f' number of samples {len(targets)}. Reduce test_size and/or train_size.'
        )
    members = np.split(np.argsort(inverse, kind='stable'), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    train_counts = _approximate_mode(counts, n_train, rng)
    test_counts = _approximate_mode(counts - train_counts, n_test, rng)
    train, test = [], []
    for indices, n_tr, n_te in zip(members, train_counts, test_counts):
        shuffled = indices.take(rng.permutation(len(indices)), mode='clip')
        train.extend(shuffled[:n_tr])
        test.extend(shuffled[n_tr : n_tr + n_te])
    return rng.permutation(train), rng.permutation(test)


def _approximate_mode(counts, draws, rng):
    """How many of ``draws`` fall to each class: the floor of its share, then one more for the
    largest remainders, ties broken by ``rng`` (scikit-learn's ``_approximate_mode``)."""
    share = counts / counts.sum() * draws
    taken = np.floor(share)
    missing = int(draws - taken.sum())
    remainder = share - taken
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        now = min(len(tied), missing)
        taken[rng.choice(tied, size=now, replace=False)] += 1
        missing -= now
    return taken.astype(int)


def split_off(targets, fraction):
    """(train, test) indices with ``fraction`` of ``targets`` in test: scikit-learn's
    ``train_test_split(test_size=fraction, stratify=targets, random_state=0)``, which holds out
    ``ceil(fraction * n)``."""
    n_test = math.ceil(fraction * len(targets))
    return stratified_split(targets, len(targets) - n_test, n_test)


def _held_out(targets, fraction):
    return np.sort(split_off(targets, fraction)[1])


def _split(targets, fraction, classes):
    """(held-out indices, None), or (None, (kind, why)) when ``fraction`` cannot be held out.

    scikit-learn holds out ``ceil(fraction * n)`` images and needs two images of every class,
    and one of each on either side; its stratified allocation may still hold out every image
    of a small class, which would leave that class nothing to train on. ``kind`` says which
    way the fraction is wrong: 'few' (no fraction works), 'low' or 'high'.
    """
    n = len(targets)
    labels, counts = np.unique(targets, return_counts=True)
    names = [str(classes[label]) if classes is not None else str(label) for label in labels]

    def listed(items):
        return ', '.join(items[:5]) + (', ...' if len(items) > 5 else '')

    n_test = math.ceil(fraction * n)
    if counts.min() < 2:
        few = [f'{name} ({count} image)' for name, count in zip(names, counts) if count < 2]
        return None, ('few', f'class {listed(few)}')
    if n_test < len(labels):
        why = (
            f'it holds out {n_test} of the {n} training images, fewer than the'
            f' {len(labels)} classes (a stratified split holds out one of each at least)'
        )
        return None, ('low', why)
    if n - n_test < len(labels):
        why = (
            f'it keeps {n - n_test} of the {n} training images, fewer than the'
            f' {len(labels)} classes (a stratified split trains on one of each at least)'
        )
        return None, ('high', why)
    held_out = _held_out(targets, fraction)
    held_counts = [(targets[held_out] == label).sum() for label in labels]
    emptied = [
        f'{name} ({count} images)'
        for name, count, held in zip(names, counts, held_counts)
        if held == count
    ]
    if emptied:
        why = (
            f'it holds out every training image of class {listed(emptied)},'
            f' leaving nothing of it to train on'
        )
        return None, ('high', why)
    return held_out, None


def _rounded(x, up, digits=2):
    """``x`` rounded up (or down) to ``digits`` significant digits."""
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    units = math.ceil(x / step - 1e-9) if up else math.floor(x / step + 1e-9)
    return float(f'{units * step:.{digits + 1}g}'), step


def _working_fraction(targets, classes, bound, up):
    """The first fraction from ``bound`` (rounded, then stepped up or down) that splits, or None."""
    if not 0 < bound < 1:
        return None
    value, step = _rounded(bound, up)
    for _ in range(20):
        if 0 < value < 1 and _split(targets, value, classes)[1] is None:
            return value
        value = float(f'{value + (step if up else -step):.6g}')
    return None


def validation_indices(targets, fraction, classes=None):
    """A stratified ``fraction`` of the indices, fixed (it never depends on --seed), sorted.

    A fraction scikit-learn cannot split, or whose split would leave a class without a
    training image, is refused in one line that names a fraction that works.
    """
    targets = np.asarray(targets)
    held_out, problem = _split(targets, fraction, classes)
    if problem is None:
        return held_out
    kind, why = problem
    flag = f'--val_split {fraction}'
    if kind == 'few':
        raise UserError(
            f'{flag} cannot split {why}: a stratified split needs 2 images of every class'
            f' at least (one to train on, one to hold out); add images to it or use'
            f' --val_split 0'
        )
    n = len(targets)
    counts = np.unique(targets, return_counts=True)[1]
    k, smallest = len(counts), counts.min()
    if kind == 'low':  # at least one image of each class held out
        works = _working_fraction(targets, classes, k / n, up=True)
    else:  # one of each kept; a class's held-out share is about count * fraction, +-1
        bound = min((n - k) / n, math.floor(n * (smallest - 1) / smallest) / n)
        works = _working_fraction(targets, classes, bound, up=False)
    if works is not None:
        advice = f'use --val_split {works} or {"more" if kind == "low" else "less"}'
    else:
        advice = (
            f'no --val_split leaves one image of each of the {k} classes on both sides of'
            f' {n} images; add images or use --val_split 0'
        )
    raise UserError(f'{flag}: {why}; {advice}')
