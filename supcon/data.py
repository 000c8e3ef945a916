"""Data sets and the loaders every entry script builds from them.

One module owns the data so that main_supcon.py, main_ce.py, main_linear.py and main_tsne.py read
the same images with the same normalisation. Data sets: ``cifar10``/``cifar100`` (``cifar.py``),
``path`` (a folder of class sub-folders, the fork's; read by ``image_folder.py``), ``digits``
(scikit-learn's, offline), ``imagenet`` (``train/`` and ``val/`` folders of class sub-folders, the
usual ImageNet layout). ``--val_split`` carves a validation split out of the training images for
choosing settings. Transforms live in ``augment.py``, seeded samplers in ``sampling.py``.
"""

import math
import os
import re
from functools import lru_cache

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from supcon import balanced
from supcon.augment import test_transform, train_transform
from supcon.cifar import CIFAR_NAMES, load_cifar
from supcon.errors import UserError
from supcon.image_folder import DataError, build_image_folder  # noqa: F401 (DataError re-exported)
from supcon.runtime import main_process_first
from supcon.sampling import build_loader, mix_seed

DATASET_NAMES = ('cifar10', 'cifar100', 'path', 'digits', 'imagenet')
# data sets held in memory as 32x32 arrays: their batches stack without resizing
ARRAY_DATASETS = ('cifar10', 'cifar100', 'digits')

# (mean, std) per channel of the training images scaled to [0, 1]. The CIFAR
# values are the reference SupContrast's; the digits values were computed from
# the 32x32 RGB training split this module builds (tests recompute them).
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    'digits': ((0.3094, 0.3094, 0.3094), (0.3488, 0.3488, 0.3488)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's
}


def add_arguments(parser, test_folder=True, knn_only=False, imbalance=False):
    """The data flags of the reference and of the fork that added ``--dataset path``.

    ``knn_only=True`` (main_supcon.py) says in the help which flags only matter for
    ``--knn_every``: pretraining itself never reads the test split. ``imbalance`` adds
    --imbalance_ratio (the training scripts); ``'checkpoint'`` defaults it to the
    checkpoint's (main_linear.py).
    """
    group = parser.add_argument_group('data')
    knn = ' (pretraining: only for --knn_every)' if knn_only else ''
    group.add_argument(
        '--dataset',
        type=str,
        default='cifar10',
        choices=DATASET_NAMES,
        help='digits is scikit-learn\'s 8x8 digits, shipped offline for demos;'
        ' imagenet reads --data_folder/train and --data_folder/val',
    )
    group.add_argument(
        '--data_folder',
        type=str,
        default=None,
        help='CIFAR root; for --dataset path the training image folder (one'
        ' sub-folder per class); for imagenet the folder holding train/ and'
        ' val/ (default ./datasets/)',
    )
    if test_folder:
        group.add_argument(
            '--test_folder',
            type=str,
            default=None,
            help='test image folder for --dataset path' + knn,
        )
    group.add_argument(
        '--mean',
        type=str,
        default=None,
        help='per-channel mean as text, e.g. "(0.4914, 0.4822, 0.4465)"',
    )
    group.add_argument(
        '--std',
        type=str,
        default=None,
        help='per-channel std as text, e.g. "(0.2675, 0.2565, 0.2761)"',
    )
    group.add_argument(
        '--size',
        type=int,
        default=None,
        help='crop size fed to the network (default 224 for imagenet, else 32)',
    )
    group.add_argument(
        '--num_classes',
        type=int,
        default=None,
        help='number of classes; read from the data when not given, checked against it when given',
    )
    group.add_argument(
        '--batch_size_val', type=int, default=256, help='evaluation batch size' + knn
    )
    group.add_argument(
        '--val_split',
        type=float,
        default=0.0,
        help='hold out this fraction of the training images (stratified, the same'
        ' for every seed) and evaluate on it instead of the test split;'
        ' 0 = off (the reference\'s behaviour)',
    )
    if imbalance:
        from_ckpt = imbalance == 'checkpoint'
        group.add_argument(
            '--imbalance_ratio',
            type=float,
            default=None if from_ckpt else 1.0,
            help='long-tailed training split: class i keeps n_max * R ** (-i / (C - 1)) of its'
            ' images (CIFAR-10-LT\'s profile), chosen by the seed; the evaluation split is'
            ' untouched; 1 = off'
            + (' (default: the ratio and seed --ckpt was pretrained with)' if from_ckpt else ''),
        )
    return group


