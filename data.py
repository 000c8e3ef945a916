"""Data sets and the loaders every entry script builds from them.

One module owns the data so that main_supcon.py, main_ce.py, main_linear.py and
main_tsne.py read the same images with the same normalisation. Data sets:
``cifar10``/``cifar100`` (``cifar.py``), ``path`` (a folder of class sub-folders,
the fork's), ``digits`` (scikit-learn's, offline). Transforms live in
``augment.py``, seeded samplers in ``sampling.py``.
"""
import math
import os
import re
from functools import lru_cache

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from augment import test_transform, train_transform
from cifar import CIFAR_NAMES, load_cifar, short_reason
from runtime import main_process_first
from sampling import build_loader
from util import UserError

DATASET_NAMES = ('cifar10', 'cifar100', 'path', 'digits')

# (mean, std) per channel of the training images scaled to [0, 1]. The CIFAR
# values are the reference SupContrast's; the digits values were computed from
# the 32x32 RGB training split this module builds (tests recompute them).
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    'digits': ((0.3094, 0.3094, 0.3094), (0.3488, 0.3488, 0.3488)),
}


class DataError(UserError):
    """An image file that cannot be read; the message names the file."""

    def __init__(self, message):
        # A DataLoader worker re-raises a worker's exception as
        # type(exc)("Caught DataError in DataLoader worker ...\n<traceback>"),
        # which would bury the one-line message under a traceback. Its last
        # line is "data.DataError: <message>", so keep just that.
        if '\n' in message:
            last_line = message.rstrip().splitlines()[-1]
            message = last_line.split('DataError: ', 1)[-1]
        super().__init__(message)



def add_arguments(parser, test_folder=True):
    """The data flags of the reference and of the fork that added ``--dataset path``."""
    group = parser.add_argument_group('data')
    group.add_argument('--dataset', type=str, default='cifar10', choices=DATASET_NAMES,
                       help='digits is scikit-learn\'s 8x8 digits, shipped offline for demos')
    group.add_argument('--data_folder', type=str, default=None,
                       help='CIFAR root or, for --dataset path, the training image folder'
                            ' (one sub-folder per class); default ./datasets/')
    if test_folder:
        group.add_argument('--test_folder', type=str, default=None,
                           help='test image folder for --dataset path')
    group.add_argument('--mean', type=str, default=None,
                       help='per-channel mean as text, e.g. "(0.4914, 0.4822, 0.4465)"')
    group.add_argument('--std', type=str, default=None,
                       help='per-channel std as text, e.g. "(0.2675, 0.2565, 0.2761)"')
    group.add_argument('--size', type=int, default=32, help='crop size fed to the network')
    group.add_argument('--num_classes', type=int, default=None,
                       help='number of classes; read from the data when not given')
    group.add_argument('--batch_size_val', type=int, default=256, help='evaluation batch size')
    return group


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


def _load_rgb_image(path):
    try:
        with open(path, 'rb') as f:
            image = Image.open(f)
            return image.convert('RGB')
    except Exception as exc:  # PIL's decoders raise many types on malformed files
        raise DataError(f'cannot read image {path} ({short_reason(exc)}); remove or '
                        f'replace the file') from exc


def _build_image_folder(split, transform, data_folder, test_folder):
    if split == 'train':
        flag, folder = '--data_folder', data_folder
    else:
        flag, folder = '--test_folder', test_folder
        if folder is None:
            raise UserError('--dataset path needs --test_folder (a folder with the same class '
                            'sub-folders as --data_folder) for the test split')
    folder = os.fspath(folder)
    example = os.path.join(folder, 'cat', '001.png')
    layout = f'put the images in one sub-folder per class, e.g. {example}'
    if not os.path.exists(folder):
        raise UserError(f'{flag} {folder} does not exist; point {flag} at your image folder')
    if not os.path.isdir(folder):
        raise UserError(f'{flag} {folder} is not a directory; point {flag} at a folder of '
                        f'class sub-folders')
    if not any(entry.is_dir() for entry in os.scandir(folder)):
        raise UserError(f'{flag} {folder} has no class sub-folders; {layout}')

    dataset = datasets.ImageFolder(folder, transform=transform, loader=_load_rgb_image,
                                   allow_empty=True)
    extensions = ', '.join(datasets.folder.IMG_EXTENSIONS)
    if not dataset.samples:
        raise UserError(f'{flag} {folder} has no image files ({extensions}) in its class '
                        f'sub-folders; {layout}')
    counts = np.bincount(dataset.targets, minlength=len(dataset.classes))
    empty = [name for name, count in zip(dataset.classes, counts) if count == 0]
    if empty:
        # An empty class would still take a label and an output unit.
        raise UserError(f'{flag} {folder} has class folders without image files: '
                        f'{", ".join(empty)} (expected {extensions}); add images to them or '
                        f'remove them')
    return dataset


def check_same_classes(train_set, test_set):
    """Fail unless both data sets have the same class names (and so the same label numbers)."""
    if list(train_set.classes) == list(test_set.classes):
        return
    train_only = sorted(set(train_set.classes) - set(test_set.classes))
    test_only = sorted(set(test_set.classes) - set(train_set.classes))
    if train_only or test_only:
        detail = (f'only in train: {", ".join(train_only) or "-"}; '
                  f'only in test: {", ".join(test_only) or "-"}')
    else:
        detail = 'same names in a different order'
    where = ''
    if hasattr(train_set, 'root') and hasattr(test_set, 'root'):
        where = f' ({train_set.root} vs {test_set.root})'
    raise UserError(f'train and test data have different classes{where}: {detail}; give '
                    f'--data_folder and --test_folder the same class sub-folders')


