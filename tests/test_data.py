"""Tests for data.py: image folders, digits, class checks, --mean/--std parsing."""

import gc
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_cifar import MEAN, STD, assert_one_line, write_cifar10

from supcon.data.augment import supcon_transform, train_transform
from supcon.data.augment import test_transform as make_test_transform  # not collected as a test
from supcon.data.datasets import (
    DATASET_NAMES,
    MEAN_STD,
    DataError,
    build_dataset,
    check_num_classes,
    check_same_classes,
    parse_triple,
    resolve_mean_std,
)
from supcon.data.sampling import build_loader
from supcon.data.val_split import split_off, stratified_split
from util import UserError

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
    test = build_dataset(
        'path', 'test', None, data_folder=tmp_path / 'train', test_folder=test_root
    )
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


@pytest.mark.parametrize(
    'make',
    [
        _make_missing,
        _make_file,
        _make_empty,
        _make_flat,
        _make_empty_classes,
        _make_one_empty_class,
    ],
)
def test_bad_image_folder_is_user_error(tmp_path, make):
    folder, problem = make(tmp_path)
    with pytest.raises(UserError) as info:
        build_dataset('path', 'train', None, data_folder=folder)
    assert_one_line(info, '--data_folder', str(folder), problem)


def test_image_folder_reads_nested_and_linked_folders_as_imagefolder_does(tmp_path):
    from torchvision import datasets

    root = write_image_folder(tmp_path / 'train', {'a': 2, 'b': 1, 'c': 1}, size=(4, 4))
    write_image_folder(root / 'a' / 'sub', {'deeper': 2}, size=(4, 4))
    (root / 'a' / 'notes.txt').write_text('not an image')
    elsewhere = write_image_folder(tmp_path / 'elsewhere', {'more': 2}, size=(4, 4))
    (root / 'c' / 'linked').symlink_to(elsewhere / 'more')  # a link out of the tree is fine
    dataset = build_dataset('path', 'train', None, data_folder=root)
    reference = datasets.ImageFolder(str(root), allow_empty=True)
    assert dataset.samples == reference.samples and dataset.classes == reference.classes
    assert dataset.targets == [0, 0, 0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize(
    'link, target, problem',
    [
        ('a/loop', '..', 'a/loop is a symbolic link back to {root}, a folder that contains it'),
        ('a/sub/self', '.', 'a/sub/self is a symbolic link back to {root}/a/sub'),
        ('b/other', '../a', '{root}/b/other and {root}/a are the same folder'),
    ],
)
def test_a_folder_reached_twice_through_a_link_is_refused(tmp_path, link, target, problem):
    """ImageFolder follows links without a loop check: a loop read the images dozens of times."""
    root = write_image_folder(tmp_path / 'train', {'a': 2, 'b': 1}, size=(4, 4))
    (root / 'a' / 'sub').mkdir()
    (root / link).symlink_to(target)
    with pytest.raises(UserError) as info:
        build_dataset('path', 'train', None, data_folder=root)
    assert_one_line(info, f'--data_folder {root}: ', problem.format(root=root.resolve()), 'remove')


def test_path_test_split_needs_test_folder(tmp_path):
    root = write_image_folder(tmp_path / 'train', {'a': 1})
    with pytest.raises(UserError) as info:
        build_dataset('path', 'test', None, data_folder=root)
    assert_one_line(info, '--test_folder')


def test_check_same_classes_lists_the_differences(tmp_path):
    train = build_dataset(
        'path', 'train', None, data_folder=write_image_folder(tmp_path / 'tr', {'cat': 1, 'dog': 1})
    )
    test = build_dataset(
        'path', 'train', None, data_folder=write_image_folder(tmp_path / 'te', {'cat': 1, 'cow': 1})
    )
    check_same_classes(train, train)
    with pytest.raises(UserError) as info:
        check_same_classes(train, test)
    assert_one_line(info, 'only in train: dog', 'only in test: cow')


def test_check_num_classes(tmp_path):
    root, _ = write_cifar10(tmp_path)
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
    batches = iter(loader)
    with pytest.raises(DataError) as info:
        next(batches)
    assert_one_line(info, str(broken), 'remove or replace')
    # end the loader's worker here: left to the garbage collector, it ended in a later test,
    # after a 5 s wait for the worker (DataLoader's shutdown of an iterator that raised)
    del info, batches
    gc.collect()


def test_unknown_dataset_name():
    with pytest.raises(UserError) as info:
        build_dataset('svhn', 'train', None)
    assert_one_line(info, 'svhn', ', '.join(DATASET_NAMES))


# ----------------------------------------------------------------------------------------- digits
# --------------------------------------------------------------------------


@pytest.mark.slow
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


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from supcon.data import datasets

    digits = load_digits()
    for name in ('sklearn.datasets', 'sklearn.model_selection'):
        monkeypatch.setitem(sys.modules, name, None)  # an import of them would fail
    images, labels = datasets._load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)
    train, test = split_off(labels, 0.2)  # the digits' train/test split
    monkeypatch.undo()
    want = train_test_split(np.arange(1797), test_size=0.2, stratify=labels, random_state=0)
    np.testing.assert_array_equal(train, want[0])  # in scikit-learn's order, not only the sets
    np.testing.assert_array_equal(test, want[1])
    # where scikit-learn's file is not found, load_digits() itself
    monkeypatch.setattr(datasets.importlib.util, 'find_spec', lambda name: None)
    images, labels = datasets._load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)


