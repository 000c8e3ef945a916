"""Data sets and the loaders every entry script builds from them.

One module owns the data so that main_supcon.py, main_ce.py, main_linear.py and main_tsne.py read
the same images with the same normalisation. Data sets: ``cifar10``/``cifar100`` (``cifar.py``),
``path`` (a folder of class sub-folders, the fork's; read by ``image_folder.py``), ``digits``
(scikit-learn's, offline), ``imagenet`` (``train/`` and ``val/`` folders of class sub-folders, the
usual ImageNet layout), ``fashion_mnist`` (its IDX files, ``fashion_mnist.py``).
``--val_split`` carves a validation split out of the training images for choosing settings.
Transforms live in ``augment.py``, seeded samplers in ``sampling.py``.
``csv`` lists images and their labels, one or several, in ``--data_csv``/``--test_csv`` files
(``csv_dataset.py``); which training images keep their labels is ``labelling.py``'s job.
"""

import gzip
import importlib.util
import os
from functools import lru_cache

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from supcon.data import balanced, long_tail, subset, val_split
from supcon.data.augment import test_transform, train_transform
from supcon.data.cifar import CIFAR_NAMES, load_cifar
from supcon.data.csv_dataset import build_csv_dataset, resolve_options
from supcon.data.fashion_mnist import DEBIAN_FOLDER, load_fashion_mnist
from supcon.data.image_folder import (  # noqa: F401 (DataError re-exported)
    DataError,
    build_image_folder,
    first_unreadable,
)
from supcon.data.labelling import classifier_training_set, labelled_part, note_left_out
from supcon.data.long_tail import long_tail_indices
from supcon.data.normalization import MEAN_STD, parse_triple, resolve_mean_std  # noqa: F401
from supcon.data.sampling import build_loader
from supcon.data.val_split import SplitSubset, split_off, validation_indices
from supcon.errors import UserError
from supcon.system.distributed import all_gather_objects, get_rank, get_world_size, note
from supcon.system.runtime import Runtime, main_process_first

DATASET_NAMES = ('cifar10', 'cifar100', 'path', 'digits', 'imagenet', 'csv', 'fashion_mnist')
# data sets held in memory as arrays of one image size (32x32; fashion_mnist 28x28): their
# batches stack without resizing
ARRAY_DATASETS = ('cifar10', 'cifar100', 'digits', 'fashion_mnist')


