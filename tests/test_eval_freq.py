"""--eval_freq N (main_ce.py, main_linear.py): the test split is scored every N epochs and after
the last (3 epochs, N = 2: epochs 2 and 3), and nothing of the training changes with N: the same
weights bit for bit, the best accuracy the best of the scored epochs, TensorBoard's test tags at
those epochs only."""

import re

import pytest
import torch
from helpers import folder_args, read_scalars
from inprocess import assert_one_line_error, call, save_folder
from test_resume import tb_folder

from supcon.system import checkpoint

EPOCHS = 3


@pytest.fixture(scope='module')
def encoder(images, tmp_path_factory):
    """A main_supcon.py checkpoint of one epoch on the tiny folder, for main_linear.py."""
    cwd = tmp_path_factory.mktemp('pretrain')
    args = folder_args(images, model='resnet18')
    result = call('main_supcon', args, cwd)
    assert result.code == 0, result.err
    return save_folder('main_supcon', args, cwd) / 'last.pth'


def script_args(script, images, encoder, **changes):
    extra = {'ckpt': encoder} if script == 'main_linear' else {'model': 'resnet18'}
    return folder_args(images, epochs=EPOCHS, learning_rate=0.05, **extra, **changes)


def run(script, args, cwd):
    cwd.mkdir(exist_ok=True)
    result = call(script, args, cwd)
    assert result.code == 0, result.out[-2000:] + result.err
    folder = save_folder(script, args, cwd)
    model = checkpoint.load_checkpoint(str(folder / 'last.pth'), flag='--ckpt')['model']
    scored = [float(a) for a in re.findall(r'^ \* Acc@1 ([\d.]+)$', result.out, flags=re.M)]
    best = float(re.findall(r'^best accuracy: ([\d.]+)$', result.out, flags=re.M)[0])
    final = float(re.findall(r'^final accuracy: ([\d.]+)$', result.out, flags=re.M)[0])
    return model, scored, best, final, read_scalars(tb_folder(script, args, cwd))


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_ce', 'main_linear'])
def test_scoring_every_second_epoch_trains_the_same_weights(script, images, encoder, tmp_path):
    every = script_args(script, images, encoder)
    model, scored, best, final, tags = run(script, every, tmp_path / 'every')
    second = script_args(script, images, encoder, eval_freq=2, save_freq=1)
    # the run name does not change: --eval_freq does not change the training
    assert save_folder(script, second, tmp_path) == save_folder(script, every, tmp_path)
    model2, scored2, best2, final2, tags2 = run(script, second, tmp_path / 'second')
    assert model.keys() == model2.keys()
    for key in model:
        assert torch.equal(model[key], model2[key]), key
    assert len(scored) == EPOCHS and scored2 == scored[1:]  # epochs 2 and 3 (the last)
    assert final2 == final == scored[-1]
    assert best == max(scored) and best2 == max(scored[1:])
    steps = {tag: [step for step, _ in points] for tag, points in tags2.items()}
    assert steps['train_loss'] == steps['learning_rate'] == [1, 2, 3]
    assert steps['val_acc'] == steps['val_loss'] == [2, 3]
    assert [v for _, v in tags2['val_acc']] == pytest.approx(scored[1:])
    assert [v for _, v in tags2['train_loss']] == [v for _, v in tags['train_loss']]
    # a checkpoint of an epoch not scored names the classes too (main_predict.py reads them)
    first = save_folder(script, second, tmp_path / 'second') / 'ckpt_epoch_1.pth'
    assert checkpoint.load_checkpoint(str(first), flag='--ckpt')['extra']['classes'] == ['a', 'b']


@pytest.mark.parametrize('value', ['0', '-2'])
def test_a_frequency_below_one_is_refused(images, tmp_path, value):
    result = call('main_ce', folder_args(images, eval_freq=value), tmp_path)
    assert_one_line_error(result, f'--eval_freq must be a positive integer, got {value}')
    assert not list(tmp_path.rglob('*.pth'))
