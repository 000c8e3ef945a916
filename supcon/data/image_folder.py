"""Image folders (``--dataset path``, ImageNet's ``train/`` and ``val/``): one class per sub-folder.

Read as torchvision's ``ImageFolder`` reads them, except that each real folder is read once
(a symbolic-link loop or a second way into a folder is refused), images decode to RGB, and
every problem (a missing, empty or unreadable folder, a broken image) is one line naming the
file and the fix.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image
from torchvision import datasets

from supcon.data.cifar import short_reason
from supcon.errors import UserError


class DataError(UserError):
    """An image file that cannot be read; the message names the file.

    Raised by the rank whose share of the data holds the file, so that rank prints it
    (``rank_local``; other errors are printed by rank 0 alone, ``runtime.launch``).
    """

    rank_local = True

    def __init__(self, message):
        # A DataLoader worker re-raises a worker's exception as
        # type(exc)("Caught DataError in DataLoader worker ...\n<traceback>"),
        # which would bury the one-line message under a traceback. Its last
        # line is "data.DataError: <message>", so keep just that.
        if '\n' in message:
            last_line = message.rstrip().splitlines()[-1]
            message = last_line.split('DataError: ', 1)[-1]
        super().__init__(message)


def _load_rgb_image(path):
    try:
        with open(path, 'rb') as f:
            image = Image.open(f)
            return image.convert('RGB')
    except Exception as exc:  # PIL's decoders raise many types on malformed files
        raise DataError(
            f'cannot read image {path} ({short_reason(exc)}); remove or replace the file'
        ) from exc


def first_unreadable(paths, workers=1):
    """The message of the first of ``paths`` (in order) that does not decode, or None.

    Each image is decoded as the loader would; Pillow releases the GIL while it decodes,
    so ``workers`` threads read in parallel.
    """

    def problem(path):
        try:
            _load_rgb_image(path)
        except DataError as exc:
            return str(exc)
        return None

    pool = ThreadPoolExecutor(max(1, workers))
    try:
        return next((message for message in pool.map(problem, paths) if message), None)
    finally:
        pool.shutdown(cancel_futures=True)


def _is_folder(entry):
    try:
        return entry.is_dir()  # follows symbolic links; False for a broken one
    except OSError:
        return False


def _scan_image_folder(folder, flag, class_names):
    """(path, class index) of every image under each class sub-folder, in ImageFolder's order.

    torchvision's ImageFolder walks with ``followlinks=True`` and no loop check: a symbolic
    link back up the tree made it read the same images dozens of times. Here each real
    folder is read once: a link back to a folder that contains it (a loop), or a second
    way into a folder already read (the same images under two names, maybe two classes),
    is refused with both paths.
    """

    def scandir(path):
        try:
            with os.scandir(path) as entries:
                return list(entries)
        except OSError as exc:
            raise UserError(
                f'{flag} {folder}: cannot read the folder {path}'
                f' ({exc.strerror or exc}); make it readable or remove it'
            ) from None

    seen = {}  # real path -> the path it was first read through
    visited = []  # (path, file names)

    def visit(path, ancestors):
        real = os.path.realpath(path)
        if real in ancestors:
            raise UserError(
                f'{flag} {folder}: {path} is a symbolic link back to {real}, a folder'
                f' that contains it (a loop); remove the link'
            )
        if real in seen:
            raise UserError(
                f'{flag} {folder}: {path} and {seen[real]} are the same folder'
                f' ({real}), so its images would be read twice; remove one of them'
            )
        seen[real] = path
        entries = scandir(path)
        visited.append((path, sorted(e.name for e in entries if not _is_folder(e))))
        for entry in sorted((e for e in entries if _is_folder(e)), key=lambda e: e.name):
            visit(entry.path, ancestors | {real})

    root = frozenset([os.path.realpath(folder)])
    samples = []
    for index, name in enumerate(class_names):
        visited.clear()
        visit(os.path.join(folder, name), root)
        for path, names in sorted(visited):  # the order of sorted(os.walk(...))
            samples.extend(
                (os.path.join(path, fname), index)
                for fname in names
                if datasets.folder.has_file_allowed_extension(fname, datasets.folder.IMG_EXTENSIONS)
            )
    return samples


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder whose scan reads each real folder once (_scan_image_folder)."""

    def __init__(self, root, flag, **kwargs):
        self.flag = flag
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        classes = sorted(entry.name for entry in os.scandir(directory) if _is_folder(entry))
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(
        self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False
    ):
        return _scan_image_folder(directory, self.flag, sorted(class_to_idx, key=class_to_idx.get))


def build_image_folder(split, transform, data_folder, test_folder):
    if split == 'train':
        flag, folder = '--data_folder', data_folder
    else:
        flag, folder = '--test_folder', test_folder
        if folder is None:
            raise UserError(
                '--dataset path needs --test_folder (a folder with the same class '
                'sub-folders as --data_folder) for the test split'
            )
    folder = os.fspath(folder)
    example = os.path.join(folder, 'cat', '001.png')
    layout = f'put the images in one sub-folder per class, e.g. {example}'
    if not os.path.exists(folder):
        raise UserError(f'{flag} {folder} does not exist; point {flag} at your image folder')
    if not os.path.isdir(folder):
        raise UserError(
            f'{flag} {folder} is not a directory; point {flag} at a folder of class sub-folders'
        )
    if not any(_is_folder(entry) for entry in os.scandir(folder)):
        raise UserError(f'{flag} {folder} has no class sub-folders; {layout}')

    dataset = _ImageFolder(
        folder, flag, transform=transform, loader=_load_rgb_image, allow_empty=True
    )
    extensions = ', '.join(datasets.folder.IMG_EXTENSIONS)
    if not dataset.samples:
        raise UserError(
            f'{flag} {folder} has no image files ({extensions}) in its class sub-folders; {layout}'
        )
    counts = np.bincount(dataset.targets, minlength=len(dataset.classes))
    empty = [name for name, count in zip(dataset.classes, counts) if count == 0]
    if empty:
        # An empty class would still take a label and an output unit.
        raise UserError(
            f'{flag} {folder} has class folders without image files: '
            f'{", ".join(empty)} (expected {extensions}); add images to them or '
            f'remove them'
        )
    return dataset
