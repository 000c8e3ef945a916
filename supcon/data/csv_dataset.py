"""``--dataset csv``: images listed in CSV files with their labels, one or several per image.

A CSV has a header naming the columns ``path`` and ``labels`` (other columns are ignored); the
labels of a row are separated by ``;``, an empty ``labels`` marks an unlabelled image, and a
relative path is relative to the CSV's folder. The classes are the sorted set of the training
CSV's labels, so a CSV with one label per row gives the classes and targets an image folder of
the same class sub-folders gives (``--dataset path``). When any training row has several labels
the data set is multi-label: each target is a multi-hot float32 row over the classes (all zeros:
unlabelled); otherwise a target is the class index (-1: unlabelled). Images are read as
``--dataset path`` reads them (RGB; a broken file is one line naming it), and every problem with
a CSV (no such file, a missing column, a missing image, a label the training CSV does not know,
no rows) is one line naming the file, the line and the fix.
"""

import csv
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from supcon.data.image_folder import _load_rgb_image
from supcon.errors import UserError

COLUMNS = ('path', 'labels')
SEPARATOR = ';'
UNLABELLED = -1  # the label SupConLoss reads as "no label" (docs/labels.md)
# label cells looked at once when stratifying a multi-label CSV (8 MiB of int64): its memory
# stays one block, not rows x labels (100k rows of 1500 labels: 1.2 GB)
STRATIFY_ENTRIES = 1 << 20
EXAMPLE = 'path,labels\\nimages/0001.png,cat;dog\\nimages/0002.png,'


