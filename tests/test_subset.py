"""--train_subset (supcon/data/subset.py): a fixed class-balanced part of the training images, the
same for every seed and script, taken from what --val_split leaves; main_linear.py takes its
checkpoint's; in the run name, fixed on resume, refused in one line where it cannot work."""

import numpy as np
import pytest
from inprocess import assert_one_line_error, call, save_folder

import main_linear
import main_supcon
from supcon.data import datasets
from supcon.data.subset import subset_indices
from supcon.system import runtime
from supcon.system.checkpoint import load_checkpoint

FAST = ['--dataset', 'digits', '--model', 'resnet18', '--size', '8', '--num_workers', '0']
FAST += ['--device', 'cpu', '--print_freq', '1000']


def test_a_subset_is_class_balanced_and_the_same_for_every_call():
    targets = np.repeat(np.arange(5), [40, 30, 20, 20, 10])
    kept = subset_indices(targets, 60)
    assert len(kept) == 60 and np.all(np.diff(kept) > 0)
    # stratified: each class keeps its share of the 60, within one image
    counts = np.bincount(targets[kept], minlength=5)
    assert np.all(np.abs(counts - 60 * np.bincount(targets) / len(targets)) <= 1), counts
    assert np.array_equal(kept, subset_indices(targets, 60))


def test_the_subset_comes_from_what_val_split_leaves_and_the_test_split_stays_whole():
    whole = datasets.build_dataset('digits', 'train', None, val_split=0.2)
    part = datasets.build_dataset('digits', 'train', None, val_split=0.2, train_subset=300)
    held = datasets.build_dataset('digits', 'test', None, val_split=0.2, train_subset=300)
    assert len(part) == 300 and len(held) == len(
        datasets.build_dataset('digits', 'test', None, val_split=0.2)
    )
    kept = {part.dataset.indices[i] for i in part.indices}  # indices of the whole training set
    assert kept <= set(whole.indices) and not kept & set(held.indices)
    assert sorted(np.bincount(part.targets)) == sorted(
        np.bincount(np.asarray(whole.targets)[subset_indices(whole.targets, 300)])
    )


@pytest.mark.slow
def test_the_run_name_and_main_linear_take_the_subset(tmp_path):
    args = FAST + ['--epochs', '1', '--batch_size', '32', '--train_subset', '200', '--seed', '0']
    opt = main_supcon.parse_option(args)
    assert opt.model_name.endswith('_sub200')
    loader, _, _ = main_supcon.set_loader(opt, runtime.setup_runtime(opt))
    assert len(loader.dataset) == 200 and len(loader) == 7  # 200 / 32 steps
    result = call('main_supcon', args, tmp_path)
    assert result.code == 0, result.err
    ckpt = save_folder('main_supcon', args, tmp_path) / 'last.pth'
    assert load_checkpoint(str(ckpt))['opt']['train_subset'] == 200
    linear = main_linear.parse_option(
        ['--ckpt', str(ckpt), '--dataset', 'digits', '--size', '8', '--epochs', '1']
    )
    assert linear.train_subset == 200 and linear.model_name.endswith('_sub200')
    other = main_linear.parse_option(
        ['--ckpt', str(ckpt), '--dataset', 'digits', '--size', '8', '--train_subset', '0']
    )
    assert other.train_subset == 0 and 'sub' not in other.model_name


@pytest.mark.slow
def test_a_resume_with_another_subset_is_refused(tmp_path):
    args = FAST + ['--epochs', '1', '--batch_size', '64', '--train_subset', '300', '--trial', 'r']
    assert call('main_supcon', args + ['--seed', '0'], tmp_path).code == 0
    ckpt = save_folder('main_supcon', args, tmp_path) / 'last.pth'
    other = FAST + ['--epochs', '2', '--batch_size', '64', '--train_subset', '400']
    result = call('main_supcon', other + ['--trial', 'r', '--resume', str(ckpt)], tmp_path)
    assert_one_line_error(result, '--train_subset 400 differs from the run\'s 300')


@pytest.mark.parametrize(
    'value, message',
    [
        ('-1', '--train_subset must be 0 (every image) or a number of images'),
        ('5', '--train_subset 5 is fewer than the 10 classes'),
        ('100000', '--train_subset 100000 is not fewer than the 1437 training images'),
    ],
)
def test_bad_subsets_are_one_line(value, message, tmp_path):
    args = FAST + ['--epochs', '1', '--batch_size', '4', '--train_subset', value]
    assert_one_line_error(call('main_supcon', args, tmp_path), message)