def add_arguments(parser, test_folder=True, imbalance=False, test_split_flags=None):
    """The data flags of the reference and of the fork that added ``--dataset path``.

    ``test_split_flags`` (main_supcon.py: '--knn_every, ...') says in the help that the test-split
    flags only matter with those: pretraining itself never reads the test split. ``imbalance`` adds
    --imbalance_ratio (the training scripts); ``'checkpoint'`` defaults it to the
    checkpoint's (main_linear.py).
    """
    group = parser.add_argument_group('data')
    knn = f' (pretraining: only for {test_split_flags})' if test_split_flags else ''
    group.add_argument(
        '--dataset',
        type=str,
        default='cifar10',
        choices=DATASET_NAMES,
        help='digits is scikit-learn\'s 8x8 digits, shipped offline for demos;'
        ' imagenet reads --data_folder/train and --data_folder/val; csv reads --data_csv'
        ' and --test_csv (docs/labels.md); fashion_mnist reads its IDX files, by default'
        f' the Debian package\'s in {DEBIAN_FOLDER} (docs/fashion-mnist.md)',
    )
    group.add_argument(
        '--data_csv',
        type=str,
        default=None,
        help='--dataset csv: the training CSV, columns path,labels (labels separated by ";",'
        ' empty: unlabelled; paths relative to the CSV\'s folder)',
    )
    group.add_argument(
        '--data_folder',
        type=str,
        default=None,
        help='CIFAR root; for --dataset path the training image folder (one'
        ' sub-folder per class); for imagenet the folder holding train/ and'
        ' val/; for fashion_mnist the folder of its IDX files (or of FashionMNIST/raw/)'
        ' (default ./datasets/; fashion_mnist: the Debian package\'s)',
    )
    if test_folder:
        group.add_argument(
            '--test_folder',
            type=str,
            default=None,
            help='test image folder for --dataset path, and for imagenet in place of'
            ' --data_folder/val; not read with --val_split' + knn,
        )
        group.add_argument(
            '--test_csv',
            type=str,
            default=None,
            help='--dataset csv: the test CSV, with the training CSV\'s labels' + knn,
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
        help='crop size fed to the network (default 224 for imagenet, 28 for fashion_mnist,'
        ' else 32)',
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
    val_split.add_argument(group)
    if imbalance:
        long_tail.add_argument(group, from_checkpoint=imbalance == 'checkpoint')
        subset.add_argument(group, from_checkpoint=imbalance == 'checkpoint')
    return group


def resolve_defaults(opt):
    """Fill the data defaults that depend on --dataset and refuse flags that cannot work."""
    if opt.size is None:
        opt.size = {'imagenet': 224, 'fashion_mnist': 28}.get(opt.dataset, 32)
    val_split.check_fraction(opt)
    resolve_options(opt)  # --dataset csv: its files travel as data_folder/test_folder
    if opt.dataset == 'imagenet' and opt.data_folder is None:
        raise UserError(
            '--dataset imagenet needs --data_folder (the folder holding train/ and'
            ' val/, one sub-folder per class in each)'
        )
    if opt.data_folder is None:
        opt.data_folder = DEBIAN_FOLDER if opt.dataset == 'fashion_mnist' else './datasets/'
    if opt.dataset in ('cifar10', 'cifar100') and (opt.mean or opt.std):
        note(
            f'using the given --mean/--std for {opt.dataset}; the reference ignores them'
            f' and always uses its own {opt.dataset} constants'
        )


def check_test_folder(opt, reads_test=True, test_split_flags=''):
    """Demand --test_folder only where a test folder is read; note a given one that is not.

    --dataset path reads it for the test split, imagenet instead of --data_folder/val, csv
    reads --test_csv (handed over as test_folder: csv_dataset.resolve_options); --val_split
    evaluates held-out training images instead, and pretraining (``reads_test=False``:
    main_supcon.py without any of ``test_split_flags``) evaluates nothing.
    """
    read = reads_test and not opt.val_split and opt.dataset in ('path', 'imagenet', 'csv')
    if read and opt.dataset == 'path' and opt.test_folder is None:
        raise UserError(
            '--dataset path needs --test_folder (a folder with the same class sub-folders as'
            ' --data_folder) for the test split, or --val_split to evaluate on held-out'
            ' training images instead'
        )
    if opt.test_folder is None or read:
        return
    if not reads_test:
        why = f'pretraining reads the test split only for {test_split_flags}'
    elif opt.val_split:
        why = f'--val_split {opt.val_split} evaluates on held-out training images instead'
    else:
        why = f'--dataset {opt.dataset} has its own test split'
    flag = '--test_csv' if opt.dataset == 'csv' else '--test_folder'
    note(f'{flag} {opt.test_folder} is not read: {why}')


def fixed_size(dataset, size):
    """The side images are resized to in the loader when batches must stack (--gpu_aug):
    None for the in-memory data sets (all their images share one size), else ``size``."""
    return None if dataset in ARRAY_DATASETS else size


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


def _load_digits():
    """scikit-learn's ``load_digits()``'s ``images`` (1797 x 8 x 8, 0 to 16) and ``target``, read
    from its file without importing it (0.85 s of CPU); ``load_digits`` where there is none."""
    spec = importlib.util.find_spec('sklearn')  # finds the package without running it
    folders = (spec and spec.submodule_search_locations) or []
    for folder in folders:
        path = os.path.join(folder, 'datasets', 'data', 'digits.csv.gz')
        if os.path.isfile(path):
            with gzip.open(path, 'rt') as rows:
                data = np.loadtxt(rows, delimiter=',')
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


@lru_cache(maxsize=1)
def _digits_arrays():
    """(train_images, train_labels, test_images, test_labels), converted once per process."""
    images, target = _load_digits()
    gray = np.rint(images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    # Upsampled so RandomResizedCrop at the usual sizes crops a picture, not 8x8 blocks.
    large = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BICUBIC)) for g in gray])
    rgb = np.ascontiguousarray(np.repeat(large[..., None], 3, axis=3))
    labels = target.astype(np.int64)
    train_idx, test_idx = split_off(labels, 0.2)
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
    data_folder=None,
    test_folder=None,
    download=True,
    val_split=0.0,
    imbalance_ratio=1.0,
    imbalance_seed=0,
    train_subset=0,
):
    """The `split` ('train' or 'test') of data set `name`; items are (transform(image), label).

    The result has `.classes` (class names) and `.targets` (int label per item).
    `test_folder` is only used by 'path' and 'imagenet' (in place of `data_folder`/val);
    `download` only by the CIFAR sets; for 'csv', `data_folder` and `test_folder` are the
    training and test CSV files (multi-hot targets when a training row has several labels;
    -1 or a zero row: unlabelled). With
    `val_split` > 0 'train' is the training images less a held-out fraction and 'test'
    is that held-out fraction (of the training images, with `transform`). With
    `train_subset` N > 0 'train' is then a fixed class-balanced N of those images
    (``subset.py``), and with `imbalance_ratio` > 1 cut to a long tail (``long_tail_indices``).
    """
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if data_folder is None and name != 'fashion_mnist':  # whose default is the Debian package's
        data_folder = './datasets/'
    if split == 'train' and imbalance_ratio != 1:
        full = build_dataset(
            name, split, transform, data_folder, test_folder, download, val_split,
            train_subset=train_subset,
        )  # fmt: skip
        kept = long_tail_indices(full.targets, len(full.classes), imbalance_ratio, imbalance_seed)
        return SplitSubset(full, kept)
    if split == 'train' and train_subset:
        full = build_dataset(name, split, transform, data_folder, test_folder, download, val_split)
        targets = getattr(full, 'stratify_targets', full.targets)  # a CSV's: one label a row
        kept = subset.subset_indices(targets, train_subset, full.classes)
        return SplitSubset(full, kept, f' of --train_subset {train_subset}')
    if val_split:
        full = build_dataset(name, 'train', transform, data_folder, test_folder, download)
        targets = getattr(full, 'stratify_targets', full.targets)  # a CSV's: one label a row
        held_out = validation_indices(targets, val_split, full.classes)
        if split == 'test':
            return SplitSubset(full, held_out)
        size_note = (
            f' left by --val_split {val_split}, which holds out {len(held_out)} of the'
            f' {len(full.targets)} training images'
        )
        kept = np.setdiff1d(np.arange(len(full.targets)), held_out)
        return SplitSubset(full, kept, size_note)
    if name in CIFAR_NAMES:
        images, targets, classes = load_cifar(name, split, os.fspath(data_folder), download)
        return ArrayImageDataset(images, targets, classes, transform)
    if name == 'path':
        return build_image_folder(split, transform, data_folder, test_folder)
    if name == 'imagenet':
        # the usual layout: <data_folder>/train/<class>/*.JPEG and <data_folder>/val/<class>/...
        root = os.fspath(data_folder)
        train, val = os.path.join(root, 'train'), os.path.join(root, 'val')
        if split == 'train' and not os.path.isdir(train):
            raise UserError(
                f'--dataset imagenet reads the training images from --data_folder/train, and'
                f' {train} is not a folder; point --data_folder at the folder holding train/'
            )
        if split == 'test' and test_folder is None and not os.path.isdir(val):
            raise UserError(
                f'--dataset imagenet reads the test images from --data_folder/val, and {val}'
                f' is not a folder; add it, or give your test image folder as --test_folder'
            )
        return build_image_folder(split, transform, train, test_folder or val)
    if name == 'digits':
        return _build_digits(split, transform)
    if name == 'fashion_mnist':
        images, targets, classes = load_fashion_mnist(split, data_folder)
        return ArrayImageDataset(images, targets, classes, transform)
    if name == 'csv':
        return build_csv_dataset(split, transform, data_folder, test_folder)
    raise UserError(f'unknown --dataset {name!r}; choose one of {", ".join(DATASET_NAMES)}')


