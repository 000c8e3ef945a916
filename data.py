"""Datasets, transforms and seeded loaders shared by every entry script.

One module owns the data so that main_supcon.py, main_ce.py and main_linear.py
read the same images with the same normalisation and the same augmentation.
"""

import codecs
import hashlib
import math
import os
import pickle
import re
import socket
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets, transforms

from util import UserError, main_process_first

DATASET_NAMES = ('cifar10', 'cifar100', 'path', 'digits')

# (mean, std) per channel of the training images scaled to [0, 1]. The CIFAR
# values are the reference SupContrast's; the digits values were computed from
# the 32x32 RGB training split this module builds (tests recompute them).
MEAN_STD = {
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    'digits': ((0.3094, 0.3094, 0.3094), (0.3488, 0.3488, 0.3488)),
}

# Seconds a download may wait on one socket operation; an offline machine then
# fails within seconds instead of hanging on the OS default (often minutes).
DOWNLOAD_TIMEOUT_S = 10


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


def _short_reason(exc):
    """First line of an exception's message, for embedding in a one-line error."""
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    return reason if len(reason) <= 200 else reason[:197] + '...'


# --------------------------------------------------------------------------
# In-memory images (CIFAR, digits)
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# CIFAR in its original on-disk format
# --------------------------------------------------------------------------

def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# The only globals a pickled numpy array needs. Anything else in a "batch file"
# (os.system, builtins.eval, ...) would run code on load, so it is refused.
_ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _numpy_reconstruct,
    ('numpy', 'ndarray'): lambda: np.ndarray,
    ('numpy', 'dtype'): lambda: np.dtype,
    # Python 3 writes bytes at pickle protocol <= 2 as codecs.encode(str, 'latin1').
    ('_codecs', 'encode'): lambda: codecs.encode,
    ('codecs', 'encode'): lambda: codecs.encode,
}


class ForbiddenGlobalError(pickle.UnpicklingError):
    pass


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise ForbiddenGlobalError(f'{module}.{name}')
        return resolve()


def _load_batch_file(path, source_url):
    """Unpickle one CIFAR file into a dict with str keys, refusing anything but arrays."""
    fix = f'replace it with the file from {source_url}'
    try:
        with open(path, 'rb') as f:
            # The files were pickled by Python 2: latin1 maps its byte strings
            # (including the array buffers) back to the same bytes.
            content = _ArrayOnlyUnpickler(f, encoding='latin1').load()
    except ForbiddenGlobalError as exc:
        raise UserError(f'refusing to unpickle {path}: it asks for {exc}, which a CIFAR file '
                        f'never contains; {fix}') from exc
    except OSError as exc:
        raise UserError(f'cannot read {path} ({_short_reason(exc)}); {fix}') from exc
    except Exception as exc:  # pickle reports truncation/corruption with many types
        raise UserError(f'{path} is corrupt or truncated ({type(exc).__name__}: '
                        f'{_short_reason(exc)}); {fix}') from exc
    if not isinstance(content, dict):
        raise UserError(f'{path} holds a {type(content).__name__}, not a CIFAR dict; {fix}')
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in content.items()}


def _as_text(name):
    return name.decode('latin1') if isinstance(name, bytes) else str(name)


class _CifarSpec:
    def __init__(self, title, folder, url, md5, train_files, test_files, meta_file,
                 names_key, labels_key):
        self.title, self.folder, self.url, self.md5 = title, folder, url, md5
        self.train_files, self.test_files, self.meta_file = train_files, test_files, meta_file
        self.names_key, self.labels_key = names_key, labels_key

    @property
    def all_files(self):
        return self.train_files + self.test_files + (self.meta_file,)


_CIFAR_SPECS = {
    'cifar10': _CifarSpec(
        'CIFAR-10', 'cifar-10-batches-py',
        'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
        'c58f30108f718f92721af3b95e74349a',
        tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',), 'batches.meta',
        'label_names', 'labels'),
    'cifar100': _CifarSpec(
        'CIFAR-100', 'cifar-100-python',
        'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
        'eb9058c3a382ffc7106e4002c42a8d85',
        ('train',), ('test',), 'meta',
        'fine_label_names', 'fine_labels'),
}


def _download_cifar(spec, data_folder):
    """Fetch and extract the archive; returns None on success, else a short reason."""
    from torchvision.datasets.utils import download_and_extract_archive

    archive = os.path.join(data_folder, os.path.basename(spec.url))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_and_extract_archive(spec.url, data_folder, md5=spec.md5)
    except Exception as exc:  # URLError, timeouts, md5 mismatch, bad tar, disk full...
        # A half-written archive would only fail the md5 check next time.
        if os.path.isfile(archive):
            try:
                os.remove(archive)
            except OSError:
                pass
        return _short_reason(exc)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return None


