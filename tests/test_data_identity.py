"""A run resumes only on the data it trained on (supcon/identity.py): its checkpoints record
the training CSV's or image folder's fingerprint, and --resume on other data under the same run
name is refused in one line; the same data under another name resume; checkpoints without a
fingerprint resume as before. Once --resume auto continued a single-label run on a multi-label
CSV of other images."""

import shutil

import pytest
from helpers import folder_args, write_image_folder
from inprocess import assert_one_line_error, call, save_folder
from test_csv_dataset import write_csv, write_png

from supcon.data import identity
from supcon.system import checkpoint

NORM = ['--mean', '(0.5,0.5,0.5)', '--std', '(0.25,0.25,0.25)']
TRAIN = NORM + ['--size', '8', '--num_workers', '0', '--device', 'cpu', '--seed', '0']
TRAIN += ['--model', 'resnet18', '--batch_size', '4', '--print_freq', '100']


@pytest.fixture(scope='module')
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp('lists')
    for i in range(16):
        write_png(root / 'img' / f'{i}.png', i)
    write_csv(root / 'a.csv', [[f'img/{i}.png', 'xy'[i % 2]] for i in range(8)])
    write_csv(root / 'other.csv', [[f'img/{i}.png', 'x;y' if i % 3 else 'x'] for i in range(8, 16)])
    shutil.copy(root / 'a.csv', root / 'a_copy.csv')  # the same data under another name
    return root


def csv_run(lists, cwd, data_csv, epochs, *extra):
    args = ['--dataset', 'csv', '--data_csv', lists / data_csv, *TRAIN, '--epochs', epochs]
    return call('main_supcon', [*args, *extra], cwd), args


@pytest.mark.slow
def test_a_csv_run_resumes_on_its_data_only(lists, tmp_path):
    first, args = csv_run(lists, tmp_path, 'a.csv', 1)
    assert first.code == 0, first.err
    last = save_folder('main_supcon', args, tmp_path) / 'last.pth'
    recorded = checkpoint.load_checkpoint(str(last))['opt']
    assert recorded['data_fingerprint'].startswith('sha256:')
    assert recorded['data_csv'] == str(lists / 'a.csv')
    before = last.read_bytes()

    # the same run name, another CSV: refused before any training, nothing written
    other, _ = csv_run(lists, tmp_path, 'other.csv', 2, '--resume', 'auto')
    assert_one_line_error(
        other,
        f'the run was trained on other data (--data_csv {lists / "a.csv"}, fingerprint'
        f' {recorded["data_fingerprint"]}) than --data_csv {lists / "other.csv"} holds now',
        'resume on the run\'s data or start a new run (another --trial)',
    )
    assert last.read_bytes() == before and not list(last.parent.glob('ckpt_epoch_2.pth'))

    # the same bytes under another name: the same data, resumed
    same, args = csv_run(lists, tmp_path, 'a_copy.csv', 2, '--resume', 'auto')
    assert same.code == 0, same.err
    assert 'continuing at epoch 2' in same.out


def test_an_image_folder_run_resumes_on_its_file_list_only(tmp_path):
    root = tmp_path / 'data'
    write_image_folder(root / 'train', {'a': 4, 'b': 4}, size=8)
    write_image_folder(root / 'test', {'a': 2, 'b': 2}, size=8, seed=1)
    args = folder_args(root, model='resnet18')
    assert call('main_supcon', args, tmp_path).code == 0
    # one more image under the same folder name: other data
    write_image_folder(root / 'extra', {'b': 5}, size=8, seed=2)
    shutil.copy(root / 'extra' / 'b' / '004.png', root / 'train' / 'b' / '004.png')
    resumed = call(
        'main_supcon', folder_args(root, model='resnet18', epochs=2, resume='auto'), tmp_path
    )
    assert_one_line_error(resumed, f'(--data_folder {root / "train"}, fingerprint', 'holds now')
    (root / 'train' / 'b' / '004.png').unlink()
    resumed = call(
        'main_supcon', folder_args(root, model='resnet18', epochs=2, resume='auto'), tmp_path
    )
    assert resumed.code == 0 and 'continuing at epoch 2' in resumed.out


@pytest.mark.slow
def test_a_checkpoint_without_a_fingerprint_resumes_as_before(lists, tmp_path):
    first, args = csv_run(lists, tmp_path, 'a.csv', 1)
    assert first.code == 0, first.err
    last = save_folder('main_supcon', args, tmp_path) / 'last.pth'
    state = checkpoint.load_checkpoint(str(last))
    del state['opt']['data_fingerprint']  # as written before fingerprints existed
    checkpoint.save_checkpoint(state, str(last))
    resumed, _ = csv_run(lists, tmp_path, 'other.csv', 2, '--resume', 'auto')
    assert resumed.code == 0, resumed.err
    assert 'continuing at epoch 2' in resumed.out


def test_fixed_data_sets_and_unreadable_data_have_no_fingerprint(tmp_path):
    class Opt:
        dataset, data_folder, data_csv = 'digits', './datasets/', None

    assert identity.fingerprint(Opt) is None
    Opt.dataset, Opt.data_folder = 'path', str(tmp_path / 'missing')
    assert identity.fingerprint(Opt) is None  # the data set's build says what is wrong
