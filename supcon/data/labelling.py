"""Partial and multiple labels: which training images keep their labels (``--labelled_fraction``,
``--labelled_only``, the unlabelled rows of a ``--dataset csv``), and how SupCon weighs images with
several labels (``--multilabel``). A capability of ``supcon/capabilities.py``.

main_supcon.py keeps the labels of a stratified fraction F of the training images, chosen by
the run's seed, and marks the others -1: SupConLoss gives those SimCLR's positives (their own
other views) and makes them nobody's positive (docs/labels.md). main_linear.py reads F and the
seed from the checkpoint and trains its classifier on the same labelled images (``--linear_labels
all``: on every image). The choice depends on (seed, F, the training labels) alone, never on an
RNG's state, so every rank, a resumed run and main_linear.py make the same one; per class the
chosen images are the first of one seeded order, so a smaller F's images are among a larger's.
"""

import math

import numpy as np
from torch.utils.data import Dataset

from supcon.data.sampling import mix_seed
from supcon.data.val_split import SplitSubset
from supcon.errors import UserError
from supcon.system.distributed import is_main_process

UNLABELLED = -1  # SupConLoss's unlabelled sample

#: Options a resume may not change.
FIXED = ('labelled_fraction', 'labelled_only', 'multilabel', 'linear_labels')


def add_arguments(parser, linear=False):
    """--multilabel, --labelled_fraction and --labelled_only (main_supcon.py), or
    --labelled_fraction and --linear_labels (main_linear.py, where the checkpoint's fraction is
    the default)."""
    if linear:
        parser.add_argument(
            '--labelled_fraction',
            type=float,
            default=None,
            help='train the classifier on this stratified fraction of the training images,'
            ' chosen by the checkpoint\'s seed; default: the checkpoint\'s --labelled_fraction',
        )
        parser.add_argument(
            '--linear_labels',
            type=str,
            default=None,
            choices=('labelled', 'all'),
            help='labelled: only the images whose labels pretraining kept; all: every training'
            ' image with its label; default: labelled when the fraction is below 1',
        )
        return
    parser.add_argument(
        '--multilabel',
        type=str,
        default='jaccard',
        choices=('jaccard', 'any'),
        help='multi-label data (--dataset csv): a pair\'s positive weight is the Jaccard'
        ' overlap of its label sets, or 1 when they share any label (docs/labels.md)',
    )
    parser.add_argument(
        '--labelled_fraction',
        type=float,
        default=1.0,
        help='keep the labels of this stratified fraction of the training images (chosen by'
        ' --seed) and mark the rest unlabelled, still used with SimCLR\'s positives',
    )
    parser.add_argument(
        '--labelled_only',
        action='store_true',
        help='train on the labelled images alone and drop the others (the baseline partial'
        ' labels are measured against)',
    )


def check_fraction(fraction, flag='--labelled_fraction'):
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise UserError(f'{flag} must be a fraction in (0, 1], got {fraction}')


def check_options(opt, script):
    """main_supcon.py's checks: SimCLR reads no labels, so both flags are refused with it.
    (main_linear.py's come with the checkpoint: ``from_checkpoint``.)"""
    if script != 'supcon':
        return
    check_fraction(opt.labelled_fraction)
    if opt.method == 'SimCLR' and (opt.labelled_fraction < 1 or opt.labelled_only):
        raise UserError(
            'SimCLR reads no labels, so --labelled_fraction/--labelled_only would change'
            ' nothing; drop them (main_linear.py --labelled_fraction F evaluates a SimCLR'
            ' encoder on the labelled images a SupCon run of the same --seed keeps)'
        )


def run_name(opt, script):
    """``lab{F}`` (in main_linear.py only when its classifier trains on the labelled images
    alone), ``labonly``, ``ml_{rule}``."""
    parts = []
    fraction = getattr(opt, 'labelled_fraction', None) or 1.0
    if fraction < 1 and getattr(opt, 'linear_labels', 'labelled') == 'labelled':
        parts.append(f'lab{fraction}')
    if getattr(opt, 'labelled_only', False):
        parts.append('labonly')
    if getattr(opt, 'multilabel', 'jaccard') != 'jaccard':
        parts.append(f'ml_{opt.multilabel}')
    return parts


