"""CIFAR-10/100 read from their original on-disk files (the python pickles) without running code.

The batch files are pickles; an unpickler that accepts only what a numpy array
needs refuses anything else (``os.system``, ``builtins.eval``, ...) before it runs.
"""

import codecs
import os
import pickle
import socket

import numpy as np

from supcon.errors import UserError

# Seconds a download may wait on one socket operation; an offline machine then
# fails within seconds instead of hanging on the OS default (often minutes).
DOWNLOAD_TIMEOUT_S = 10


def short_reason(exc):
    """First line of an exception's message, for embedding in a one-line error."""
    lines = str(exc).strip().splitlines()
    reason = lines[0] if lines else type(exc).__name__
    return reason if len(reason) <= 200 else reason[:197] + '...'


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
        raise UserError(
            f'refusing to unpickle {path}: it asks for {exc}, which a CIFAR file '
            f'never contains; {fix}'
        ) from exc
    except OSError as exc:
        raise UserError(f'cannot read {path} ({short_reason(exc)}); {fix}') from exc
    except Exception as exc:  # pickle reports truncation/corruption with many types
        raise UserError(
            f'{path} is corrupt or truncated ({type(exc).__name__}: {short_reason(exc)}); {fix}'
        ) from exc
    if not isinstance(content, dict):
        raise UserError(f'{path} holds a {type(content).__name__}, not a CIFAR dict; {fix}')
    return {(k.decode('latin1') if isinstance(k, bytes) else k): v for k, v in content.items()}


def _as_text(name):
    return name.decode('latin1') if isinstance(name, bytes) else str(name)


class _CifarSpec:
    def __init__(
        self, title, folder, url, md5, train_files, test_files, meta_file, names_key, labels_key
    ):
        self.title, self.folder, self.url, self.md5 = title, folder, url, md5
        self.train_files, self.test_files, self.meta_file = train_files, test_files, meta_file
        self.names_key, self.labels_key = names_key, labels_key

    @property
    def all_files(self):
        return self.train_files + self.test_files + (self.meta_file,)


_CIFAR_SPECS = {
    'cifar10': _CifarSpec(
        'CIFAR-10',
        'cifar-10-batches-py',
        'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
        'c58f30108f718f92721af3b95e74349a',
        tuple(f'data_batch_{i}' for i in range(1, 6)),
        ('test_batch',),
        'batches.meta',
        'label_names',
        'labels',
    ),
    'cifar100': _CifarSpec(
        'CIFAR-100',
        'cifar-100-python',
        'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
        'eb9058c3a382ffc7106e4002c42a8d85',
        ('train',),
        ('test',),
        'meta',
        'fine_label_names',
        'fine_labels',
    ),
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
        return short_reason(exc)
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return None


CIFAR_NAMES = tuple(_CIFAR_SPECS)


def load_cifar(name, split, data_folder, download):
    """(images uint8 [N, 32, 32, 3], labels, class names) of one split; downloads if allowed and
    missing."""
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
            raise UserError(
                f'{spec.title} not found in {folder} and it could not be '
                f'downloaded ({reason}); {fix}'
            )

    meta_path = os.path.join(folder, spec.meta_file)
    meta = _load_batch_file(meta_path, spec.url)
    if spec.names_key not in meta:
        raise UserError(
            f'{meta_path} has no {spec.names_key!r}; replace it with the file from {spec.url}'
        )
    classes = [_as_text(n) for n in meta[spec.names_key]]

    images, targets = [], []
    for file_name in spec.train_files if split == 'train' else spec.test_files:
        path = os.path.join(folder, file_name)
        batch = _load_batch_file(path, spec.url)
        data, labels = batch.get('data'), batch.get(spec.labels_key)
        fix = f'replace it with the file from {spec.url}'
        if not (
            isinstance(data, np.ndarray)
            and data.dtype == np.uint8
            and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32
        ):
            raise UserError(f'{path} has no uint8 [N, 3072] "data" array; {fix}')
        if labels is None or len(labels) != len(data):
            raise UserError(
                f'{path} has no {spec.labels_key!r} list matching its {len(data)} images; {fix}'
            )
        labels = [int(label) for label in labels]
        if labels and not 0 <= min(labels) <= max(labels) < len(classes):
            raise UserError(f'{path} has labels outside 0..{len(classes) - 1}; {fix}')
        # Rows are channel-planar (1024 R, then G, then B values); PIL wants HWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        targets.extend(labels)
    images = np.ascontiguousarray(np.concatenate(images))
    return images, targets, classes
