"""Data splits (--val_split edges), test folders, every optimizer in every script, the notes, and
torchrun errors printed once.

Every case is the command a user typed, run in this process (``inprocess.call``) on tiny
image folders at 8x8 (or digits where only the data set's size matters); the torchrun cases
are real ``torchrun`` subprocesses.
"""

import glob
import math
import os
import re

import numpy as np
import pytest
from helpers import save_our_checkpoint, write_image_folder
from inprocess import assert_one_line_error, call, save_folder
from sklearn.model_selection import train_test_split
from test_distributed import torchrun  # 2 gloo processes, as the README starts them

import main_supcon
from supcon.data import datasets
from supcon.objectives import moco
from supcon.system.checkpoint import load_checkpoint

SCRIPTS = ('main_supcon', 'main_ce', 'main_linear')
DIGITS_TRAIN = 1437  # scikit-learn's 1797 digits less the 20 % test split
DIGITS = [
    '--dataset',
    'digits',
    '--size',
    '8',
    '--batch_size',
    '64',
    '--epochs',
    '1',
    '--num_workers',
    '0',
    '--model',
    'resnet18',
    '--device',
    'cpu',
    '--seed',
    '0',
]


def common_args(*extra, batch=4):
    """One epoch at 8x8 of resnet18 on the CPU, seeded, quiet."""
    args = ['--size', '8', '--batch_size', str(batch), '--epochs', '1', '--num_workers', '0']
    args += ['--model', 'resnet18', '--device', 'cpu', '--seed', '0', '--print_freq', '1000']
    return args + [str(e) for e in extra]


def path_args(train, test=None, *extra, batch=4):
    """--dataset path (``test``: its --test_folder) with ``common_args``."""
    args = ['--dataset', 'path', '--data_folder', str(train)]
    args += ['--mean', '(0.5, 0.5, 0.5)', '--std', '(0.25, 0.25, 0.25)']
    args += ['--test_folder', str(test)] if test is not None else []
    return args + common_args(*extra, batch=batch)


def script_args(script, args, ckpt):
    """``args`` plus what the script needs beyond them (main_linear: --ckpt, val workers)."""
    if script == 'main_linear':
        return args + ['--ckpt', str(ckpt), '--num_workers_val', '0']
    if script == 'main_ce':
        return args + ['--num_workers_val', '0']
    return args


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('folders')
    write_image_folder(root / 'train', {'a': 8, 'b': 8}, size=8, seed=0)
    write_image_folder(root / 'test', {'a': 3, 'b': 3}, size=8, seed=1)
    return root


@pytest.fixture(scope='module')
def encoder_ckpt(tmp_path_factory):
    """A resnet18 SupCon checkpoint (random weights): main_linear's --ckpt."""
    path = tmp_path_factory.mktemp('ckpt') / 'last.pth'
    save_our_checkpoint(path)
    return path


def run_ok(script, args, cwd):
    result = call(script, args, cwd)
    assert result.code == 0, result.out[-3000:] + result.err
    assert 'Traceback' not in result.err, result.err
    return result


def checkpoints(cwd):
    return glob.glob(os.path.join(str(cwd), 'save', '**', '*.pth'), recursive=True)


# ------------------------------------------------------------- 1. every script x optimizer


@pytest.mark.parametrize('optimizer', ['sgd', 'lars'])
@pytest.mark.parametrize('script', SCRIPTS)
def test_every_script_trains_with_every_optimizer(script, optimizer, folders, tmp_path):
    """main_linear --optimizer lars used to end in a bare AssertionError (two groups)."""
    args = path_args(folders / 'train', folders / 'test', '--optimizer', optimizer)
    ckpt = None
    if script == 'main_linear':  # a checkpoint of this very run's kind of encoder
        ckpt = tmp_path / 'encoder.pth'
        save_our_checkpoint(ckpt)
    args = script_args(script, args, ckpt)
    run_ok(script, args, tmp_path)
    saved = load_checkpoint(str(save_folder(script, args, tmp_path) / 'last.pth'))
    groups, state = saved['optimizer']['param_groups'], saved['optimizer']['state']
    shapes = [[tuple(state[i]['momentum_buffer'].shape) for i in g['params']] for g in groups]
    if script == 'main_linear':  # the classifier alone: fc.weight [2, 512] and fc.bias [2]
        assert sorted(saved['model']) == ['fc.bias', 'fc.weight']
    if optimizer == 'sgd':
        assert len(groups) == 1
        return
    # LARS: the weights (ndim > 1) adapted by the trust ratio and decayed, the rest plain
    adapted, plain = groups
    assert adapted['always_adapt'] and not plain['always_adapt']
    assert plain['weight_decay'] == 0.0
    assert adapted['weight_decay'] == (0 if script == 'main_linear' else 1e-4)
    assert all(len(s) > 1 for s in shapes[0]) and all(len(s) <= 1 for s in shapes[1])
    if script == 'main_linear':
        assert shapes == [[(2, 512)], [(2,)]]