def take_from_checkpoint(opt, saved):
    """main_linear.py: the labelled images of a --labelled_fraction checkpoint, its fraction
    chosen by its seed (``resolve_linear_options``)."""
    opt.labelled_fraction, opt.labelled_seed, opt.linear_labels = resolve_linear_options(opt, saved)


def resolve_linear_options(opt, saved):
    """main_linear.py: (labelled_fraction, labelled_seed, linear_labels) from the flags and the
    options ``saved`` in the checkpoint (a plain dict)."""
    saved_fraction = float(saved.get('labelled_fraction', 1.0))
    fraction = saved_fraction if opt.labelled_fraction is None else opt.labelled_fraction
    check_fraction(fraction)
    if opt.labelled_fraction is not None and saved_fraction < 1 and fraction != saved_fraction:
        raise UserError(
            f'--labelled_fraction {fraction} differs from the {saved_fraction} the checkpoint'
            f' was pretrained with; drop --labelled_fraction to evaluate on its labelled'
            f' images, or pass --linear_labels all'
        )
    linear_labels = opt.linear_labels or ('labelled' if fraction < 1 else 'all')
    if linear_labels == 'all' and opt.labelled_fraction is not None and fraction < 1:
        raise UserError(
            '--linear_labels all trains on every label, so --labelled_fraction would change'
            ' nothing; drop one of them'
        )
    seed = saved.get('seed')
    if fraction < 1 and linear_labels == 'labelled' and seed is None:
        if opt.seed is None:
            raise UserError(
                f'--ckpt {opt.ckpt} records no seed to choose the labelled images with; pass --seed'
            )
        seed = opt.seed
    return fraction, None if seed is None else int(seed), linear_labels


# --------------------------------------------------------------------------- the choice


def has_label(targets) -> np.ndarray:
    """Per item: does it have a label (a class index other than -1, or a nonzero multi-hot row)."""
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return targets.any(axis=1)
    return targets != UNLABELLED