def resolve_defaults(opt):
    """Fill the data defaults that depend on --dataset and refuse flags that cannot work."""
    if opt.size is None:
        opt.size = 224 if opt.dataset == 'imagenet' else 32
    if not 0.0 <= opt.val_split < 1.0 or not math.isfinite(opt.val_split):
        raise UserError(f'--val_split must be a fraction in [0, 1), got {opt.val_split}')
    ratio = getattr(opt, 'imbalance_ratio', None)
    if ratio is not None and not (math.isfinite(ratio) and ratio >= 1):
        raise UserError(
            f'--imbalance_ratio must be a finite number >= 1 (the most frequent class over the'
            f' rarest; 1 keeps every image), got {ratio}'
        )
    if opt.dataset == 'imagenet' and opt.data_folder is None:
        raise UserError(
            '--dataset imagenet needs --data_folder (the folder holding train/ and'
            ' val/, one sub-folder per class in each)'
        )
    if opt.data_folder is None:
        opt.data_folder = './datasets/'
    if getattr(opt, 'gpu_aug', False) and getattr(opt, 'aug', 'simclr') != 'simclr':
        raise UserError(
            f'--gpu_aug implements the simclr augmentation only; drop --gpu_aug or'
            f' use --aug simclr (not {opt.aug})'
        )
    if (
        opt.dataset in ('cifar10', 'cifar100')
        and (opt.mean or opt.std)
        and os.environ.get('RANK', '0').strip() in ('0', '')
    ):  # rank 0 (RANK checked later)
        print(
            f'note: using the given --mean/--std for {opt.dataset}; the reference ignores them'
            f' and always uses its own {opt.dataset} constants'
        )


def fixed_size(dataset, size):
    """The side images are resized to in the loader when batches must stack (--gpu_aug):
    None for the in-memory 32x32 data sets, else ``size``."""
    return None if dataset in ARRAY_DATASETS else size


