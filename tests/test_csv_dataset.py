"""--dataset csv: reading the CSV (paths, labels, multi-hot rows, unlabelled rows), agreeing with
--dataset path on the same images, and every refusal in one line."""

import csv

import numpy as np
import pytest
import torch
from helpers import write_image_folder
from inprocess import assert_one_line_error, call, save_folder
from PIL import Image
from test_resume import max_abs_diff

from supcon.data import datasets
from supcon.data.csv_dataset import build_csv_dataset
from supcon.system import checkpoint

NORM = ['--mean', '(0.5,0.5,0.5)', '--std', '(0.25,0.25,0.25)']
FAST = [
    '--size',
    '8',
    '--num_workers',
    '0',
    '--device',
    'cpu',
    '--seed',
    '0',
    '--print_freq',
    '100',
]


def write_csv(path, rows, header=('path', 'labels')):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def write_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_a_multi_label_csv_reads_its_paths_labels_and_images(tmp_path):
    pixels = [write_png(tmp_path / 'img' / f'{i}.png', i) for i in range(3)]
    outside = write_png(tmp_path.parent / f'{tmp_path.name}_abs.png', 9)
    train = write_csv(
        tmp_path / 'lists' / 'train.csv',
        [
            ['../img/0.png', ' dog ; cat;dog'],  # spaces and a repeated label
            ['../img/1.png', ''],  # unlabelled
            ['../img/2.png', 'emu'],
            [str(tmp_path.parent / f'{tmp_path.name}_abs.png'), 'cat'],  # an absolute path
        ],
    )
    dataset = build_csv_dataset('train', None, train, None)
    assert dataset.classes == ['cat', 'dog', 'emu'] and dataset.multilabel
    expected = [[1, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]]
    assert np.array_equal(np.asarray(dataset.targets), expected)
    for i, image_pixels in enumerate(pixels + [outside]):
        image, target = dataset[i]
        assert np.array_equal(np.asarray(image), image_pixels)
        assert target.dtype == torch.float32 and target.tolist() == expected[i]
    # --val_split stratifies a multi-label row by its rarest label (cat: 2 rows, dog: 1, emu: 1)
    assert dataset.stratify_targets == [1, -1, 2, 0]


def test_a_single_label_csv_has_the_classes_and_targets_of_the_image_folder(tmp_path):
    folder = write_image_folder(tmp_path / 'train', {'b': 3, 'a': 2, 'c': 1}, size=8)
    unlabelled = write_png(tmp_path / 'extra.png', 5)
    rows = [
        [f'train/{c}/{i:03d}.png', c] for c in 'abc' for i in range({'a': 2, 'b': 3, 'c': 1}[c])
    ]
    train = write_csv(tmp_path / 'train.csv', rows + [['extra.png', '']])
    from_csv = build_csv_dataset('train', None, train, None)
    from_folder = datasets.build_dataset('path', 'train', None, data_folder=folder)
    assert not from_csv.multilabel and from_csv.classes == from_folder.classes == ['a', 'b', 'c']
    assert from_csv.targets == from_folder.targets + [-1]
    assert [p for p, _ in from_csv.samples[:-1]] == [str(p) for p, _ in from_folder.samples]
    assert np.array_equal(np.asarray(from_csv[6][0]), unlabelled)


@pytest.fixture(scope='module')
def same_images(tmp_path_factory):
    """Two class folders and the CSVs that list the same images in ImageFolder's order."""
    root = tmp_path_factory.mktemp('same')
    for split, count in (('train', 6), ('test', 2)):
        write_image_folder(root / split, {'a': count, 'b': count}, size=8, seed=len(split))
        rows = [[f'{split}/{c}/{i:03d}.png', c] for c in 'ab' for i in range(count)]
        write_csv(root / f'{split}.csv', rows)
    return root


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_supcon', 'main_ce'])
def test_a_single_label_csv_trains_exactly_as_the_image_folder(same_images, tmp_path, script):
    common = NORM + FAST + ['--model', 'resnet18', '--batch_size', '4', '--epochs', '1']
    folder_args = ['--dataset', 'path', '--data_folder', same_images / 'train']
    folder_args += ['--test_folder', same_images / 'test']
    csv_args = ['--dataset', 'csv', '--data_csv', same_images / 'train.csv']
    csv_args += ['--test_csv', same_images / 'test.csv']
    last = []
    for args in (folder_args + common, csv_args + common):
        result = call(script, args, tmp_path)
        assert result.code == 0, result.err
        last.append(save_folder(script, args, tmp_path) / 'last.pth')
    assert last[0] != last[1] and max_abs_diff(*last) == 0


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope='module')
def lists(tmp_path_factory):
    """Images and the CSVs of every refusal."""
    root = tmp_path_factory.mktemp('lists')
    for i in range(4):
        write_png(root / 'img' / f'{i}.png', i)
    (root / 'img' / 'broken.png').write_bytes(b'not a png at all')
    write_csv(root / 'train.csv', [['img/0.png', 'a'], ['img/1.png', 'b'], ['img/2.png', 'a']])
    write_csv(root / 'multi.csv', [['img/0.png', 'a;b'], ['img/1.png', 'b'], ['img/2.png', 'a']])
    write_csv(root / 'test.csv', [['img/3.png', 'b'], ['img/0.png', 'a']])
    write_csv(root / 'bad_column.csv', [['img/0.png', 'a']], header=('path', 'label'))
    write_csv(root / 'missing.csv', [['img/0.png', 'a'], ['img/9.png', 'b'], ['img/8.png', 'a']])
    write_csv(root / 'unknown.csv', [['img/3.png', 'b'], ['img/0.png', 'zebra']])
    write_csv(root / 'test_unlabelled.csv', [['img/3.png', 'b'], ['img/0.png', '']])
    write_csv(root / 'test_two.csv', [['img/3.png', 'a;b']])
    write_csv(root / 'header_only.csv', [])
    write_csv(root / 'broken.csv', [['img/broken.png', 'a'], ['img/1.png', 'b']])
    (root / 'empty.csv').write_text('')
    return root