def _build_cifar(name, split, transform, data_folder, download):
    spec = _CIFAR_SPECS[name]
    folder = os.path.join(data_folder, spec.folder)

    def missing_files():
        return [f for f in spec.all_files if not os.path.isfile(os.path.join(folder, f))]

    if missing_files():
        fix = f'download {spec.url} and extract it into {data_folder}'
        if not download:
            raise UserError(f'{spec.title} not found in {folder} (downloading is off); {fix}')
        reason = _download_cifar(spec, data_folder)
        if reason is None and missing_files():
            reason = f'the archive lacks {", ".join(missing_files())}'
        if reason is not None:
            raise UserError(f'{spec.title} not found in {folder} and it could not be '
                            f'downloaded ({reason}); {fix}')

    meta_path = os.path.join(folder, spec.meta_file)
    meta = _load_batch_file(meta_path, spec.url)
    if spec.names_key not in meta:
        raise UserError(f'{meta_path} has no {spec.names_key!r}; replace it with the file '
                        f'from {spec.url}')
    classes = [_as_text(n) for n in meta[spec.names_key]]

    images, targets = [], []
    for file_name in spec.train_files if split == 'train' else spec.test_files:
        path = os.path.join(folder, file_name)
        batch = _load_batch_file(path, spec.url)
        data, labels = batch.get('data'), batch.get(spec.labels_key)
        fix = f'replace it with the file from {spec.url}'
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
                and data.ndim == 2 and data.shape[1] == 3 * 32 * 32):
            raise UserError(f'{path} has no uint8 [N, 3072] "data" array; {fix}')
        if labels is None or len(labels) != len(data):
            raise UserError(f'{path} has no {spec.labels_key!r} list matching its '
                            f'{len(data)} images; {fix}')
        labels = [int(label) for label in labels]
        if labels and not 0 <= min(labels) <= max(labels) < len(classes):
            raise UserError(f'{path} has labels outside 0..{len(classes) - 1}; {fix}')
        # Rows are channel-planar (1024 R, then G, then B values); PIL wants HWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        targets.extend(labels)
    images = np.ascontiguousarray(np.concatenate(images))
    return ArrayImageDataset(images, targets, classes, transform)


# --------------------------------------------------------------------------
# A folder of images, one sub-folder per class
# --------------------------------------------------------------------------