def stratified_fraction(targets, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the images that keep their labels: of each class of n images, the first
    max(1, round(F n)) (halves rounded up) of an order drawn from (seed, class)."""
    targets = np.asarray(targets)
    keep = np.zeros(len(targets), dtype=bool)
    for label in np.unique(targets[targets != UNLABELLED]):
        members = np.flatnonzero(targets == label)
        count = max(1, math.floor(fraction * len(members) + 0.5))
        rng = np.random.default_rng(mix_seed('labelled', int(seed), int(label)))
        keep[members[rng.permutation(len(members))[:count]]] = True
    return keep


def labelled_mask(dataset, fraction: float, seed: int) -> np.ndarray:
    """``stratified_fraction`` of the whole data set under ``dataset`` (a --val_split part of
    it, say), read for ``dataset``'s items: an image keeps or loses its label whatever part
    of the training images a run uses."""
    if fraction >= 1:
        return has_label(dataset.targets)
    base, positions = dataset, np.arange(len(dataset))
    while hasattr(base, 'indices') and hasattr(base, 'dataset'):  # SplitSubset, Subset
        positions = np.asarray(base.indices, dtype=np.int64)[positions]
        base = base.dataset
    if is_multilabel(base):
        raise UserError(
            '--labelled_fraction chooses images class by class, but the training CSV has'
            ' rows with several labels; drop it and leave the labels of the images to treat'
            ' as unlabelled empty in the CSV'
        )
    return stratified_fraction(base.targets, fraction, seed)[positions]


def labelled_part(dataset):
    """(the items of ``dataset`` that have a label, as a ``SplitSubset`` unless all have one;
    how many were left out). For what is evaluated: an image without a label cannot be scored."""
    keep = has_label(dataset.targets) if len(dataset.targets) else np.zeros(0, bool)
    if keep.all():
        return dataset, 0
    return SplitSubset(dataset, np.flatnonzero(keep)), int((~keep).sum())


def note_left_out(count: int, what: str) -> None:
    """One note that ``count`` images without a label were left out of ``what``."""
    if count and is_main_process():
        print(
            f'note: {count} held-out image{"s" if count > 1 else ""} without a label left out of'
            f' {what} (--val_split of a partly labelled CSV)',
            flush=True,
        )


class PartialLabels(Dataset):
    """The items ``indices`` of ``dataset``; those not marked in ``labelled`` (a mask over
    ``indices``) get the label -1. ``classes``, ``targets``, ``dataset`` and ``indices`` as a
    ``data.SplitSubset``."""

    def __init__(self, dataset, indices, labelled=None):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.classes = dataset.classes
        self.labelled = np.ones(len(self.indices), bool) if labelled is None else labelled
        self.targets = [
            dataset.targets[i] if keep else UNLABELLED
            for i, keep in zip(self.indices, self.labelled)
        ]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        image, target = self.dataset[self.indices[index]]
        return image, target if self.labelled[index] else UNLABELLED


def pretraining_set(dataset, opt, seed: int):
    """main_supcon.py's training images: every image with the labels of a --labelled_fraction
    kept, or (--labelled_only) the labelled images alone. Prints how many keep their labels."""
    if opt.labelled_fraction >= 1 and not opt.labelled_only:
        return dataset
    labelled = labelled_mask(dataset, opt.labelled_fraction, seed) & has_label(dataset.targets)
    n, total = int(labelled.sum()), len(labelled)
    if n == 0:
        raise UserError(f'no training image of {opt.data_folder} has a label; drop --labelled_only')
    if opt.labelled_only and n == total:
        raise UserError(
            '--labelled_only drops the unlabelled images, but every training image is'
            ' labelled; add --labelled_fraction below 1 or drop --labelled_only'
        )
    if is_main_process():
        why = (
            f' (--labelled_fraction {opt.labelled_fraction}, stratified by class, seed {seed})'
            if opt.labelled_fraction < 1
            else ''
        )
        rest = 'dropped (--labelled_only)' if opt.labelled_only else 'unlabelled (label -1)'
        print(
            f'note: {n} of the {total} training images keep their labels{why}; the other'
            f' {total - n} are {rest}',
            flush=True,
        )
    if opt.labelled_only:
        return PartialLabels(dataset, np.flatnonzero(labelled))
    return PartialLabels(dataset, np.arange(total), labelled)


def classifier_training_set(dataset, opt):
    """main_ce.py's and main_linear.py's training images: those with a label and, for a linear
    evaluation on the labelled images (--linear_labels labelled), with a label pretraining kept."""
    keep = has_label(dataset.targets)
    fraction = getattr(opt, 'labelled_fraction', None) or 1.0
    if getattr(opt, 'linear_labels', 'all') == 'labelled' and fraction < 1:
        keep &= labelled_mask(dataset, fraction, opt.labelled_seed)
    if keep.all():
        return dataset
    if not keep.any():
        raise UserError(
            f'no training image of {opt.data_folder} has a label, so there is nothing to train'
            f' a classifier on; label some rows of the CSV'
        )
    if is_main_process():
        why = f' (--labelled_fraction {fraction}, seed {opt.labelled_seed})' if fraction < 1 else ''
        print(
            f'note: the classifier trains on the {int(keep.sum())} labelled of the'
            f' {len(keep)} training images{why}',
            flush=True,
        )
    return PartialLabels(dataset, np.flatnonzero(keep))


def is_multilabel(dataset) -> bool:
    """True when the items' targets are multi-hot rows rather than class indices."""
    targets = getattr(dataset, 'targets', None)  # a data set of other kinds: single-label
    return targets is not None and len(targets) > 0 and getattr(targets[0], 'ndim', 0) == 1


def multilabel_refusal(opt, problem, fix):
    """The one-line error of a flag that needs one label per image on multi-label data."""
    return UserError(f'{problem}, but {opt.data_folder} has rows with several labels; {fix}')


def check_data(opt, dataset):
    """--multilabel needs multi-hot rows; the hybrid loss needs one label per image."""
    if not hasattr(opt, 'multilabel'):  # main_ce.py, main_linear.py
        return
    if not is_multilabel(dataset):
        if opt.multilabel != 'jaccard':
            raise UserError(
                f'--multilabel {opt.multilabel} weighs pairs of images with several labels, but'
                f' every training image has at most one; drop --multilabel'
            )
        return
    if opt.method == 'SupCon_hybrid':
        raise multilabel_refusal(
            opt,
            '--method SupCon_hybrid leaves "the anchor\'s class" out, which needs one label',
            'use --method SupCon (which weighs shared labels) or SimCLR',
        )
