"""What data a training run trains on: recorded in its checkpoints, checked when it resumes.

The run name keeps the reference's form, which names no data file or folder, so two runs with the
same flags on different CSVs or image folders share a save folder, and ``--resume auto`` (and
SLURM's automatic resume) would continue one on the other's data. Every checkpoint therefore
records ``data_fingerprint``, and resuming on data whose fingerprint differs is refused in one
line. The fingerprint is a hash of

- ``--dataset csv``: the bytes of the training CSV (``--data_csv``);
- ``--dataset path`` / ``imagenet``: the training folder's file list as it is read (each image's
  path below the folder and its class folder), not the pixels.

The data's path is recorded too (``data_csv`` / ``data_folder`` in the options), for the message:
the same data moved elsewhere resume, other data under the same name do not. CIFAR and digits are
fixed data sets (their name is already fixed on resume): no fingerprint. A checkpoint written before
fingerprints existed has none and resumes as before. Costs one listing of the training folder at the
start of a run (the data set's own build lists it again).
"""

import hashlib
import os

from supcon.data.image_folder import _is_folder, _scan_image_folder
from supcon.errors import UserError

DIGITS = 16  # hex digits kept: 64 bits, enough to tell data sets apart


def _source(opt):
    """(flag, file or folder) the training images come from, or None for fixed data sets."""
    if opt.dataset == 'csv':
        return '--data_csv', getattr(opt, 'data_csv', None) or opt.data_folder
    if opt.dataset == 'path':
        return '--data_folder', opt.data_folder
    if opt.dataset == 'imagenet':
        return '--data_folder', os.path.join(opt.data_folder, 'train')
    return None


def fingerprint(opt) -> str | None:
    """The training data's fingerprint ('sha256:<16 hex digits>'), or None (a fixed data set, or
    data that cannot be read: building the data set then says what is wrong, in one line)."""
    source = _source(opt)
    if source is None or source[1] is None:
        return None
    flag, path = source
    digest = hashlib.sha256()
    try:
        if opt.dataset == 'csv':
            with open(path, 'rb') as f:
                for block in iter(lambda: f.read(1 << 20), b''):
                    digest.update(block)
        else:
            classes = sorted(entry.name for entry in os.scandir(path) if _is_folder(entry))
            for image, label in _scan_image_folder(path, flag, classes):
                digest.update(f'{os.path.relpath(image, path)}\t{classes[label]}\n'.encode())
    except (OSError, UserError, UnicodeEncodeError):
        return None
    return f'sha256:{digest.hexdigest()[:DIGITS]}'


def check_resume(saved: dict, current: str | None, opt, path: str) -> None:
    """Refuse to resume the run of ``saved`` options (a checkpoint's) on other training data."""
    then = saved.get('data_fingerprint')
    if then is None or current is None or then == current:
        return
    flag, now_path = _source(opt)
    then_path = saved.get('data_csv') if opt.dataset == 'csv' else saved.get('data_folder')
    then_path = then_path or saved.get('data_folder')
    raise UserError(
        f'--resume {path}: the run was trained on other data ({flag} {then_path}, fingerprint'
        f' {then}) than {flag} {now_path} holds now ({current}); resume on the run\'s data or'
        f' start a new run (another --trial)'
    )