def build_split(opt, split, transform, seed=0):
    """The run's ``split`` ('train' or 'test') as its options define it: the data set and its
    folders, --val_split, and the training split's long tail (--imbalance_ratio, drawn with
    ``seed``; main_linear.py draws it with its checkpoint's, ``opt.imbalance_seed``)."""
    tail_seed = getattr(opt, 'imbalance_seed', None)
    return build_dataset(
        opt.dataset,
        split,
        transform,
        data_folder=opt.data_folder,
        test_folder=getattr(opt, 'test_folder', None),
        val_split=opt.val_split,
        imbalance_ratio=getattr(opt, 'imbalance_ratio', None) or 1.0,
        imbalance_seed=seed if tail_seed is None else tail_seed,
        train_subset=getattr(opt, 'train_subset', None) or 0,
    )


def check_images(dataset, workers=1):
    """Decode every image of a folder-backed ``dataset`` once; raise the first broken one.

    For the evaluation split, which is first read after a whole training epoch (that a
    broken file would waste). Under torchrun each rank reads its share and all ranks
    raise the same error. In-memory data sets have nothing to check.
    """
    base, indices = dataset, None
    if isinstance(dataset, SplitSubset):
        base, indices = dataset.dataset, dataset.indices
    samples = getattr(base, 'samples', None)
    if samples is None:
        return
    paths = [samples[i][0] for i in (range(len(samples)) if indices is None else indices)]
    problem = first_unreadable(paths[get_rank() :: get_world_size()], workers)
    problem = next((p for p in all_gather_objects(problem) if p), None)
    if problem:  # every rank raises it: a UserError, printed once (runtime.launch)
        raise UserError(problem)