class SplitSubset(Dataset):
    """Part of a data set (``indices``), keeping its ``classes`` and matching ``targets``."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[self.indices[index]]


def long_tail_indices(targets, num_classes, ratio, seed):
    """The exponential long tail of CIFAR-10-LT (Cao et al. 2019), sorted indices of ``targets``.

    Class i (in the data set's order) keeps int(n_max * ratio ** (-i / (C - 1))) of its images,
    at least 1 and at most what it has; n_max is the largest class. The images kept are a
    random choice drawn from ``seed`` alone, so every rank and a resumed run keep the same ones.
    """
    targets = np.asarray(targets)
    counts = np.bincount(targets, minlength=num_classes)
    rng = np.random.default_rng(mix_seed('imbalance', seed))
    kept = []
    for i in range(num_classes):
        wanted = counts.max() * ratio ** (-i / (num_classes - 1)) if num_classes > 1 else counts[i]
        members = np.flatnonzero(targets == i)
        kept.append(rng.permutation(members)[: min(max(int(wanted), 1), len(members))])
    return np.sort(np.concatenate(kept))


def validation_indices(targets, fraction):
    """A stratified ``fraction`` of the indices, fixed (it never depends on --seed), sorted."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(targets))
    _, held_out = train_test_split(
        indices, test_size=fraction, stratify=np.asarray(targets), random_state=0
    )
    return np.sort(held_out)


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 [N, H, W, 3]; items are (transform(PIL image), label)."""

    def __init__(self, images, targets, classes, transform=None):
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def check_same_classes(train_set, test_set):
    """Fail unless both data sets have the same class names (and so the same label numbers)."""
    if list(train_set.classes) == list(test_set.classes):
        return
    train_only = sorted(set(train_set.classes) - set(test_set.classes))
    test_only = sorted(set(test_set.classes) - set(train_set.classes))
    if train_only or test_only:
        detail = (
            f'only in train: {", ".join(train_only) or "-"}; '
            f'only in test: {", ".join(test_only) or "-"}'
        )
    else:
        detail = 'same names in a different order'
    where = ''
    if hasattr(train_set, 'root') and hasattr(test_set, 'root'):
        where = f' ({train_set.root} vs {test_set.root})'
    raise UserError(
        f'train and test data have different classes{where}: {detail}; give '
        f'--data_folder and --test_folder the same class sub-folders'
    )


def check_num_classes(train_set, test_set, num_classes=None):
    """The number of classes, after checking train and test agree with each other and with
    --num_classes when it is given (the reference took it on trust, and a wrong value only
    surfaced as a CUDA assert or a silently oversized classifier)."""
    check_same_classes(train_set, test_set)
    found = len(train_set.classes)
    if num_classes is not None and num_classes != found:
        raise UserError(
            f'--num_classes {num_classes} does not match the {found} classes in the '
            f'data ({", ".join(train_set.classes[:5])}{", ..." if found > 5 else ""}); '
            f'drop --num_classes or set it to {found}'
        )
    return found


@lru_cache(maxsize=1)
def _digits_arrays():
    """(train_images, train_labels, test_images, test_labels), converted once per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    # Upsampled so RandomResizedCrop at the usual sizes crops a picture, not 8x8 blocks.
    large = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BICUBIC)) for g in gray])
    rgb = np.ascontiguousarray(np.repeat(large[..., None], 3, axis=3))
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    arrays = (rgb[train_idx], labels[train_idx], rgb[test_idx], labels[test_idx])
    for array in arrays:
        array.setflags(write=False)  # shared by every data set built from the cache
    return arrays


def _build_digits(split, transform):
    train_x, train_y, test_x, test_y = _digits_arrays()
    images, labels = (train_x, train_y) if split == 'train' else (test_x, test_y)
    return ArrayImageDataset(images, labels.tolist(), [str(d) for d in range(10)], transform)


