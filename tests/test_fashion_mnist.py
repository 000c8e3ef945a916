"""--dataset fashion_mnist: the IDX reader (supcon/data/fashion_mnist.py) on the installed Debian
package's files and on small IDX sets the tests write, damaged ones included, and the scripts
end to end on such a set.

The real-file tests read the IDX bytes themselves (gzip + struct), independently of the reader,
and skip only when the package is absent (``.ci/run`` installs it).
"""

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import describe, run_scripts_forked, saved_files
from inprocess import call

from supcon.data import datasets, fashion_mnist
from supcon.data.normalization import MEAN_STD
from supcon.errors import UserError
from supcon.system.checkpoint import load_checkpoint

DEBIAN = '/usr/share/datasets/fashion-mnist'
NAMES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
# the data set authors' class names (github.com/zalandoresearch/fashion-mnist, "Labels")
AUTHORS_CLASSES = [
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
]
installed = pytest.mark.skipif(
    not all(os.path.isfile(f'{DEBIAN}/{n}.gz') for pair in NAMES.values() for n in pair),
    reason=f'the Debian package dataset-fashion-mnist is not installed ({DEBIAN} lacks its'
    ' files): apt-get install dataset-fashion-mnist (.ci/run installs it)',
)


# ------------------------------------------------------------------------- the installed files


def raw_idx(path):
    """(sizes, data bytes) of an IDX file, read with gzip and struct alone: a zero byte pair,
    the type code 0x08 (unsigned byte), the number of dimensions, then big-endian sizes."""
    with gzip.open(path, 'rb') as f:
        content = f.read()
    zero, kind, ndim = struct.unpack('>HBB', content[:4])
    assert (zero, kind) == (0, 0x08)
    sizes = struct.unpack(f'>{ndim}I', content[4 : 4 + 4 * ndim])
    return sizes, content[4 + 4 * ndim :]


@installed
@pytest.mark.parametrize('split,count', [('train', 60000), ('test', 10000)])
def test_installed_files_give_the_counts_classes_and_first_and_last_items(split, count):
    dataset = datasets.build_dataset('fashion_mnist', split, None)  # no folder: the package's
    (n_images, rows, cols), pixels = raw_idx(f'{DEBIAN}/{NAMES[split][0]}.gz')
    (n_labels,), labels = raw_idx(f'{DEBIAN}/{NAMES[split][1]}.gz')
    assert n_images == n_labels == count == len(dataset) and (rows, cols) == (28, 28)
    assert dataset.classes == AUTHORS_CLASSES
    assert dataset.targets == list(labels)  # every label; first and last among them
    side = rows * cols
    for index, start in ((0, 0), (count - 1, (count - 1) * side)):
        expected = np.frombuffer(pixels[start : start + side], np.uint8).reshape(28, 28)
        image, label = dataset[index]
        assert label == labels[index]
        assert image.mode == 'RGB' and image.size == (28, 28)
        np.testing.assert_array_equal(np.asarray(image), np.repeat(expected[..., None], 3, 2))
    assert np.bincount(dataset.targets).tolist() == [count // 10] * 10


@installed
def test_mean_std_constants_match_the_installed_training_images():
    _, pixels = raw_idx(f'{DEBIAN}/{NAMES["train"][0]}.gz')
    counts = np.bincount(np.frombuffer(pixels, np.uint8), minlength=256)  # exact, in integers
    values = np.arange(256) / 255
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())  # of every pixel
    np.testing.assert_allclose(MEAN_STD['fashion_mnist'], [[mean] * 3, [std] * 3], atol=5e-5)


@installed
def test_val_split_holds_out_a_stratified_tenth_of_the_installed_training_images():
    train = datasets.build_dataset('fashion_mnist', 'train', None, val_split=0.1)
    held_out = datasets.build_dataset('fashion_mnist', 'test', None, val_split=0.1)
    assert (len(train), len(held_out)) == (54000, 6000)
    assert np.bincount(held_out.targets).tolist() == [600] * 10
    assert sorted(np.concatenate([train.indices, held_out.indices]).tolist()) == list(range(60000))


# ----------------------------------------------------------------------- small written IDX sets