def classification_loaders(opt, rt: Runtime, uint8_train: bool = False):
    """(train_loader, train_sampler, val_loader, num_classes) for main_ce.py and main_linear.py.

    Training images get the reference's crop-and-flip (or --aug's policy), test images
    are only resized; the test loader is not padded, so under torchrun every test image
    is evaluated exactly once. ``uint8_train=True`` (--gpu_aug) hands training images
    over as uint8 tensors for the device to augment. ``num_classes`` is checked against
    --num_classes. The test loader uses --num_workers_val workers (the fork's flag); the
    training loader follows --sampler (``balanced.train_loader``). Only images with a label are
    trained on (``labelling.classifier_training_set``).
    """
    mean, std = resolve_mean_std(opt.dataset, opt.mean, opt.std)
    if uint8_train:
        from supcon.data.gpu_augment import to_uint8_tensor

        train_tf = to_uint8_tensor(fixed_size(opt.dataset, opt.size))
    else:
        train_tf = train_transform(opt.size, mean, std, opt.aug, opt.crop_scale)
    with main_process_first():  # rank 0 downloads CIFAR while the others wait
        train_dataset = build_split(opt, 'train', train_tf, rt.seed)
        val_dataset = build_split(opt, 'test', test_transform(opt.size, mean, std))
    num_classes = check_num_classes(train_dataset, val_dataset, opt.num_classes)
    val_dataset, unlabelled = labelled_part(val_dataset)  # nothing to score them against
    note_left_out(unlabelled, 'the evaluation')
    val_options = rt.loader_options()
    val_options['num_workers'] = min(opt.num_workers_val, os.cpu_count() or 1)
    check_images(val_dataset, max(1, val_options['num_workers']))
    # images without a label (CSV rows, those a partly labelled checkpoint left unlabelled)
    train_dataset = classifier_training_set(train_dataset, opt)

    train_loader, train_sampler = training_loader(train_dataset, opt, rt)
    val_loader, _ = build_loader(
        val_dataset, rt.local_batch_size_val, shuffle=False, pad=False, **val_options
    )
    return train_loader, train_sampler, val_loader, num_classes


def training_loader(dataset, opt, rt: Runtime):
    """(DataLoader, sampler) of a training split: the seeded shuffle, or class-balanced batches
    (--sampler balanced, ``balanced.py``)."""
    return build_loader(
        dataset,
        rt.local_batch_size,
        shuffle=True,
        sampler=balanced.sampler_for(dataset, opt, rt),
        **rt.loader_options(),
    )
