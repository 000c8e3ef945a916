"""Faults met during a run, end to end: a last batch of one image, a full disk, a save
folder that cannot be written, torchrun variables left in the environment.

Each script runs in this process (``inprocess.call``) on a few 8x8 images with
resnet18: one or two steps, no subprocess start-up.
"""

import errno
import os

import numpy as np
import pytest
import torch
from inprocess import assert_one_line_error, call, save_folder
from PIL import Image

from supcon.system import checkpoint

DATA = [
    '--dataset',
    'path',
    '--mean',
    '(0.5,0.5,0.5)',
    '--std',
    '(0.25,0.25,0.25)',
    '--size',
    '8',
    '--model',
    'resnet18',
    '--epochs',
    '1',
    '--num_workers',
    '0',
    '--device',
    'cpu',
    '--seed',
    '0',
    '--print_freq',
    '1',
    '--learning_rate',
    '0.01',
]


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """5 training images (3 + 2) and 2 test images, 8x8 RGB."""
    root = tmp_path_factory.mktemp('fault_images')
    rng = np.random.default_rng(0)
    for split, counts in (('train', {'a': 3, 'b': 2}), ('test', {'a': 1, 'b': 1})):
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


def ce_args(images, *extra):
    return DATA + ['--data_folder', images / 'train', '--test_folder', images / 'test', *extra]


def test_a_last_batch_of_one_image_is_skipped_with_a_note(images, tmp_path):
    """5 images in batches of 4 leave one: BatchNorm in training mode cannot normalise it
    (the reference crashes with 'Expected more than 1 value per channel')."""
    args = ce_args(images, '--batch_size', '4')
    result = call('main_ce', args, tmp_path)
    assert result.code == 0, result.err
    notes = [line for line in result.out.splitlines() if line.startswith('note: ')]
    assert notes == [
        'note: epoch 1, step 2: a training batch of one image is skipped'
        ' (BatchNorm cannot normalise a single sample); a --batch_size that does'
        ' not leave one image over at the end of an epoch uses them all'
    ]
    assert 'Train: [1][1/2]' in result.out and 'Train: [1][2/2]' not in result.out
    ckpt = checkpoint.load_checkpoint(str(save_folder('main_ce', args, tmp_path) / 'last.pth'))
    assert ckpt['epoch'] == 1


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(
    images, tmp_path, monkeypatch
):
    args = ce_args(images, '--batch_size', '5', '--epochs', '2')
    folder = save_folder('main_ce', args, tmp_path)
    real_save, saves = torch.save, []

    def fills_the_disk(obj, f, *rest, **kwargs):
        saves.append(obj['epoch'])
        if len(saves) == 2:  # the end of epoch 2
            f.write(b'part of a checkpoint')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *rest, **kwargs)

    monkeypatch.setattr(checkpoint.torch, 'save', fills_the_disk)
    result = call('main_ce', args, tmp_path)
    monkeypatch.undo()
    assert_one_line_error(
        result,
        f'no space left on device while saving'
        f' {os.path.join(".", os.path.relpath(folder, tmp_path))}',
        'the previous checkpoint.pth is intact',
        '--resume auto',
    )
    assert sorted(os.listdir(folder)) == ['checkpoint.pth']  # no temporary file left
    assert checkpoint.load_checkpoint(str(folder / 'checkpoint.pth'))['epoch'] == 1


def test_a_save_folder_that_cannot_be_written_stops_before_training(images, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(checkpoint.tempfile, 'mkstemp', read_only)
    result = call('main_ce', ce_args(images, '--batch_size', '5'), tmp_path)
    monkeypatch.undo()
    assert_one_line_error(
        result,
        'cannot write checkpoints to ./save/SupCon/path_models/',
        'Read-only file system',
        'start the script from a folder you can write to',
    )
    assert 'Train:' not in result.out
    assert os.listdir(tmp_path) == []  # no save folder, no TensorBoard folder


def test_torchrun_variables_left_in_the_environment(images, tmp_path, monkeypatch):
    """WORLD_SIZE=1 is one process; a larger one without torchrun's address is refused."""
    for key in ('LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(WORLD_SIZE='1', RANK='0', LOCAL_RANK='0').items():
        monkeypatch.setenv(key, value)
    args = ce_args(images, '--batch_size', '5')
    result = call('main_ce', args, tmp_path)
    assert result.code == 0, result.err
    assert (save_folder('main_ce', args, tmp_path) / 'last.pth').exists()

    monkeypatch.setenv('WORLD_SIZE', '2')
    other = tmp_path / 'two'
    other.mkdir()
    result = call('main_ce', args, other)
    assert_one_line_error(
        result,
        'WORLD_SIZE=2 is set but MASTER_ADDR and MASTER_PORT are not',
        'torchrun --nproc_per_node 2',
        'unset WORLD_SIZE, RANK and LOCAL_RANK',
    )
    assert os.listdir(other) == []