# ------------------------------------------------------------- 6. and 16. --val_split


def independent_split_ok(targets, fraction):
    """scikit-learn's own split of ``fraction`` runs and leaves every class a training image."""
    targets = np.asarray(targets)
    try:
        train, _ = train_test_split(
            np.arange(len(targets)), test_size=fraction, stratify=targets, random_state=0
        )
    except ValueError:  # what used to reach the user as a traceback
        return False
    return set(targets[train]) == set(targets)


@pytest.fixture(scope='module')
def split_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('splits')
    write_image_folder(root / 'ten', {'a': 10, 'b': 10, 'c': 10}, size=8)
    write_image_folder(root / 'single', {'a': 8, 'b': 8, 'c': 1}, size=8)
    write_image_folder(root / 'unbalanced', {'a': 2, 'b': 20, 'c': 20}, size=8)
    return root


# case: (data, --val_split, fragments of the error, the fraction it names as working)
VAL_SPLIT_CASES = {
    'digits_0.0001': (
        'digits',
        0.0001,
        [f'holds out 1 of the {DIGITS_TRAIN} training images, fewer than the 10 classes'],
        ('0.007', 'more'),
    ),
    '3x10_at_0.05': (
        'ten',
        0.05,
        ['holds out 2 of the 30 training images, fewer than the 3 classes'],
        ('0.1', 'more'),
    ),
    'one_image_class_at_0.2': (
        'single',
        0.2,
        ['cannot split class c (1 image)', 'add images to it or use --val_split 0'],
        None,
    ),
    'unbalanced_at_0.9': (
        'unbalanced',
        0.9,
        ['holds out every training image of class a (2 images)', 'nothing of it to train on'],
        ('0.5', 'less'),
    ),
}


@pytest.mark.parametrize('case', sorted(VAL_SPLIT_CASES))
@pytest.mark.parametrize('script', SCRIPTS)
def test_val_split_edge_values_are_one_line(script, case, split_folders, encoder_ckpt, tmp_path):
    where, fraction, fragments, works = VAL_SPLIT_CASES[case]
    if where == 'digits':
        args = DIGITS + ['--val_split', str(fraction)]
        targets = datasets.build_dataset('digits', 'train', None).targets
    else:
        args = path_args(split_folders / where, None, '--val_split', fraction)
        targets = datasets.build_dataset('path', 'train', None, split_folders / where).targets
    assert not independent_split_ok(targets, fraction)  # scikit-learn fails, or empties a class
    result = call(script, script_args(script, args, encoder_ckpt), tmp_path)
    assert_one_line_error(result, f'--val_split {fraction}', *fragments)
    assert 'Traceback' not in result.err and not checkpoints(tmp_path)
    if works is not None:
        value, side = works
        assert f'use --val_split {value} or {side}' in result.err
        assert independent_split_ok(targets, float(value))


@pytest.mark.parametrize('script', SCRIPTS)
def test_batch_larger_than_what_val_split_left_says_so(script, encoder_ckpt, tmp_path):
    result = call(
        script, script_args(script, DIGITS + ['--val_split', '0.99'], encoder_ckpt), tmp_path
    )
    held_out = math.ceil(0.99 * DIGITS_TRAIN)  # scikit-learn's count
    assert_one_line_error(
        result,
        f'--batch_size 64 is larger than the data set ({DIGITS_TRAIN - held_out} images left by'
        f' --val_split 0.99, which holds out {held_out} of the {DIGITS_TRAIN} training images)',
    )


# ------------------------------------------------------------- 9. broken test images


@pytest.fixture
def broken_test(tmp_path):
    root = tmp_path / 'data'
    write_image_folder(root / 'train', {'a': 8, 'b': 8}, size=8)
    write_image_folder(root / 'test', {'a': 3, 'b': 3}, size=8, seed=1)
    (root / 'test' / 'b' / '002.png').write_bytes(b'not a png')
    (tmp_path / 'run').mkdir()
    return root