CE = NORM + FAST + ['--model', 'resnet18', '--batch_size', '2', '--epochs', '1']


@pytest.mark.parametrize(
    'train, test, extra, fragments',
    [
        ('bad_column.csv', 'test.csv', [], ["has no 'labels' column (its header: path,label)"]),
        ('missing.csv', 'test.csv', [], ['2 of the 3 listed images do not exist', 'line 3']),
        ('train.csv', 'unknown.csv', [], ["line 3: label 'zebra' is not one of the training"]),
        ('empty.csv', 'test.csv', [], ['empty.csv is empty; it needs a header line']),
        ('header_only.csv', 'test.csv', [], ['has a header but no rows']),
        ('nothing.csv', 'test.csv', [], ['nothing.csv does not exist']),
        ('train.csv', 'test_unlabelled.csv', [], ['line 3 has no labels']),
        ('train.csv', 'test_two.csv', [], ['line 2 has 2 labels but every row of --data_csv']),
        ('train.csv', None, [], ['--dataset csv needs --test_csv']),
        ('broken.csv', 'test.csv', [], ['cannot read image', 'broken.png']),
        ('train.csv', 'test.csv', ['--data_folder', '.'], ['drop --data_folder/--test_folder']),
    ],
)
def test_main_ce_refuses_a_bad_csv_in_one_line(lists, tmp_path, train, test, extra, fragments):
    args = ['--dataset', 'csv', '--data_csv', lists / train] + CE + extra
    if test:
        args += ['--test_csv', lists / test]
    assert_one_line_error(call('main_ce', args, tmp_path), *fragments)
    assert not list(tmp_path.rglob('*.pth'))


def test_the_csv_flags_need_dataset_csv_and_its_mean_std(lists, tmp_path):
    args = ['--dataset', 'digits', '--data_csv', lists / 'train.csv'] + CE
    assert_one_line_error(call('main_ce', args, tmp_path), 'read by --dataset csv only')
    args = ['--dataset', 'csv', '--data_csv', lists / 'train.csv'] + FAST + ['--model', 'resnet18']
    assert_one_line_error(call('main_supcon', args, tmp_path), '--dataset csv needs --mean')


@pytest.mark.parametrize(
    'extra, fragment',
    [
        (['--moco'], '--moco\'s label queue holds one label per key'),
        (['--method', 'SupCon_hybrid'], '--method SupCon_hybrid'),
        (['--knn_every', '1', '--test_csv', 'test.csv'], '--knn_every'),
        (['--labelled_fraction', '0.5'], '--labelled_fraction chooses images class by class'),
        (['--online_probe', '--test_csv', 'test.csv'], '--online_probe trains a softmax'),
        (['--ce_weight', '1', '--test_csv', 'test.csv'], '--ce_weight trains a softmax'),
        (['--imbalance_ratio', '2'], '--imbalance_ratio cuts each class to a long tail'),
    ],
)
def test_main_supcon_refuses_what_multi_hot_labels_cannot_do(lists, extra, fragment):
    args = ['--dataset', 'csv', '--data_csv', 'multi.csv'] + NORM + FAST
    args += ['--model', 'resnet18', '--batch_size', '2', '--epochs', '1'] + extra
    assert_one_line_error(call('main_supcon', args, lists), fragment)


def test_knn_every_needs_every_training_row_labelled(lists):
    write_csv(lists / 'partly.csv', [['img/0.png', 'a'], ['img/1.png', ''], ['img/2.png', 'b']])
    args = ['--dataset', 'csv', '--data_csv', 'partly.csv', '--test_csv', 'test.csv'] + NORM
    args += FAST + ['--model', 'resnet18', '--batch_size', '2', '--epochs', '1', '--knn_every', '1']
    assert_one_line_error(call('main_supcon', args, lists), 'some rows of partly.csv have none')


def test_the_probe_and_the_joint_classifier_learn_from_the_labelled_rows_only(lists):
    """An unlabelled row (-1) in a single-label CSV: both heads train (once a traceback: a
    target of -1) on the labelled rows, are evaluated and checkpointed."""
    rows = [['img/0.png', 'a'], ['img/1.png', ''], ['img/2.png', 'b'], ['img/3.png', '']]
    write_csv(lists / 'partly_heads.csv', rows)
    args = ['--dataset', 'csv', '--data_csv', 'partly_heads.csv', '--test_csv', 'test.csv']
    args += NORM + FAST + ['--model', 'resnet18', '--batch_size', '4', '--epochs', '1']
    args += ['--online_probe', '--probe_lr', '1', '--ce_weight', '0.5', '--trial', 'heads']
    result = call('main_supcon', args, lists)
    assert result.code == 0, result.err
    assert 'probe accuracy: ' in result.out and 'ce accuracy: ' in result.out
    state = checkpoint.load_checkpoint(str(save_folder('main_supcon', args, lists) / 'last.pth'))
    for weight in (state['probe']['classifier']['weight'], state['ce_classifier']['weight']):
        assert torch.isfinite(weight).all() and weight.abs().sum() > 0  # both started at zero


def test_multilabel_any_needs_multi_label_data(lists):
    args = ['--dataset', 'csv', '--data_csv', 'train.csv'] + NORM + FAST
    args += ['--model', 'resnet18', '--batch_size', '2', '--epochs', '1', '--multilabel', 'any']
    assert_one_line_error(call('main_supcon', args, lists), 'every training image has at most one')