def build_dataset(
    name,
    split,
    transform,
    data_folder='./datasets/',
    test_folder=None,
    download=True,
    val_split=0.0,
    imbalance_ratio=1.0,
    imbalance_seed=0,
):
    """The `split` ('train' or 'test') of data set `name`; items are (transform(image), label).

    The result has `.classes` (class names) and `.targets` (int label per item).
    `test_folder` is only used by 'path'; `download` only by the CIFAR sets. With
    `val_split` > 0 'train' is the training images less a held-out fraction and 'test'
    is that held-out fraction (of the training images, with `transform`). With
    `imbalance_ratio` > 1 'train' is then cut to a long tail (``long_tail_indices``).
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == 'train' and imbalance_ratio != 1:
        full = build_dataset(name, split, transform, data_folder, test_folder, download, val_split)
        kept = long_tail_indices(full.targets, len(full.classes), imbalance_ratio, imbalance_seed)
        return SplitSubset(full, kept)
    if val_split:
        full = build_dataset(name, 'train', transform, data_folder, test_folder, download)
        held_out = validation_indices(full.targets, val_split)
        if split == 'test':
            return SplitSubset(full, held_out)
        return SplitSubset(full, np.setdiff1d(np.arange(len(full.targets)), held_out))
    if name in CIFAR_NAMES:
        images, targets, classes = load_cifar(name, split, os.fspath(data_folder), download)
        return ArrayImageDataset(images, targets, classes, transform)
    if name == 'path':
        return build_image_folder(split, transform, data_folder, test_folder)
    if name == 'imagenet':
        # the usual layout: <data_folder>/train/<class>/*.JPEG and <data_folder>/val/<class>/...
        root = os.fspath(data_folder)
        return build_image_folder(
            split, transform, os.path.join(root, 'train'), os.path.join(root, 'val')
        )
    if name == 'digits':
        return _build_digits(split, transform)
    raise UserError(f'unknown --dataset {name!r}; choose one of {", ".join(DATASET_NAMES)}')


_NUMBER = r'[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?'


_TRIPLE = re.compile(
    rf'\s*[(\[]?\s*({_NUMBER})\s*[,\s]\s*({_NUMBER})\s*[,\s]\s*({_NUMBER})'
    rf'\s*,?\s*[)\]]?\s*'
)


_BRACKETS = {'(': ')', '[': ']'}


def parse_triple(text, flag):
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


def resolve_mean_std(dataset, mean_text, std_text):
    """(mean, std) for Normalize: --mean/--std text when given, else the data set's constants."""
    if dataset == 'path' and not (mean_text and std_text):
        raise UserError(
            '--dataset path needs --mean and --std of your images, e.g. '
            '--mean "(0.4914, 0.4822, 0.4465)" --std "(0.2023, 0.1994, 0.2010)"'
        )
    if dataset not in MEAN_STD and dataset != 'path':  # pragma: no cover - argparse checks it
        raise UserError(f'unknown --dataset {dataset!r}; choose one of {", ".join(DATASET_NAMES)}')
    default_mean, default_std = MEAN_STD.get(dataset, (None, None))
    mean = parse_triple(mean_text, '--mean') if mean_text else default_mean
    std = parse_triple(std_text, '--std') if std_text else default_std
    if min(std) <= 0:
        raise UserError(f'--std values must be > 0 (Normalize divides by them), got {std}')
    return mean, std


def classification_loaders(opt, rt, uint8_train=False):
    """(train_loader, train_sampler, val_loader, num_classes) for main_ce.py and main_linear.py.

    Training images get the reference's crop-and-flip (or --aug's policy), test images
    are only resized; the test loader is not padded, so under torchrun every test image
    is evaluated exactly once. ``uint8_train=True`` (--gpu_aug) hands training images
    over as uint8 tensors for the device to augment. ``num_classes`` is checked against
    --num_classes. The test loader uses --num_workers_val workers (the fork's flag); the
    training loader follows --sampler (``balanced.train_loader``).
    """
    mean, std = resolve_mean_std(opt.dataset, opt.mean, opt.std)
    if uint8_train:
        from supcon.gpu_augment import to_uint8_tensor

        train_tf = to_uint8_tensor(fixed_size(opt.dataset, opt.size))
    else:
        train_tf = train_transform(opt.size, mean, std, aug=opt.aug)
    splits = dict(data_folder=opt.data_folder, test_folder=opt.test_folder, val_split=opt.val_split)
    # main_linear.py draws the long tail with the pretraining run's seed (its checkpoint's)
    seed = getattr(opt, 'imbalance_seed', None)
    tail = dict(
        imbalance_ratio=opt.imbalance_ratio, imbalance_seed=rt.seed if seed is None else seed
    )
    with main_process_first():  # rank 0 downloads CIFAR while the others wait
        train_dataset = build_dataset(opt.dataset, 'train', train_tf, **splits, **tail)
        val_dataset = build_dataset(
            opt.dataset, 'test', test_transform(opt.size, mean, std), **splits
        )
    num_classes = check_num_classes(train_dataset, val_dataset, opt.num_classes)

    train_loader, train_sampler = balanced.train_loader(train_dataset, opt, rt)
    val_options = rt.loader_options()
    val_options['num_workers'] = min(opt.num_workers_val, os.cpu_count() or 1)
    val_loader, _ = build_loader(
        val_dataset, rt.local_batch_size_val, shuffle=False, pad=False, **val_options
    )
    return train_loader, train_sampler, val_loader, num_classes