def check_num_classes(train_set, test_set, num_classes=None):
    """The number of classes, after checking train and test agree with each other and with
    --num_classes when it is given (the reference took it on trust, and a wrong value only
    surfaced as a CUDA assert or a silently oversized classifier)."""
    check_same_classes(train_set, test_set)
    found = len(train_set.classes)
    if num_classes is not None and num_classes != found:
        raise UserError(f'--num_classes {num_classes} does not match the {found} classes in the '
                        f'data ({", ".join(train_set.classes[:5])}{", ..." if found > 5 else ""}); '
                        f'drop --num_classes or set it to {found}')
    return found


@lru_cache(maxsize=1)
def _digits_arrays():
    """(train_images, train_labels, test_images, test_labels), converted once per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    # Upsampled so RandomResizedCrop at the usual sizes crops a picture, not 8x8 blocks.
    large = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BICUBIC))
                      for g in gray])
    rgb = np.ascontiguousarray(np.repeat(large[..., None], 3, axis=3))
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2,
                                           stratify=labels, random_state=0)
    arrays = (rgb[train_idx], labels[train_idx], rgb[test_idx], labels[test_idx])
    for array in arrays:
        array.setflags(write=False)  # shared by every data set built from the cache
    return arrays


def _build_digits(split, transform):
    train_x, train_y, test_x, test_y = _digits_arrays()
    images, labels = (train_x, train_y) if split == 'train' else (test_x, test_y)
    return ArrayImageDataset(images, labels.tolist(), [str(d) for d in range(10)], transform)


def build_dataset(name, split, transform, data_folder='./datasets/', test_folder=None,
                  download=True):
    """The `split` ('train' or 'test') of data set `name`; items are (transform(image), label).

    The result has `.classes` (class names) and `.targets` (int label per item).
    `test_folder` is only used by 'path'; `download` only by the CIFAR sets.
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in CIFAR_NAMES:
        images, targets, classes = load_cifar(name, split, os.fspath(data_folder), download)
        return ArrayImageDataset(images, targets, classes, transform)
    if name == 'path':
        return _build_image_folder(split, transform, data_folder, test_folder)
    if name == 'digits':
        return _build_digits(split, transform)
    raise UserError(f'unknown --dataset {name!r}; choose one of {", ".join(DATASET_NAMES)}')


_NUMBER = r'[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?'


_TRIPLE = re.compile(rf'\s*[(\[]?\s*({_NUMBER})\s*[,\s]\s*({_NUMBER})\s*[,\s]\s*({_NUMBER})'
                     rf'\s*,?\s*[)\]]?\s*')


_BRACKETS = {'(': ')', '[': ']'}


def parse_triple(text, flag):
    """Parse "(0.1, 0.2, 0.3)", "0.1,0.2,0.3" or "[0.1 0.2 0.3]" into three floats."""
    error = UserError(f'{flag} must be three numbers such as "(0.4914, 0.4822, 0.4465)", '
                      f'got {text!r}')
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
        raise UserError('--dataset path needs --mean and --std of your images, e.g. '
                        '--mean "(0.4914, 0.4822, 0.4465)" --std "(0.2023, 0.1994, 0.2010)"')
    if dataset not in MEAN_STD and dataset != 'path':
        raise UserError(f'unknown --dataset {dataset!r}; choose one of {", ".join(DATASET_NAMES)}')
    default_mean, default_std = MEAN_STD.get(dataset, (None, None))
    mean = parse_triple(mean_text, '--mean') if mean_text else default_mean
    std = parse_triple(std_text, '--std') if std_text else default_std
    if min(std) <= 0:
        raise UserError(f'--std values must be > 0 (Normalize divides by them), got {std}')
    return mean, std


def classification_loaders(opt):
    """(train_loader, train_sampler, val_loader, num_classes) for main_ce.py and main_linear.py.

    Training images get the reference's crop-and-flip, test images are only
    resized; the test loader is not padded, so under torchrun every test image
    is evaluated exactly once. ``num_classes`` is checked against --num_classes.
    """
    mean, std = resolve_mean_std(opt.dataset, opt.mean, opt.std)
    with main_process_first():  # rank 0 downloads CIFAR while the others wait
        train_dataset = build_dataset(opt.dataset, 'train', train_transform(opt.size, mean, std),
                                      data_folder=opt.data_folder, test_folder=opt.test_folder)
        val_dataset = build_dataset(opt.dataset, 'test', test_transform(opt.size, mean, std),
                                    data_folder=opt.data_folder, test_folder=opt.test_folder)
    num_classes = check_num_classes(train_dataset, val_dataset, opt.num_classes)

    common = dict(seed=opt.seed, rank=opt.rank, world_size=opt.world_size,
                  num_workers=opt.num_workers, pin_memory=opt.pin_memory)
    train_loader, train_sampler = build_loader(train_dataset, opt.local_batch_size,
                                               shuffle=True, **common)
    val_loader, _ = build_loader(val_dataset, opt.local_batch_size_val, shuffle=False, pad=False,
                                 **common)
    return train_loader, train_sampler, val_loader, num_classes
