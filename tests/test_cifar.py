"""Tests for cifar.py: CIFAR read from its on-disk pickles, safely; downloads that fail fast."""

import io
import os
import pickle
import socket
import struct
import time
import urllib.error

import numpy as np
import pytest
import torch
from torchvision import transforms

from supcon.data import cifar
from supcon.data.augment import test_transform as make_test_transform  # not collected as a test
from supcon.data.augment import train_transform
from supcon.data.datasets import MEAN_STD, build_dataset
from util import UserError

MEAN, STD = MEAN_STD['cifar10']
CIFAR10_NAMES = [
    'airplane',
    'automobile',
    'bird',
    'cat',
    'deer',
    'dog',
    'frog',
    'horse',
    'ship',
    'truck',
]


def assert_one_line(exc_info, *fragments):
    message = str(exc_info.value)
    assert '\n' not in message, message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------- Tiny CIFAR folders in the real layout
# --------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as the real CIFAR files (pickled by Python 2) do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        size = len(obj)
        if size < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([size]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack('<i', size) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def py2_pickle(obj):
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    # Arrays pickled by numpy 1 name numpy.core, not numpy 2's numpy._core.
    return buffer.getvalue().replace(b'numpy._core.multiarray\n', b'numpy.core.multiarray\n')


def planar_rows(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def pixel(row_data, row, col, channel):
    """The value the planar layout stores for (row, col, channel)."""
    return int(row_data[channel * 1024 + row * 32 + col])


@pytest.fixture
def cifar10_root(tmp_path):
    return write_cifar10(tmp_path)


def write_cifar10(tmp_path):
    """5 train batches of 2 images and a test batch of 3, written like Python 2 did."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    batches = {}
    for i in range(1, 6):
        batches[f'data_batch_{i}'] = (planar_rows(rng, 2), [(2 * i) % 10, (2 * i + 1) % 10])
    batches['test_batch'] = (planar_rows(rng, 3), [9, 0, 4])
    for name, (rows, labels) in batches.items():
        content = {
            b'batch_label': name.encode(),
            b'data': rows,
            b'labels': labels,
            b'filenames': [b'x.png'] * len(labels),
        }
        (folder / name).write_bytes(py2_pickle(content))
    meta = {b'label_names': [n.encode() for n in CIFAR10_NAMES], b'num_vis': 3072}
    (folder / 'batches.meta').write_bytes(py2_pickle(meta))
    return tmp_path, batches


@pytest.fixture
def cifar100_root(tmp_path):
    """CIFAR-100 pickled by Python 3 with bytes keys, to cover both key kinds."""
    rng = np.random.default_rng(1)
    folder = tmp_path / 'cifar-100-python'
    folder.mkdir()
    splits = {
        'train': (planar_rows(rng, 4), [99, 5, 42, 0], [19, 1, 2, 3]),
        'test': (planar_rows(rng, 2), [7, 98], [4, 5]),
    }
    for name, (rows, fine, coarse) in splits.items():
        content = {b'data': rows, b'fine_labels': fine, b'coarse_labels': coarse}
        (folder / name).write_bytes(pickle.dumps(content))
    meta = {
        b'fine_label_names': [f'fine{i}' for i in range(100)],
        b'coarse_label_names': [f'coarse{i}' for i in range(20)],
    }
    (folder / 'meta').write_bytes(pickle.dumps(meta))
    return tmp_path, splits


def test_cifar10_reads_all_batches_pixels_labels_and_names(cifar10_root):
    root, batches = cifar10_root
    train = build_dataset('cifar10', 'train', None, data_folder=str(root))
    test = build_dataset('cifar10', 'test', None, data_folder=str(root))
    assert len(train) == 10 and len(test) == 3
    assert train.classes == CIFAR10_NAMES
    expected = [label for i in range(1, 6) for label in batches[f'data_batch_{i}'][1]]
    assert train.targets == expected and test.targets == [9, 0, 4]
    assert train.images.shape == (10, 32, 32, 3) and train.images.dtype == np.uint8
    # Item 5 is the second image of data_batch_3: batches concatenate in order.
    row_data = batches['data_batch_3'][0][1]
    image, label = train[5]
    assert image.size == (32, 32) and image.mode == 'RGB' and label == expected[5]
    for row, col, channel in [(0, 0, 0), (3, 17, 1), (31, 2, 2), (20, 31, 0)]:
        assert image.getpixel((col, row))[channel] == pixel(row_data, row, col, channel)


def test_cifar100_uses_fine_labels_and_bytes_keys(cifar100_root):
    root, splits = cifar100_root
    train = build_dataset('cifar100', 'train', None, data_folder=root)
    test = build_dataset('cifar100', 'test', None, data_folder=root)
    assert (len(train), len(test)) == (4, 2)
    assert train.targets == [99, 5, 42, 0] and test.targets == [7, 98]
    assert len(train.classes) == 100 and train.classes[99] == 'fine99'
    image, _ = test[1]
    assert image.getpixel((9, 4))[2] == pixel(splits['test'][0][1], 4, 9, 2)


def test_cifar_transform_is_applied(cifar10_root):
    root, _ = cifar10_root
    train = build_dataset('cifar10', 'train', train_transform(16, MEAN, STD), data_folder=root)
    image, label = train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and isinstance(label, int)


def test_test_transform_at_native_size_only_normalises(cifar10_root):
    root, _ = cifar10_root
    test = build_dataset('cifar10', 'test', None, data_folder=root)
    plain = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    assert torch.equal(make_test_transform(32, MEAN, STD)(test[0][0]), plain(test[0][0]))


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(UserError) as info:
        build_dataset('cifar10', 'train', None, data_folder=str(tmp_path), download=False)
    assert_one_line(
        info,
        os.path.join(str(tmp_path), 'cifar-10-batches-py'),
        'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz',
    )


def test_cifar_failed_download_is_user_error_and_restores_timeout(tmp_path, monkeypatch):
    seen_timeouts = []

    def offline(url, download_root, **kwargs):
        seen_timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError('[Errno -2] Name or service not known')

    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, 'download_and_extract_archive', offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(UserError) as info:
        build_dataset('cifar100', 'test', None, data_folder=str(tmp_path))
    assert_one_line(
        info,
        'cifar-100-python',
        'could not be downloaded',
        'Name or service',
        'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz',
    )
    assert seen_timeouts == [cifar.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before


def test_cifar_real_download_attempt_fails_fast_offline(tmp_path, monkeypatch):
    try:
        socket.getaddrinfo('www.cs.toronto.edu', 443)
    except OSError:
        pass
    else:
        pytest.skip('online: a real download would fetch 170 MB')
    monkeypatch.setattr(cifar, "DOWNLOAD_TIMEOUT_S", 3)
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        build_dataset('cifar10', 'test', None, data_folder=str(tmp_path / 'datasets'))
    assert time.monotonic() - started < 15
    assert_one_line(info, 'could not be downloaded', 'cifar-10-python.tar.gz')


def test_corrupt_batch_file_names_the_file(cifar10_root):
    root, _ = cifar10_root
    path = root / 'cifar-10-batches-py' / 'data_batch_2'
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError) as info:
        build_dataset('cifar10', 'train', None, data_folder=root)
    assert_one_line(info, str(path), 'corrupt')


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_with_forbidden_global_is_refused(cifar10_root):
    root, _ = cifar10_root
    marker = root / 'pwned'
    path = root / 'cifar-10-batches-py' / 'test_batch'
    path.write_bytes(pickle.dumps({'data': _RunsShell(marker), 'labels': []}, protocol=2))
    with pytest.raises(UserError) as info:
        build_dataset('cifar10', 'test', None, data_folder=root)
    assert_one_line(info, 'refusing', 'system', str(path))
    assert not marker.exists()
