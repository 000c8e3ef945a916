"""main_predict.py's input and output: the images to classify, and the CSV of predictions.

Images come from a folder (searched recursively, any layout, in sorted order), a CSV with a
``path`` column (relative paths are relative to the CSV's folder), one image file, or a data
set's split. An image that cannot be read becomes a row with the reason, never a crash: its
item carries a blank image and the reason, and the loop leaves it out of the network's batch
results.
"""

import csv
import io
import os
import re
from typing import NamedTuple

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from supcon.data.cifar import short_reason
from supcon.data.image_folder import DataError, _load_rgb_image
from supcon.errors import UserError

NO_TARGET = -1  # an image without a known label


class Prediction(NamedTuple):
    """What main_predict.py found for one image (picklable, to gather from the ranks)."""

    index: int  # in the list of images (sorting by it restores their order)
    error: str  # why the image could not be read; '' when it was
    top: list  # [(class, probability)], the most probable first
    chosen: list  # multi-label: [(class, probability)] at or above --threshold, best first
    target: object  # the label (class index or multi-hot list); NO_TARGET when unknown
    logits: list | None = None  # multi-label splits: for the mean average precision


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def list_images(path: str) -> list:
    """The image files ``--images`` names: a folder's (recursively, sorted), a CSV's ``path``
    column, or the one image file given."""
    if os.path.isdir(path):
        found = []
        # no links into folders: a link back up the tree would list images forever
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            found.extend(os.path.join(folder, name) for name in files if is_image(name))
        if not found:
            raise UserError(
                f'--images {path} holds no image files ({", ".join(IMG_EXTENSIONS)}), in any'
                f' sub-folder; pass a folder of images or a CSV of their paths'
            )
        return sorted(found)
    if not os.path.exists(path):
        raise UserError(
            f'--images {path} does not exist; pass a folder of images, a CSV with a path'
            f' column, or an image file'
        )
    if path.lower().endswith('.csv'):
        return read_path_csv(path)
    if is_image(path):
        return [path]
    raise UserError(
        f'--images {path} is neither a folder, a .csv file nor an image'
        f' ({", ".join(IMG_EXTENSIONS)}); pass one of them'
    )


def read_path_csv(path: str) -> list:
    """The ``path`` column of a CSV (other columns, such as ``labels``, are ignored)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(f)
            header = [name.strip() for name in reader.fieldnames or []]
            if 'path' not in header:
                found = ','.join(header) or 'none'
                raise UserError(
                    f'--images {path} has no "path" column (its header: {found}); the first'
                    f' line must name the columns, e.g. "path"'
                )
            reader.fieldnames = header
            paths = []
            for row in reader:
                value = (row.get('path') or '').strip()
                if not value:
                    raise UserError(
                        f'--images {path} line {reader.line_num} has an empty path; fill it in'
                    )
                paths.append(os.path.join(folder, value))
    except UnicodeDecodeError:
        raise UserError(f'--images {path} is not UTF-8 text; save it as UTF-8 CSV') from None
    except csv.Error as exc:
        raise UserError(f'--images {path} is not valid CSV ({exc}); fix the file') from None
    if not paths:
        raise UserError(f'--images {path} lists no images; add one path per line')
    return paths


class ImageFiles(Dataset):
    """Items ``(image, index, error, target)``: the transformed image, or a blank one and why
    it could not be read; ``target`` is NO_TARGET."""

    def __init__(self, paths, transform, size):
        self.paths, self.transform, self.size = list(paths), transform, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            image = self.transform(_load_rgb_image(self.paths[index]))
            return image, index, '', NO_TARGET
        except DataError as exc:
            return torch.zeros(3, self.size, self.size), index, reason(exc), NO_TARGET


class DataSetItems(Dataset):
    """A data set's split as ``ImageFiles`` gives items (its labels as the targets)."""

    def __init__(self, dataset, size):
        self.dataset, self.size = dataset, size
        self.classes = dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        target = self.dataset.targets[index]
        if hasattr(target, 'ndim') and target.ndim == 1:  # multi-hot
            target = torch.as_tensor(target, dtype=torch.float32)
        try:
            image, _ = self.dataset[index]
            return image, index, '', target
        except DataError as exc:
            return torch.zeros(3, self.size, self.size), index, reason(exc), target


def reason(exc: DataError) -> str:
    """Why an image could not be read, without its path (the row names it)."""
    why = re.sub(r'\s*<_io\.\w+ name=.*?>', '', short_reason(exc.__cause__ or exc))
    return f'cannot read the image: {why}'


def item_names(dataset, name: str, split: str) -> list:
    """The path of every item of a data set's split, or ``<data set>:<split>:<index>`` for one
    held in memory (digits, CIFAR)."""
    base, indices = dataset, None
    if hasattr(dataset, 'indices') and hasattr(dataset, 'dataset'):  # a SplitSubset
        base, indices = dataset.dataset, dataset.indices
    samples = getattr(base, 'samples', None)
    if samples is None:
        return [f'{name}:{split}:{i}' for i in range(len(dataset))]
    paths = [path for path, _ in samples]
    return paths if indices is None else [paths[i] for i in indices]


# --------------------------------------------------------------------------- the CSV


def columns(multi_label: bool, labelled: bool) -> list:
    first = ['path'] + (['labels' if multi_label else 'label'] if labelled else [])
    if multi_label:
        return first + ['classes', 'probabilities', 'top_classes', 'top_probabilities', 'error']
    return first + ['class', 'probability', 'top_classes', 'top_probabilities', 'error']


def csv_text(header: list, rows: list) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def joined(values) -> str:
    """Several names or numbers in one field, separated by ";" as --dataset csv's labels."""
    return ';'.join(values)


def probability(value: float) -> str:
    return f'{value:.6f}'