def _load_rgb_image(path):
    try:
        with open(path, 'rb') as f:
            image = Image.open(f)
            return image.convert('RGB')
    except Exception as exc:  # PIL's decoders raise many types on malformed files
        raise DataError(f'cannot read image {path} ({_short_reason(exc)}); remove or '
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


# --------------------------------------------------------------------------
# scikit-learn's 8x8 digits, as 32x32 RGB (small, offline, for quick runs)
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------

def build_dataset(name, split, transform, data_folder='./datasets/', test_folder=None,
                  download=True):
    """The `split` ('train' or 'test') of data set `name`; items are (transform(image), label).

    The result has `.classes` (class names) and `.targets` (int label per item).
    `test_folder` is only used by 'path'; `download` only by the CIFAR sets.
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name in _CIFAR_SPECS:
        return _build_cifar(name, split, transform, os.fspath(data_folder), download)
    if name == 'path':
        return _build_image_folder(split, transform, data_folder, test_folder)
    if name == 'digits':
        return _build_digits(split, transform)
    raise UserError(f'unknown --dataset {name!r}; choose one of {", ".join(DATASET_NAMES)}')


# --------------------------------------------------------------------------
# Normalisation statistics
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Transforms (as in the reference SupContrast)
# --------------------------------------------------------------------------

class TwoCropTransform:
    """Two independent augmentations of one image: the positive pair of contrastive learning."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, x):
        return [self.transform(x), self.transform(x)]


def supcon_transform(size, mean, std):
    return TwoCropTransform(transforms.Compose([
        transforms.RandomResizedCrop(size=size, scale=(0.2, 1.)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ]))


def train_transform(size, mean, std):
    """Augmentation for cross-entropy and linear-classifier training."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size=size, scale=(0.2, 1.)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])


def test_transform(size, mean, std):
    # The fork skipped this resize, so 300x300 test images reached a network
    # trained on --size crops. It is a no-op when images already have that size.
    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])


# --------------------------------------------------------------------------
# Seeded sampling: reproducible order and augmentation, resumable, shardable
# --------------------------------------------------------------------------

def _mix_seed(*parts):
    """A 63-bit integer determined only by `parts` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)


class SeededSampler(Sampler):
    """Yields (sample_seed, index) for this rank; order and seeds depend on (seed, epoch) only.

    Like DistributedSampler, each rank takes every world_size-th index of one
    shared permutation, padded (pad=True) by repeating its head so all ranks get
    the same number of items. Use pad=False for evaluation: every sample is then
    seen exactly once across ranks, and ranks may differ by one item.
    `set_start(k)` skips this rank's first k items until it is set back to 0.
    """

    def __init__(self, num_samples, *, shuffle, seed, rank=0, world_size=1, pad=True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f'need 0 <= rank < world_size, got rank={rank}, '
                             f'world_size={world_size}')
        if num_samples < 0:
            raise ValueError(f'num_samples must be >= 0, got {num_samples}')
        self.num_samples = int(num_samples)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def set_start(self, k):
        if k < 0:
            raise ValueError(f'start must be >= 0, got {k}')
        self.start = int(k)

    def _rank_share_size(self):
        if self.pad:
            return math.ceil(self.num_samples / self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def rank_indices(self):
        """This rank's indices for the current epoch, before skipping `start`."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(_mix_seed('order', self.seed, self.epoch))
            indices = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            indices = list(range(self.num_samples))
        if self.pad and indices:
            padding = math.ceil(self.num_samples / self.world_size) * self.world_size - len(indices)
            repeats = math.ceil(padding / len(indices))
            indices += (indices * repeats)[:padding]
        return indices[self.rank::self.world_size]

    def __iter__(self):
        for index in self.rank_indices()[self.start:]:
            yield _mix_seed('sample', self.seed, self.epoch, index), index

    def __len__(self):
        return max(0, self._rank_share_size() - self.start)


class SeededDataset(Dataset):
    """Loads item `index` with torch's RNG seeded by `sample_seed`, so its augmentation is
    the same in any worker, on any rank and after a resume; the caller's RNG is untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    @property
    def classes(self):
        return self.dataset.classes

    @property
    def targets(self):
        return self.dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        sample_seed, index = key
        # torchvision's v1 transforms draw from the default CPU generator.
        # Seeding only that one (not torch.manual_seed) leaves CUDA RNGs alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            return self.dataset[index]


def build_loader(dataset, batch_size, *, shuffle, seed, rank=0, world_size=1, num_workers=0,
                 pin_memory=False, pad=True):
    """(DataLoader, SeededSampler) over `dataset`; `batch_size` is per rank.

    Call sampler.set_epoch(epoch) before each epoch, and sampler.set_start(k)
    to resume after this rank's first k items.
    """
    if batch_size < 1:
        raise UserError(f'--batch_size must be at least 1, got {batch_size}')
    total_batch = batch_size * world_size
    if shuffle and total_batch > len(dataset):
        if world_size == 1:
            what = f'--batch_size {batch_size}'
        else:
            what = f'the batch ({batch_size} per rank x {world_size} ranks = {total_batch})'
        raise UserError(f'{what} is larger than the data set ({len(dataset)} images); '
                        f'lower --batch_size')
    sampler = SeededSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank,
                            world_size=world_size, pad=pad)
    # The loader draws its workers' base seed from this generator rather than
    # from torch's global RNG, so iterating leaves the caller's RNG as it was.
    generator = torch.Generator()
    generator.manual_seed(_mix_seed('loader', seed, rank))
    loader = DataLoader(SeededDataset(dataset), batch_size=batch_size, sampler=sampler,
                        num_workers=num_workers, pin_memory=pin_memory, drop_last=False,
                        persistent_workers=num_workers > 0,
                        prefetch_factor=4 if num_workers else None, generator=generator)
    return loader, sampler


def classification_loaders(opt):
    """(train_loader, train_sampler, val_loader) for main_ce.py and main_linear.py.

    Training images get the reference's crop-and-flip, test images are only
    resized; the test loader is not padded, so under torchrun every test image
    is evaluated exactly once. Sets ``opt.n_cls`` and ``opt.steps_per_epoch``.
    """
    mean, std = resolve_mean_std(opt.dataset, opt.mean, opt.std)
    with main_process_first():  # rank 0 downloads CIFAR while the others wait
        train_dataset = build_dataset(opt.dataset, 'train', train_transform(opt.size, mean, std),
                                      data_folder=opt.data_folder, test_folder=opt.test_folder)
        val_dataset = build_dataset(opt.dataset, 'test', test_transform(opt.size, mean, std),
                                    data_folder=opt.data_folder, test_folder=opt.test_folder)
    opt.n_cls = check_num_classes(train_dataset, val_dataset, opt.num_classes)

    common = dict(seed=opt.seed, rank=opt.rank, world_size=opt.world_size,
                  num_workers=opt.num_workers, pin_memory=opt.pin_memory)
    train_loader, train_sampler = build_loader(train_dataset, opt.local_batch_size,
                                               shuffle=True, **common)
    val_loader, _ = build_loader(val_dataset, opt.local_batch_size_val, shuffle=False, pad=False,
                                 **common)
    opt.steps_per_epoch = len(train_loader)
    return train_loader, train_sampler, val_loader