class CSVImageDataset(Dataset):
    """Images and targets of one CSV (``build_csv_dataset``); items are (transform(image), target).

    ``classes`` (names, sorted), ``targets`` (an int per item, or a uint8 multi-hot row per item
    when ``multilabel``), ``samples`` ((path, target) pairs, as ImageFolder's) and ``root`` (the
    CSV file).
    """

    def __init__(self, root, paths, targets, classes, multilabel, transform=None):
        self.root = root
        self.classes = list(classes)
        self.multilabel = multilabel
        self.targets = targets
        self.samples = list(zip(paths, targets))
        self.transform = transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        image = _load_rgb_image(path)
        if self.transform is not None:
            image = self.transform(image)
        if self.multilabel:
            return image, torch.from_numpy(target.astype(np.float32))
        return image, target

    @property
    def stratify_targets(self):
        """One label per item for a stratified --val_split: for a multi-label row its least
        frequent label (so rare labels reach both splits), -1 for an unlabelled one."""
        if not self.multilabel:
            return self.targets
        chunk = max(1, STRATIFY_ENTRIES // max(1, len(self.classes)))
        blocks = [self.targets[i : i + chunk] for i in range(0, len(self.targets), chunk)]
        counts = sum(np.asarray(block, dtype=np.int64).sum(axis=0) for block in blocks)
        stratify = []
        for block in blocks:
            rows = np.asarray(block, dtype=bool)
            rarest = np.where(rows, counts, np.iinfo(np.int64).max).argmin(axis=1)
            stratify += np.where(rows.any(axis=1), rarest, UNLABELLED).tolist()
        return stratify


def read_csv(csv_path, flag):
    """[(line number, absolute image path, [labels])] of a CSV, after checking its layout.

    Does not look at the image files (``check_files`` does).
    """
    csv_path = os.fspath(csv_path)
    layout = f'a header line and one row per image, e.g. "{EXAMPLE}"'
    if not os.path.exists(csv_path):
        raise UserError(f'{flag} {csv_path} does not exist; point {flag} at a CSV file ({layout})')
    if os.path.isdir(csv_path):
        raise UserError(
            f'{flag} {csv_path} is a directory; point {flag} at a CSV file with the columns'
            f' {",".join(COLUMNS)}'
        )
    folder = os.path.dirname(os.path.abspath(csv_path))
    rows = []
    try:
        # utf-8-sig: a spreadsheet's byte-order mark would otherwise become part of "path"
        with open(csv_path, newline='', encoding='utf-8-sig') as f:
            reader = csv.DictReader(f, restkey=None)
            header = reader.fieldnames
            if not header:
                raise UserError(f'{flag} {csv_path} is empty; it needs {layout}')
            header = [name.strip() for name in header]
            reader.fieldnames = header
            missing = [name for name in COLUMNS if name not in header]
            if missing:
                raise UserError(
                    f'{flag} {csv_path} has no {" or ".join(repr(m) for m in missing)} column'
                    f' (its header: {",".join(header)}); the header must name the columns'
                    f' {",".join(COLUMNS)}'
                )
            for row in reader:
                line = reader.line_num
                if None in row:  # more fields than the header names
                    raise UserError(
                        f'{flag} {csv_path} line {line} has more fields than the header;'
                        f' separate labels with "{SEPARATOR}" and quote a path holding a comma'
                    )
                path, labels = row['path'], row['labels']
                if path is None or labels is None:
                    raise UserError(
                        f'{flag} {csv_path} line {line} has fewer fields than the header;'
                        f' give every row a path and a (possibly empty) labels field'
                    )
                if not path.strip():
                    raise UserError(f'{flag} {csv_path} line {line} has an empty path; fill it in')
                names = sorted({name.strip() for name in labels.split(SEPARATOR)} - {''})
                rows.append((line, os.path.join(folder, path.strip()), names))
    except UnicodeDecodeError:
        raise UserError(f'{flag} {csv_path} is not UTF-8 text; save it as UTF-8 CSV') from None
    except csv.Error as exc:
        raise UserError(
            f'{flag} {csv_path} line {reader.line_num} is not valid CSV ({exc}); fix the row'
        ) from None
    if not rows:
        raise UserError(f'{flag} {csv_path} has a header but no rows; list one image per row')
    return rows


def check_files(rows, csv_path, flag):
    """Refuse a CSV some of whose images do not exist, naming the first of them."""
    missing = [(line, path) for line, path, _ in rows if not os.path.isfile(path)]
    if missing:
        line, path = missing[0]
        raise UserError(
            f'{flag} {csv_path}: {len(missing)} of the {len(rows)} listed images do not'
            f' exist, the first on line {line}: {path}; fix the paths (relative ones are'
            f' relative to the CSV\'s folder)'
        )


def build_csv_dataset(split, transform, data_csv, test_csv):
    """The ``split`` ('train' or 'test') of ``--dataset csv``: classes from the training CSV.

    The test CSV may use only the training CSV's labels, every test row needs a label, and
    several labels per row only when the training CSV has several on some row.
    """
    if data_csv is None:
        raise UserError('--dataset csv needs --data_csv (the training CSV, columns path,labels)')
    train_rows = read_csv(data_csv, '--data_csv')
    classes = sorted({name for _, _, names in train_rows for name in names})
    multilabel = any(len(names) > 1 for _, _, names in train_rows)
    if split == 'train':
        flag, csv_path, rows = '--data_csv', data_csv, train_rows
    else:
        if test_csv is None:
            raise UserError(
                '--dataset csv needs --test_csv (a CSV of test images with the training'
                ' CSV\'s labels) for the test split'
            )
        flag, csv_path = '--test_csv', test_csv
        rows = read_csv(test_csv, flag)
        _check_test_labels(rows, classes, multilabel, csv_path)
    check_files(rows, csv_path, flag)

    index = {name: i for i, name in enumerate(classes)}
    if multilabel:
        targets = []
        for _, _, names in rows:
            target = np.zeros(len(classes), dtype=np.uint8)
            target[[index[name] for name in names]] = 1
            targets.append(target)
    else:
        targets = [index[names[0]] if names else UNLABELLED for _, _, names in rows]
    paths = [path for _, path, _ in rows]
    return CSVImageDataset(os.fspath(csv_path), paths, targets, classes, multilabel, transform)


def _check_test_labels(rows, classes, multilabel, csv_path):
    known = set(classes)
    for line, _, names in rows:
        unknown = [name for name in names if name not in known]
        if unknown:
            shown = ', '.join(classes[:10]) + (', ...' if len(classes) > 10 else '')
            raise UserError(
                f'--test_csv {csv_path} line {line}: label {unknown[0]!r} is not one of the'
                f' training CSV\'s {len(classes)} classes ({shown or "none"}); fix the label or'
                f' add images of it to --data_csv'
            )
        if not names:
            raise UserError(
                f'--test_csv {csv_path} line {line} has no labels; every test image needs its'
                f' labels to be measured: add them or remove the row'
            )
        if len(names) > 1 and not multilabel:
            raise UserError(
                f'--test_csv {csv_path} line {line} has {len(names)} labels but every row of'
                f' --data_csv has at most one, so the classifier is single-label; give the'
                f' test row one label or the training rows all of theirs'
            )


def resolve_options(opt):
    """Check the CSV flags; for ``--dataset csv`` hand the CSV files to every ``build_dataset``
    caller through ``data_folder``/``test_folder`` (which that data set does not otherwise use)."""
    data_csv, test_csv = getattr(opt, 'data_csv', None), getattr(opt, 'test_csv', None)
    if opt.dataset != 'csv':
        if data_csv is not None or test_csv is not None:
            raise UserError(
                f'--data_csv/--test_csv are read by --dataset csv only; add --dataset csv or'
                f' drop them (not --dataset {opt.dataset})'
            )
        return
    if opt.data_folder is not None or getattr(opt, 'test_folder', None) is not None:
        raise UserError(
            '--dataset csv reads its images from --data_csv and --test_csv; drop'
            ' --data_folder/--test_folder'
        )
    if data_csv is None:
        raise UserError(
            '--dataset csv needs --data_csv TRAIN.csv (columns path,labels) and --mean/--std'
        )
    opt.data_folder, opt.test_folder = data_csv, test_csv
