"""Tests for data.py: CIFAR files, image folders, digits, stats, transforms, seeded loading."""

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
from PIL import Image
from torchvision import transforms

import data
from data import (DATASET_NAMES, MEAN_STD, ArrayImageDataset, DataError, SeededDataset,
                  SeededSampler, TwoCropTransform, build_dataset, build_loader, check_num_classes,
                  check_same_classes, parse_triple, resolve_mean_std, supcon_transform,
                  train_transform)
from data import test_transform as make_test_transform  # not collected as a test
from util import UserError

MEAN, STD = MEAN_STD['cifar10']
CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer',
                 'dog', 'frog', 'horse', 'ship', 'truck']


def assert_one_line(exc_info, *fragments):
    message = str(exc_info.value)
    assert '\n' not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --------------------------------------------------------------------------
# Tiny CIFAR folders in the real layout
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
    """5 train batches of 2 images and a test batch of 3, written like Python 2 did."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    batches = {}
    for i in range(1, 6):
        batches[f'data_batch_{i}'] = (planar_rows(rng, 2), [(2 * i) % 10, (2 * i + 1) % 10])
    batches['test_batch'] = (planar_rows(rng, 3), [9, 0, 4])
    for name, (rows, labels) in batches.items():
        content = {b'batch_label': name.encode(), b'data': rows, b'labels': labels,
                   b'filenames': [b'x.png'] * len(labels)}
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
    splits = {'train': (planar_rows(rng, 4), [99, 5, 42, 0], [19, 1, 2, 3]),
              'test': (planar_rows(rng, 2), [7, 98], [4, 5])}
    for name, (rows, fine, coarse) in splits.items():
        content = {b'data': rows, b'fine_labels': fine, b'coarse_labels': coarse}
        (folder / name).write_bytes(pickle.dumps(content))
    meta = {b'fine_label_names': [f'fine{i}' for i in range(100)],
            b'coarse_label_names': [f'coarse{i}' for i in range(20)]}
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
    assert_one_line(info, os.path.join(str(tmp_path), 'cifar-10-batches-py'),
                    'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz')


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
    assert_one_line(info, 'cifar-100-python', 'could not be downloaded', 'Name or service',
                    'https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz')
    assert seen_timeouts == [data.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before


def test_cifar_real_download_attempt_fails_fast_offline(tmp_path, monkeypatch):
    try:
        socket.getaddrinfo('www.cs.toronto.edu', 443)
    except OSError:
        pass
    else:
        pytest.skip('online: a real download would fetch 170 MB')
    monkeypatch.setattr(data, 'DOWNLOAD_TIMEOUT_S', 3)
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


# --------------------------------------------------------------------------
# Image folders (--dataset path)
# --------------------------------------------------------------------------

def write_image_folder(root, counts, size=(40, 30)):
    rng = np.random.default_rng(2)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.png')
    return root


def test_image_folder_classes_targets_and_transforms(tmp_path):
    root = write_image_folder(tmp_path / 'train', {'cat': 3, 'dog': 2, 'eel': 1})
    train = build_dataset('path', 'train', None, data_folder=root)
    assert train.classes == ['cat', 'dog', 'eel'] and train.targets == [0, 0, 0, 1, 1, 2]
    image, label = train[4]
    assert image.size == (40, 30) and image.mode == 'RGB' and label == 1

    pair, _ = build_dataset('path', 'train', supcon_transform(24, MEAN, STD), data_folder=root)[0]
    assert isinstance(pair, list) and len(pair) == 2
    assert all(view.shape == (3, 24, 24) for view in pair) and not torch.equal(*pair)
    for make in (train_transform, make_test_transform):
        tensor, _ = build_dataset('path', 'train', make(24, MEAN, STD), data_folder=root)[0]
        assert tensor.shape == (3, 24, 24)


def test_image_folder_test_split_reads_test_folder(tmp_path):
    write_image_folder(tmp_path / 'train', {'a': 1, 'b': 1})
    test_root = write_image_folder(tmp_path / 'test', {'a': 2, 'b': 3})
    test = build_dataset('path', 'test', None, data_folder=tmp_path / 'train',
                         test_folder=test_root)
    assert len(test) == 5 and test.targets == [0, 0, 1, 1, 1]


def _make_missing(tmp_path):
    return tmp_path / 'nope', 'does not exist'


def _make_file(tmp_path):
    (tmp_path / 'file.txt').write_text('x')
    return tmp_path / 'file.txt', 'not a directory'


def _make_empty(tmp_path):
    (tmp_path / 'empty').mkdir()
    return tmp_path / 'empty', 'no class sub-folders'


def _make_flat(tmp_path):
    root = write_image_folder(tmp_path / 'flat', {'only': 1}) / 'only'
    return root, 'no class sub-folders'


def _make_empty_classes(tmp_path):
    for name in ('a', 'b'):
        (tmp_path / 'classes' / name).mkdir(parents=True)
    (tmp_path / 'classes' / 'a' / 'notes.txt').write_text('not an image')
    return tmp_path / 'classes', 'no image files'


def _make_one_empty_class(tmp_path):
    root = write_image_folder(tmp_path / 'partly', {'a': 1})
    (root / 'b').mkdir()
    return root, 'without image files: b'


@pytest.mark.parametrize('make', [_make_missing, _make_file, _make_empty, _make_flat,
                                  _make_empty_classes, _make_one_empty_class])
def test_bad_image_folder_is_user_error(tmp_path, make):
    folder, problem = make(tmp_path)
    with pytest.raises(UserError) as info:
        build_dataset('path', 'train', None, data_folder=folder)
    assert_one_line(info, '--data_folder', str(folder), problem)


def test_path_test_split_needs_test_folder(tmp_path):
    root = write_image_folder(tmp_path / 'train', {'a': 1})
    with pytest.raises(UserError) as info:
        build_dataset('path', 'test', None, data_folder=root)
    assert_one_line(info, '--test_folder')


def test_check_same_classes_lists_the_differences(tmp_path):
    train = build_dataset('path', 'train', None,
                          data_folder=write_image_folder(tmp_path / 'tr', {'cat': 1, 'dog': 1}))
    test = build_dataset('path', 'train', None,
                         data_folder=write_image_folder(tmp_path / 'te', {'cat': 1, 'cow': 1}))
    check_same_classes(train, train)
    with pytest.raises(UserError) as info:
        check_same_classes(train, test)
    assert_one_line(info, 'only in train: dog', 'only in test: cow')


def test_check_num_classes(cifar10_root):
    root, _ = cifar10_root
    train = build_dataset('cifar10', 'train', None, data_folder=root)
    test = build_dataset('cifar10', 'test', None, data_folder=root)
    assert check_num_classes(train, test) == check_num_classes(train, test, 10) == 10
    with pytest.raises(UserError) as info:
        check_num_classes(train, test, 12)
    assert_one_line(info, '--num_classes 12', '10 classes', 'airplane')


def test_corrupt_image_raises_data_error_when_loaded(tmp_path):
    root = write_image_folder(tmp_path / 'train', {'a': 2})
    broken = root / 'a' / '1.png'
    broken.write_bytes(broken.read_bytes()[:60])
    dataset = build_dataset('path', 'train', None, data_folder=root)  # no pre-scan
    dataset[0]
    with pytest.raises(DataError) as info:
        dataset[1]
    assert_one_line(info, str(broken), 'remove or replace')


def test_corrupt_image_in_worker_keeps_one_line_message(tmp_path):
    root = write_image_folder(tmp_path / 'train', {'a': 1})
    broken = root / 'a' / '0.png'
    broken.write_bytes(b'not a png')
    dataset = build_dataset('path', 'train', make_test_transform(8, MEAN, STD), data_folder=root)
    loader, _ = build_loader(dataset, 1, shuffle=False, seed=0, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert_one_line(info, str(broken), 'remove or replace')


def test_unknown_dataset_name():
    with pytest.raises(UserError) as info:
        build_dataset('imagenet', 'train', None)
    assert_one_line(info, 'imagenet', ', '.join(DATASET_NAMES))


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------

def test_digits_stratified_split_of_32x32_rgb_images():
    train = build_dataset('digits', 'train', None)
    test = build_dataset('digits', 'test', None)
    assert (len(train), len(test)) == (1437, 360)
    assert train.classes == test.classes == [str(d) for d in range(10)]
    train_counts = np.bincount(train.targets, minlength=10)
    test_counts = np.bincount(test.targets, minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all()
    assert np.abs(test_counts - 0.2 * (train_counts + test_counts)).max() <= 1
    image, label = test[0]
    assert image.size == (32, 32) and image.mode == 'RGB' and 0 <= label <= 9
    assert build_dataset('digits', 'train', None).images is train.images  # cached once


def test_digits_mean_std_constants_match_the_images():
    pixels = build_dataset('digits', 'train', None).images.astype(np.float64) / 255
    mean, std = MEAN_STD['digits']
    np.testing.assert_allclose(pixels.mean(axis=(0, 1, 2)), mean, atol=1e-3)
    np.testing.assert_allclose(pixels.std(axis=(0, 1, 2)), std, atol=1e-3)


# --------------------------------------------------------------------------
# Normalisation statistics
# --------------------------------------------------------------------------

@pytest.mark.parametrize('text', ['(0.3837, 0.3704, 0.3072)', '0.3837,0.3704,0.3072',
                                  '[0.3837 0.3704 0.3072]', ' 0.3837 0.3704 0.3072 ',
                                  '(3.837e-1, .3704, 0.3072,)'])
def test_parse_triple_accepts_common_forms(text):
    assert parse_triple(text, '--mean') == pytest.approx((0.3837, 0.3704, 0.3072))


@pytest.mark.parametrize('text', ['abc', '', '(0.1, 0.2)', '0.1,0.2,0.3,0.4', 'nan,1,2',
                                  '(0.1, 0.2, 0.3]', '1e999,1,1', '__import__("os")',
                                  '0.1;0.2;0.3'])
def test_parse_triple_rejects_everything_else(text):
    with pytest.raises(UserError) as info:
        parse_triple(text, '--std')
    assert_one_line(info, '--std must be three numbers', repr(text))


def test_resolve_mean_std():
    assert resolve_mean_std('cifar100', None, None) == MEAN_STD['cifar100']
    mean, std = resolve_mean_std('cifar10', '(0.1, 0.2, 0.3)', None)
    assert mean == (0.1, 0.2, 0.3) and std == MEAN_STD['cifar10'][1]
    assert resolve_mean_std('path', '1,2,3', '4 5 6') == ((1., 2., 3.), (4., 5., 6.))
    for mean_text, std_text in [(None, None), ('1,2,3', None), (None, '1,2,3')]:
        with pytest.raises(UserError) as info:
            resolve_mean_std('path', mean_text, std_text)
        assert_one_line(info, '--dataset path needs --mean and --std', '--mean "(')
    for bad_std in ['0.1, 0, 0.2', '0.1, -0.2, 0.2']:
        with pytest.raises(UserError) as info:
            resolve_mean_std('digits', None, bad_std)
        assert_one_line(info, '--std', '> 0')


# --------------------------------------------------------------------------
# Seeded sampling and loading
# --------------------------------------------------------------------------

def random_images(n, seed=3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return ArrayImageDataset(images, [i % 3 for i in range(n)], ['a', 'b', 'c'],
                             supcon_transform(16, MEAN, STD))


def test_sampler_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        sampler = SeededSampler(50, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert sorted(i for _, i in order(0, 1)) == list(range(50))
    assert [i for _, i in SeededSampler(5, shuffle=False, seed=0)] == [0, 1, 2, 3, 4]
    seeds = [s for s, _ in order(0, 1)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2 ** 63 for s in seeds)


def test_seeded_dataset_repeats_augmentation_and_spares_global_rng():
    dataset = SeededDataset(random_images(4))
    assert dataset.classes == ['a', 'b', 'c'] and dataset.targets == [0, 1, 2, 0]
    sampler = SeededSampler(4, shuffle=True, seed=7)
    state = torch.get_rng_state()
    first = [dataset[key] for key in sampler]
    second = [dataset[key] for key in sampler]
    assert torch.equal(torch.get_rng_state(), state)
    for (views_a, label_a), (views_b, label_b) in zip(first, second):
        assert label_a == label_b and all(torch.equal(a, b) for a, b in zip(views_a, views_b))
    sampler.set_epoch(1)
    key = next(k for k in sampler if k[1] == next(iter(SeededSampler(4, shuffle=True, seed=7)))[1])
    assert not torch.equal(dataset[key][0][0], first[0][0][0])  # new epoch, new augmentation


def shares(num_samples, world_size, pad, epoch=3):
    result = []
    for rank in range(world_size):
        sampler = SeededSampler(num_samples, shuffle=True, seed=5, rank=rank,
                                world_size=world_size, pad=pad)
        sampler.set_epoch(epoch)
        indices = [i for _, i in sampler]
        assert len(indices) == len(sampler)
        result.append(indices)
    return result


def test_two_ranks_with_padding_split_everything_evenly():
    rank0, rank1 = shares(7, 2, pad=True)
    assert len(rank0) == len(rank1) == 4
    assert set(rank0) | set(rank1) == set(range(7))
    assert len(rank0) + len(rank1) - len(set(rank0 + rank1)) == 1  # one padded repeat


def test_ranks_without_padding_see_each_index_once():
    parts = shares(7, 3, pad=False)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert sorted(sum(parts, [])) == list(range(7))


def test_set_start_yields_the_tail():
    sampler = SeededSampler(11, shuffle=True, seed=2, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_start(4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    sampler.set_start(0)
    assert list(sampler) == full


def batches_of(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    return [(torch.cat(views), labels) for views, labels in loader]


def test_loader_batches_match_with_and_without_workers_and_after_resume():
    dataset = random_images(10)
    serial_loader, serial_sampler = build_loader(dataset, 4, shuffle=True, seed=11)
    state = torch.get_rng_state()
    serial = batches_of(serial_loader, serial_sampler, epoch=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert [len(labels) for _, labels in serial] == [4, 4, 2]

    worker_loader, worker_sampler = build_loader(dataset, 4, shuffle=True, seed=11,
                                                 num_workers=2)
    parallel = batches_of(worker_loader, worker_sampler, epoch=2)
    for (images_a, labels_a), (images_b, labels_b) in zip(serial, parallel, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)

    serial_sampler.set_start(4)  # resume after the first batch
    resumed = batches_of(serial_loader, serial_sampler, epoch=2)
    for (images_a, labels_a), (images_b, labels_b) in zip(serial[1:], resumed, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_batch_larger_than_data_set_is_user_error():
    dataset = random_images(6)
    with pytest.raises(UserError) as info:
        build_loader(dataset, 7, shuffle=True, seed=0)
    assert_one_line(info, '--batch_size 7', '6 images', 'lower --batch_size')
    with pytest.raises(UserError) as info:
        build_loader(dataset, 4, shuffle=True, seed=0, world_size=2)
    assert_one_line(info, '4 per rank x 2 ranks', '6 images')
    loader, _ = build_loader(dataset, 7, shuffle=False, seed=0, pad=False)  # evaluation is fine
    assert len(loader) == 1


def test_two_crop_transform_returns_two_views():
    pair = TwoCropTransform(lambda x: x + 1)(1)
    assert pair == [2, 2]