@pytest.mark.parametrize('script', SCRIPTS)
def test_a_broken_test_image_is_found_before_training(script, broken_test, encoder_ckpt):
    args = path_args(broken_test / 'train', broken_test / 'test', '--epochs', '2')
    if script == 'main_supcon':
        args += ['--knn_every', '1']
    cwd = broken_test.parent / 'run'
    result = call(script, script_args(script, args, encoder_ckpt), cwd)
    assert_one_line_error(result, f'cannot read image {broken_test / "test" / "b" / "002.png"}')
    assert 'Train' not in result.out and 'epoch 1' not in result.out  # no epoch spent
    assert not checkpoints(cwd)


def test_a_broken_held_out_image_is_found_before_training(broken_test):
    """With --val_split the held-out training images are first read after epoch 1 too."""
    train = broken_test / 'train'
    held = datasets.build_dataset('path', 'test', None, train, val_split=0.25)
    path = held.dataset.samples[held.indices[0]][0]
    with open(path, 'wb') as f:
        f.write(b'truncated')
    args = path_args(train, None, '--val_split', '0.25', '--epochs', '2', '--num_workers_val', '0')
    result = call('main_ce', args, broken_test.parent / 'run')
    assert_one_line_error(result, f'cannot read image {path}')
    assert 'epoch 1' not in result.out


# ------------------------------------------------------------- 11. --test_folder


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_val_split_needs_no_test_folder_and_notes_an_unused_one(
    script, folders, encoder_ckpt, tmp_path
):
    extra = ['--val_split', '0.25'] + (['--knn_every', '1'] if script == 'main_supcon' else [])
    args = script_args(script, path_args(folders / 'train', None, *extra), encoder_ckpt)
    (tmp_path / 'without').mkdir()
    (tmp_path / 'given').mkdir()
    result = run_ok(script, args, tmp_path / 'without')
    assert 'note: --test_folder' not in result.out
    if script == 'main_supcon':
        assert 'knn_acc epoch 1:' in result.out and '4 held-out and 12 train' in result.out
    missing = tmp_path / 'no such folder'
    result = run_ok(script, args + ['--test_folder', missing], tmp_path / 'given')
    note = (
        f'note: --test_folder {missing} is not read: --val_split 0.25 evaluates on held-out'
        f' training images instead\n'
    )
    assert result.out.count(note) == 1, result.out


def test_pretraining_notes_a_test_folder_it_never_reads(folders, tmp_path):
    result = run_ok('main_supcon', path_args(folders / 'train', folders / 'test'), tmp_path)
    note = (
        f'note: --test_folder {folders / "test"} is not read: pretraining reads the test split'
        f' only for --knn_every, --online_probe, --ce_weight\n'
    )
    assert result.out.count(note) == 1


def test_a_data_set_with_its_own_test_split_notes_test_folder(capsys):
    main_supcon.parse_option(['--dataset', 'digits', '--knn_every', '1', '--test_folder', 'x'])
    out = capsys.readouterr().out
    assert out == 'note: --test_folder x is not read: --dataset digits has its own test split\n'


@pytest.fixture(scope='module')
def imagenet_without_val(tmp_path_factory):
    root = tmp_path_factory.mktemp('imagenet')
    write_image_folder(root / 'in' / 'train', {'n01': 6, 'n02': 6}, size=8)
    write_image_folder(root / 'elsewhere', {'n01': 2, 'n02': 1}, size=8, seed=3)
    return root


def imagenet_args(root, *extra):
    """--dataset imagenet on ``root/in`` (train/ only), with the CIFAR stem at 8x8."""
    args = ['--dataset', 'imagenet', '--data_folder', str(root / 'in'), '--stem', 'cifar']
    return args + common_args(*extra)