def idx(array, magic=None):
    """The IDX bytes of a uint8 array: magic number (0x0800 + dimensions), sizes, data."""
    magic = 0x0800 + array.ndim if magic is None else magic
    sizes = struct.pack(f'>{array.ndim}I', *array.shape)
    return struct.pack('>i', magic) + sizes + array.astype(np.uint8).tobytes()


def write_set(folder, n_train=40, n_test=20, compress=True, seed=0, test_copies_train=False):
    """A Fashion-MNIST-shaped IDX set in ``folder``: random 28x28 images, labels cycling
    through 0-9; ``test_copies_train``: the test images are the first training images, with
    their labels. Returns {split: (images [N, 28, 28], labels [N])}."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (('train', n_train), ('test', n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) + rng.integers(10)) % 10
        if split == 'test' and test_copies_train:
            images, labels = arrays['train'][0][:n], arrays['train'][1][:n]
        arrays[split] = (images, labels)
        for name, array in zip(NAMES[split], (images, labels)):
            content = idx(array)
            if compress:
                (folder / f'{name}.gz').write_bytes(gzip.compress(content))
            else:
                (folder / name).write_bytes(content)
    return arrays


@pytest.mark.parametrize('compress', [True, False], ids=['gz', 'plain'])
@pytest.mark.parametrize('layout', ['flat', 'torchvision'])
def test_written_files_read_back_in_each_form_and_layout(tmp_path, compress, layout):
    where = tmp_path / 'FashionMNIST' / 'raw' if layout == 'torchvision' else tmp_path
    arrays = write_set(where, compress=compress)
    for split, (images, labels) in arrays.items():
        dataset = datasets.build_dataset('fashion_mnist', split, None, data_folder=tmp_path)
        np.testing.assert_array_equal(dataset.images[..., 0], images)
        assert (dataset.images == dataset.images[..., :1]).all()  # grey in all three channels
        assert dataset.targets == labels.tolist() and dataset.classes == AUTHORS_CLASSES


def test_files_are_read_once_per_process_and_again_when_rewritten(tmp_path):
    write_set(tmp_path, compress=False)
    first = datasets.build_dataset('fashion_mnist', 'train', None, data_folder=tmp_path)
    again = datasets.build_dataset(
        'fashion_mnist', 'train', None, data_folder=tmp_path, val_split=0.5
    )
    assert again.dataset.images is first.images
    rewritten = write_set(tmp_path, compress=False, seed=1)
    reread = datasets.build_dataset('fashion_mnist', 'train', None, data_folder=tmp_path)
    np.testing.assert_array_equal(reread.images[..., 0], rewritten['train'][0])


def test_a_missing_package_names_the_apt_command(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_FOLDER', str(tmp_path / 'absent'))
    with pytest.raises(UserError) as info:
        datasets.build_dataset('fashion_mnist', 'train', None)
    message = str(info.value)
    assert '\n' not in message and str(tmp_path / 'absent') in message
    assert '`apt-get install dataset-fashion-mnist`' in message and '--data_folder' in message


def test_a_damaged_package_file_names_the_reinstall(tmp_path, monkeypatch):
    write_set(tmp_path)
    (tmp_path / f'{NAMES["train"][1]}.gz').write_bytes(gzip.compress(b'\0\0\x08\x01'))
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_FOLDER', str(tmp_path))
    with pytest.raises(UserError, match='apt-get install --reinstall dataset-fashion-mnist'):
        datasets.build_dataset('fashion_mnist', 'train', None)


def test_defaults_read_the_package_at_28_pixels_and_leave_other_data_sets_alone():
    import main_supcon

    opt = main_supcon.parse_option(['--dataset', 'fashion_mnist'])
    assert (opt.data_folder, opt.size) == (DEBIAN, 28)
    assert opt.save_folder.startswith('./save/SupCon/fashion_mnist_models/SupCon_fashion_mnist_')
    opt = main_supcon.parse_option(['--dataset', 'digits'])
    assert (opt.data_folder, opt.size) == ('./datasets/', 32)


def test_gpu_aug_batches_stack_at_28_pixels_and_augment_to_the_size(tmp_path):
    from supcon.data.gpu_augment import DeviceAugment, to_uint8_tensor

    arrays = write_set(tmp_path, n_train=8)
    canvas = datasets.fixed_size('fashion_mnist', 8)
    train = datasets.build_dataset(
        'fashion_mnist', 'train', to_uint8_tensor(canvas), data_folder=tmp_path
    )
    images, labels = next(iter(torch.utils.data.DataLoader(train, batch_size=8)))
    assert canvas is None and images.dtype == torch.uint8 and images.shape == (8, 3, 28, 28)
    np.testing.assert_array_equal(images[:, 1].numpy(), arrays['train'][0])
    assert labels.tolist() == arrays['train'][1].tolist()
    views = DeviceAugment(8, *MEAN_STD['fashion_mnist'], kind='supcon')(images, seed=0)
    assert views.shape == (16, 3, 8, 8) and torch.isfinite(views).all()


# ------------------------------------------------------------ damaged files: one line, exit 2

TINY = ['--size', '8', '--model', 'resnet18', '--batch_size', '4', '--epochs', '1']
TINY += ['--num_workers', '0', '--device', 'cpu', '--seed', '0']


def _rewrite(name, transform):
    """A case: write a good set, then replace file ``name`` by ``transform(its IDX bytes)``."""

    def make(folder):
        write_set(folder)
        path = folder / f'{name}.gz'
        path.write_bytes(gzip.compress(transform(gzip.decompress(path.read_bytes()))))
        return path

    return make


def _replace_gz(name, content):
    def make(folder):
        write_set(folder)
        path = folder / f'{name}.gz'
        path.write_bytes(content(path.read_bytes()))
        return path

    return make


def _plain_cut(folder):
    write_set(folder, compress=False)
    path = folder / NAMES['train'][0]
    path.write_bytes(path.read_bytes()[:-100])
    return path


def _missing(folder):
    write_set(folder)
    path = folder / f'{NAMES["train"][1]}.gz'
    path.unlink()
    return folder / NAMES['train'][1]


def _empty(folder):
    folder.mkdir(parents=True)
    return folder


def _labels(values):
    return lambda content: content[:8] + bytes(values)


IMAGES, LABELS = NAMES['train']
# name -> (script, make(folder) -> the path the line must name, words the line must contain)
DAMAGED = {
    'images_magic': (
        'main_supcon',
        _rewrite(IMAGES, lambda c: struct.pack('>i', 2049) + c[4:]),
        ['magic number 2049, not 2051', 'replace it with the original file'],
    ),
    'labels_magic': (
        'main_supcon',
        _rewrite(LABELS, lambda c: struct.pack('>i', 2051) + c[4:]),
        ['magic number 2051, not 2049'],
    ),
    'count_mismatch': (
        'main_supcon',
        _rewrite(LABELS, lambda c: struct.pack('>iI', 2049, 39) + c[8:-1]),
        ['holds 39 labels', '40 images', 'do not belong together', 'replace both'],
    ),
    'label_outside': (
        'main_supcon',
        _rewrite(LABELS, _labels([3] * 38 + [10, 255])),
        ['labels outside 0-9 (2 of 40; the first: 10 at item 38)'],
    ),
    'truncated_plain': ('main_supcon', _plain_cut, ['truncated', '31360 bytes', 'holds 31260']),
    'truncated_gz': (
        'main_supcon',
        _replace_gz(IMAGES, lambda gz: gz[: len(gz) // 2]),
        ['truncated'],
    ),
    'shorter_than_header': (
        'main_supcon',
        _rewrite(IMAGES, lambda c: c[:6]),
        ['truncated', 'shorter than the 16-byte IDX header'],
    ),
    'trailing_bytes': (
        'main_supcon',
        _rewrite(IMAGES, lambda c: c + b'\0' * 5),
        ['damaged', 'it holds 31365'],
    ),
    'not_gzip': ('main_supcon', _replace_gz(IMAGES, lambda gz: b'x' * 64), ['not a valid gzip']),
    'wrong_image_size': (
        'main_supcon',
        _rewrite(IMAGES, lambda c: struct.pack('>iIII', 2051, 40, 27, 27) + c[16 : 16 + 40 * 729]),
        ['27x27 images where Fashion-MNIST\'s are 28x28'],
    ),
    'missing_file': ('main_supcon', _missing, ['[.gz] is missing', 'add the original file']),
    'empty_folder': ('main_supcon', _empty, ['holds no Fashion-MNIST IDX file', '--data_folder']),
    'no_folder': (
        'main_supcon',
        lambda folder: folder,
        ['no_folder is not a folder; put train-images-idx3-ubyte[.gz]'],
    ),
    'test_labels_outside': (
        'main_ce',
        _rewrite(NAMES['test'][1], _labels([11] + [0] * 19)),
        ['labels outside 0-9 (1 of 20; the first: 11 at item 0)'],
    ),
}


@pytest.fixture(scope='module')
def damaged_results(tmp_path_factory):
    root = tmp_path_factory.mktemp('fashion_damaged')
    cases, named = {}, {}
    for name, (script, make, _) in DAMAGED.items():
        named[name] = make(root / 'data' / name)
        cwd = root / 'runs' / name
        cwd.mkdir(parents=True)
        args = ['--dataset', 'fashion_mnist', '--data_folder', root / 'data' / name] + TINY
        cases[name] = (script, args, cwd)
    logs = root / 'logs'
    logs.mkdir()
    return root, named, run_scripts_forked(cases, logs)


@pytest.mark.slow
@pytest.mark.parametrize('case', sorted(DAMAGED))
def test_damaged_files_give_one_error_line_naming_the_file(damaged_results, case):
    root, named, results = damaged_results
    result = results[case]
    assert result.returncode == 2, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), describe(result)
    assert str(named[case]) in lines[0], lines[0]
    for words in DAMAGED[case][2]:
        assert words in lines[0], lines[0]
    assert 'Traceback' not in result.stdout + result.stderr
    assert saved_files(root / 'runs' / case) == []


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_supcon_then_linear_tsne_and_retrieval_on_a_written_set(tmp_path):
    """The test images are copies of the first training images, so each query's nearest
    gallery image is its own copy; the linear stage's per-class report counts the written
    labels; main_tsne takes the data set, folder and size from the checkpoint."""
    folder = tmp_path / 'fmnist'
    arrays = write_set(
        folder / 'FashionMNIST' / 'raw',
        n_train=40,
        n_test=20,
        compress=False,
        test_copies_train=True,
    )
    data_args = ['--dataset', 'fashion_mnist', '--data_folder', folder]
    common = ['--batch_size', '16', '--epochs', '1', '--num_workers', '0', '--seed', '0']
    pretrain = call(
        'main_supcon', data_args + common + ['--size', '8', '--model', 'resnet18'], tmp_path
    )
    assert pretrain.code == 0, pretrain.out + pretrain.err
    run = 'SupCon_fashion_mnist_resnet18_lr_0.05_decay_0.0001_bsz_16_temp_0.07_trial_0'
    ckpt = tmp_path / 'save' / 'SupCon' / 'fashion_mnist_models' / run / 'last.pth'
    saved = load_checkpoint(str(ckpt))['opt']
    assert (saved['dataset'], saved['data_folder'], saved['size']) == (
        'fashion_mnist',
        str(folder),
        8,
    )

    linear = call('main_linear', data_args + common + ['--ckpt', ckpt, '--size', '8'], tmp_path)
    assert linear.code == 0, linear.out + linear.err
    reports = list((tmp_path / 'save').rglob('per_class_accuracy.json'))
    assert len(reports) == 1
    classes = json.loads(reports[0].read_text())['classes']
    assert [c['class'] for c in classes] == AUTHORS_CLASSES
    assert [c['train_count'] for c in classes] == np.bincount(arrays['train'][1]).tolist()
    assert [c['test_count'] for c in classes] == np.bincount(arrays['test'][1]).tolist()

    tsne = call('main_tsne', ['--ckpt', ckpt, '--num_workers', '0'], tmp_path)
    assert tsne.code == 0, tsne.out + tsne.err
    taken = f'--dataset fashion_mnist --size 8 --data_folder {folder}'
    assert f'from the checkpoint: {taken}' in tsne.out, tsne.out
    assert (ckpt.parent / 'last_tsne_encoder.png').stat().st_size > 0

    out = tmp_path / 'retrieval.json'
    retrieval = call(
        'main_retrieval',
        data_args + ['--ckpt', ckpt, '--size', '8', '--num_workers', '0', '--out', out],
        tmp_path,
    )
    assert retrieval.code == 0, retrieval.out + retrieval.err
    result = json.loads(out.read_text())
    assert (result['num_queries'], result['num_gallery']) == (20, 40)
    assert result['precision_at_1'] == 1.0