@pytest.mark.parametrize('labels', ['one_label', 'multi_hot'])
def test_stratified_split_draws_scikit_learns_split(labels):
    """--val_split's fraction and --train_subset's count, on 60 random label sets each."""
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(0 if labels == 'one_label' else 1)
    drawn = refused = 0
    for _ in range(60):
        n = int(rng.integers(10, 300))
        if labels == 'one_label':
            targets = rng.integers(0, int(rng.integers(2, 12)), n)
        else:
            targets = rng.integers(0, 2, (n, 3))
        if rng.random() < 0.5:
            fraction = float(rng.uniform(0.05, 0.9))
            n_test = math.ceil(fraction * n)
            sizes, asked = (n - n_test, n_test), dict(test_size=fraction)
        else:
            n_train = int(rng.integers(1, n))
            sizes, asked = (n_train, n - n_train), dict(train_size=n_train)
        try:
            want = train_test_split(np.arange(n), stratify=targets, random_state=0, **asked)
        except ValueError as refusal:  # a class of one image, or fewer images than classes
            with pytest.raises(ValueError) as ours:  # in scikit-learn's words
                stratified_split(targets, *sizes)
            assert str(ours.value) == str(refusal)
            refused += 1
            continue
        got = stratified_split(targets, *sizes)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        drawn += 1
    assert drawn >= 40 and refused >= 1


def test_digits_mean_std_constants_match_the_images():
    pixels = build_dataset('digits', 'train', None).images.astype(np.float64) / 255
    mean, std = MEAN_STD['digits']
    np.testing.assert_allclose(pixels.mean(axis=(0, 1, 2)), mean, atol=1e-3)
    np.testing.assert_allclose(pixels.std(axis=(0, 1, 2)), std, atol=1e-3)


# ----------------------------------------------------------------------- Normalisation statistics
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    'text',
    [
        '(0.3837, 0.3704, 0.3072)',
        '0.3837,0.3704,0.3072',
        '[0.3837 0.3704 0.3072]',
        ' 0.3837 0.3704 0.3072 ',
        '(3.837e-1, .3704, 0.3072,)',
    ],
)
def test_parse_triple_accepts_common_forms(text):
    assert parse_triple(text, '--mean') == pytest.approx((0.3837, 0.3704, 0.3072))


@pytest.mark.parametrize(
    'text',
    [
        'abc',
        '',
        '(0.1, 0.2)',
        '0.1,0.2,0.3,0.4',
        'nan,1,2',
        '(0.1, 0.2, 0.3]',
        '1e999,1,1',
        '__import__("os")',
        '0.1;0.2;0.3',
    ],
)
def test_parse_triple_rejects_everything_else(text):
    with pytest.raises(UserError) as info:
        parse_triple(text, '--std')
    assert_one_line(info, '--std must be three numbers', repr(text))


def test_resolve_mean_std():
    assert resolve_mean_std('cifar100', None, None) == MEAN_STD['cifar100']
    mean, std = resolve_mean_std('cifar10', '(0.1, 0.2, 0.3)', None)
    assert mean == (0.1, 0.2, 0.3) and std == MEAN_STD['cifar10'][1]
    assert resolve_mean_std('path', '1,2,3', '4 5 6') == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    for mean_text, std_text in [(None, None), ('1,2,3', None), (None, '1,2,3')]:
        with pytest.raises(UserError) as info:
            resolve_mean_std('path', mean_text, std_text)
        assert_one_line(info, '--dataset path needs --mean and --std', '--mean "(')
    for bad_std in ['0.1, 0, 0.2', '0.1, -0.2, 0.2']:
        with pytest.raises(UserError) as info:
            resolve_mean_std('digits', None, bad_std)
        assert_one_line(info, '--std', '> 0')