@pytest.mark.parametrize('script', ['main_ce', 'main_supcon'])
def test_imagenet_honours_test_folder(script, imagenet_without_val, tmp_path):
    root = imagenet_without_val
    held = datasets.build_dataset(
        'imagenet', 'test', None, root / 'in', test_folder=root / 'elsewhere'
    )
    assert [os.path.relpath(p, root) for p, _ in held.samples] == [
        os.path.join('elsewhere', 'n01', '000.png'),
        os.path.join('elsewhere', 'n01', '001.png'),
        os.path.join('elsewhere', 'n02', '000.png'),
    ]
    extra = ['--test_folder', root / 'elsewhere']
    if script == 'main_supcon':
        extra += ['--knn_every', '1']
    result = run_ok(script, script_args(script, imagenet_args(root, *extra), None), tmp_path)
    assert 'note: --test_folder' not in result.out
    if script == 'main_ce':  # accuracy over the 3 images of --test_folder
        acc = float(re.findall(r'best accuracy: ([\d.]+)', result.out)[0])
        assert any(math.isclose(acc, 100 * k / 3, abs_tol=0.01) for k in range(4))
    else:
        assert '(kNN over 3 test and 12 train images' in result.out


def test_imagenet_without_val_names_test_folder(imagenet_without_val, tmp_path):
    root = imagenet_without_val
    result = call('main_ce', imagenet_args(root, '--num_workers_val', '0'), tmp_path)
    assert_one_line_error(
        result,
        f'--dataset imagenet reads the test images from --data_folder/val, and'
        f' {root / "in" / "val"} is not a folder',
        'give your test image folder as --test_folder',
    )


# ------------------------------------------------------------- 15. and 17. notes


def test_a_moco_queue_longer_than_the_data_and_a_frozen_key_encoder_are_noted(folders, tmp_path):
    args = path_args(folders / 'train', None, '--moco', '--moco_m', '1', '--knn_every', '3')
    args += ['--val_split', '0.25']  # 12 training images
    result = run_ok('main_supcon', args, tmp_path)
    notes = [line for line in result.out.splitlines() if line.startswith('note:')]
    assert notes == [
        'note: --knn_every 3 is more than --epochs 1, so the kNN accuracy is never measured;'
        ' use --knn_every 1 or less',
        'note: --moco_m 1 never updates the key encoder: its keys come from its random initial'
        ' weights all run long (MoCo uses 0.99 to 0.999)',
        'note: --moco_k 4096 is longer than the 12 training images: the queue holds stale keys'
        ' of the same images from earlier epochs; docs/small-batches.md keeps it well below'
        ' the data set (e.g. --moco_k 8 or less)',
    ]
    assert 'knn_acc' not in result.out


@pytest.mark.parametrize('moco_k, noted', [(None, True), ('100000', True), ('1024', False)])
def test_moco_k_against_digits(moco_k, noted, capsys):
    opt = main_supcon.parse_option(
        ['--dataset', 'digits', '--moco'] + (['--moco_k', moco_k] if moco_k else [])
    )
    moco.check_data(opt, datasets.build_dataset('digits', 'train', None))
    out = capsys.readouterr().out
    k = moco_k or '4096'
    want = f'note: --moco_k {k} is longer than the {DIGITS_TRAIN} training images'
    assert (want in out) == noted and out.count('\n') == int(noted)
    if noted:  # the README's advice for digits
        assert '(e.g. --moco_k 1024 or less)' in out


# ------------------------------------------------------------- 18. errors under torchrun


@pytest.mark.slow
def test_torchrun_prints_an_error_once(folders, broken_test, tmp_path):
    """Every rank meets the bad option; rank 0 alone says so. The same for a broken test
    image, which each rank looks for in its own share of the test folder."""
    bad_batch = torchrun(
        'main_ce.py', path_args(folders / 'train', folders / 'test', batch=33), tmp_path
    )
    assert bad_batch.returncode != 0
    errors = [line for line in bad_batch.stderr.splitlines() if line.startswith('error: ')]
    assert errors == [
        'error: --batch_size 33 does not divide by the 2 processes; --batch_size is the global'
        ' batch, pick a multiple of 2'
    ], bad_batch.stderr[-3000:]
    # torchrun's own summary names the exit code of the first failed rank: ours
    assert 'exitcode  : 2' in bad_batch.stderr
    assert 'epoch 1' not in bad_batch.stdout and not checkpoints(tmp_path)  # refused at parse time

    broken = torchrun(
        'main_ce.py', path_args(broken_test / 'train', broken_test / 'test'), tmp_path
    )
    errors = [line for line in broken.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, broken.stderr[-3000:]
    assert errors[0].startswith(
        f'error: cannot read image {broken_test / "test" / "b" / "002.png"}'
    )
    assert 'epoch 1' not in broken.stdout and not checkpoints(tmp_path)
