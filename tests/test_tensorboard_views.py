"""TensorBoard beyond the epoch scalars: the views grid, loss_step and the HPARAMS record.

Each training script's event files are read back with TensorBoard's own EventAccumulator (which
applies purge steps as the TensorBoard server does) and counted per tag.
"""

import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import folder_args, write_image_folder
from inprocess import call, save_folder
from test_resume import spawn, tb_folder

from supcon.training import tb_logger

EPOCHS, STEPS = 3, 4  # 16 training images, --batch_size 4
PRINT_FREQ = 3


def accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={'images': 0, 'scalars': 0})
    acc.Reload()
    return acc


def session_starts(folder):
    """(hparams of every session_start_info written in ``folder``'s event files, the metric
    tags of its experiment record), read from the raw events."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata

    sessions, metrics = [], None
    for path in sorted(Path(folder).glob('events.out.tfevents.*')):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                content = value.metadata.plugin_data.content
                if value.tag == metadata.SESSION_START_INFO_TAG:
                    info = metadata.parse_session_start_info_plugin_data(content)
                    sessions.append({k: info.hparams[k] for k in info.hparams})
                elif value.tag == metadata.EXPERIMENT_TAG:
                    experiment = metadata.parse_experiment_plugin_data(content)
                    metrics = [m.name.tag for m in experiment.metric_infos]
    return sessions, metrics


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Two classes, 8 training and 2 test images each, 8x8 RGB."""
    root = tmp_path_factory.mktemp('images')
    write_image_folder(root / 'train', {'a': 8, 'b': 8}, size=8, seed=0)
    write_image_folder(root / 'test', {'a': 2, 'b': 2}, size=8, seed=1)
    return root


def args_for(script, images, **changes):
    defaults = {'epochs': EPOCHS, 'print_freq': PRINT_FREQ, 'model': 'resnet18'}
    return folder_args(images, **{**defaults, **changes})


# --------------------------------------------------------------------------- the grid


def test_views_grid_shows_both_views_side_by_side_unnormalised():
    generator = torch.Generator().manual_seed(0)
    bsz, side = 3, 4
    views = torch.randn(2 * bsz, 3, side, side, generator=generator)  # view-major
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    grid = tb_logger.views_grid(views, mean, std, views=2, count=2, min_side=1)
    # two images, two views each, in one row of four tiles, 2-pixel padding
    assert grid.shape == (3, side + 4, 4 * side + 10)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    for column, (image, view) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        x = 2 + column * (side + 2)
        tile = grid[:, 2 : 2 + side, x : x + side]
        expected = (views[view * bsz + image] * s + m).clamp(0, 1)
        assert torch.allclose(tile, expected, atol=1e-6), (image, view)

    # small tiles are enlarged by a whole factor, pixel for pixel
    big = tb_logger.views_grid(views, mean, std, views=2, count=1, min_side=10)
    assert big.shape == (3, 12 + 4, 2 * 12 + 6)
    first = (views[0] * s + m).clamp(0, 1)
    assert torch.allclose(big[:, 2:14, 2:14], first.repeat_interleave(3, 1).repeat_interleave(3, 2))

    single = tb_logger.views_grid(views[:bsz], mean, std, views=1, count=3, min_side=1)
    assert single.shape == (3, side + 4, 3 * side + 8)


# --------------------------------------------------------------------------- every script

SCRIPTS = {
    # script: (extra options, epoch tags, HPARAMS metrics, views per image)
    'main_supcon': (
        {'online_probe': True, 'probe_every': 2},
        {'loss': [1, 2, 3], 'probe_acc': [2, 3], 'probe_loss': [2, 3]},
        ['loss', 'probe_acc', 'probe_loss'],
        2,
    ),
    'main_ce': (
        {},
        {'train_loss': [1, 2, 3], 'val_acc': [1, 2, 3]},
        ['train_loss', 'train_acc', 'val_loss', 'val_acc'],
        1,
    ),
    'main_linear': (
        {},
        {'train_loss': [1, 2, 3], 'val_acc': [1, 2, 3]},
        ['train_loss', 'train_acc', 'val_loss', 'val_acc'],
        1,
    ),
}


@pytest.fixture(scope='module')
def pretrained(images, tmp_path_factory):
    cwd = tmp_path_factory.mktemp('pretrain')
    args = args_for('main_supcon', images, epochs=1, print_freq=100)
    result = call('main_supcon', args, cwd)
    assert result.code == 0, result.err
    return save_folder('main_supcon', args, cwd) / 'last.pth'


def script_args(script, images, pretrained, **changes):
    extra = dict(SCRIPTS[script][0], **changes)
    if script == 'main_linear':
        extra.update(ckpt=pretrained, model=None)
    return args_for(script, images, **extra)


@pytest.mark.slow
@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_each_script_writes_the_views_the_step_loss_and_the_hparams(
    images, pretrained, tmp_path, script
):
    _, epoch_tags, metrics, views = SCRIPTS[script]
    args = script_args(script, images, pretrained)
    result = call(script, args, tmp_path)
    assert result.code == 0, result.err
    folder = tb_folder(script, args, tmp_path)
    acc = accumulator(folder)

    # the epoch scalars keep their names and steps
    for tag, steps in epoch_tags.items():
        assert [e.step for e in acc.Scalars(tag)] == steps, tag

    # one grid of the first batch: its 4 images, `views` tiles each, 8 px enlarged to 64
    (image,) = acc.Images('views')
    assert image.step == 1
    assert (image.width, image.height) == (4 * 66 + 2, views * 66 + 2)  # 4 tiles a row

    # loss_step in the sub-run step/, at the global step of every printed line, the same loss
    step_acc = accumulator(folder / tb_logger.STEP_RUN)
    points = [(e.step, e.value) for e in step_acc.Scalars('loss_step')]
    printed_steps = [
        (epoch - 1) * STEPS + k
        for epoch in range(1, EPOCHS + 1)
        for k in range(PRINT_FREQ, STEPS + 1, PRINT_FREQ)
    ]
    assert [s for s, _ in points] == printed_steps == [3, 7, 11]
    printed = [float(line.split('loss ')[1].split(' ')[0]) for line in result.out.splitlines()
               if line.startswith('Train: [')]  # fmt: skip
    assert [round(v, 3) for _, v in points] == pytest.approx(printed, abs=1.5e-3)
    assert 'loss_step' not in acc.Tags()['scalars']  # not mixed with the epoch scalars

    # the HPARAMS record: once, the run's options, the final-metric tags (all logged)
    sessions, metric_tags = session_starts(folder)
    assert len(sessions) == 1
    assert sessions[0]['batch_size'].number_value == 4
    assert sessions[0]['epochs'].number_value == EPOCHS
    assert sessions[0]['dataset'].string_value == 'path'
    assert metric_tags == metrics
    assert set(metrics) <= set(acc.Tags()['scalars'])
    if script == 'main_supcon':
        assert sessions[0]['online_probe'].string_value == 'True'
        assert sessions[0]['probe_every'].number_value == 2


@pytest.mark.slow
def test_after_a_sigterm_in_epoch_1_and_resume_every_tag_has_its_points_once(
    images, pretrained, tmp_path
):
    script = 'main_supcon'
    epochs = 2
    args = script_args(script, images, pretrained, print_freq=1, epochs=epochs)
    reference = tmp_path / 'reference'
    reference.mkdir()
    result = call(script, args, reference)
    assert result.code == 0, result.err

    cwd = tmp_path / 'stopped'
    cwd.mkdir()
    proc = spawn(script, args, cwd)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith('Train: [1][2/'):
            proc.send_signal(signal.SIGTERM)
            break
    output.append(proc.stdout.read())
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == 128 + signal.SIGTERM, ''.join(output)
    time.sleep(1.1)  # the resumed writer's file must sort after the stopped one's
    result = call(script, args + ['--resume', 'auto'], cwd)
    assert result.code == 0, result.err
    assert 'continuing at epoch 1, step ' in result.out

    folder, reference_folder = tb_folder(script, args, cwd), tb_folder(script, args, reference)
    assert len(list(folder.glob('events.out.tfevents.*'))) == 2  # the stopped run's and ours
    acc = accumulator(folder)
    assert len(acc.Images('views')) == 1
    for tag in ('loss', 'probe_acc'):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(e.step, e.value) for e in accumulator(reference_folder).Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    steps = [(e.step, e.value) for e in accumulator(folder / 'step').Scalars('loss_step')]
    want = [(e.step, e.value) for e in accumulator(reference_folder / 'step').Scalars('loss_step')]
    assert [s for s, _ in steps] == list(range(1, epochs * STEPS + 1))
    assert [v for _, v in steps] == pytest.approx([v for _, v in want], abs=1e-6)
    (session,), _ = session_starts(folder)
    assert session == session_starts(reference_folder)[0][0]  # the uninterrupted run's record

    # resuming the finished run trains nothing and writes no second HPARAMS record
    result = call(script, args + ['--resume', 'auto'], cwd)
    assert result.code == 0 and 'epochs are done already' in result.out
    assert len(session_starts(folder)[0]) == 1


def test_a_resumed_step_writer_hides_what_the_killed_run_logged_after_its_checkpoint(tmp_path):
    killed = tb_logger.TBLogger(str(tmp_path), purge_step=1)
    for step in range(1, 9):
        killed.log_step_value('loss_step', float(step), step, purge_step=1)
    killed.close()
    time.sleep(1.1)
    resumed = tb_logger.TBLogger(str(tmp_path), purge_step=2)  # its checkpoint: step 4
    for step in range(5, 11):
        resumed.log_step_value('loss_step', 10.0 * step, step, purge_step=5)
    resumed.close()
    points = [(e.step, e.value) for e in accumulator(tmp_path / 'step').Scalars('loss_step')]
    assert points == [(s, float(s)) for s in range(1, 5)] + [(s, 10.0 * s) for s in range(5, 11)]
    assert not list(tmp_path.glob('events.out.tfevents.*'))  # the epoch writer never opened


def test_hparam_values_are_what_the_hparams_tab_can_show():
    assert tb_logger.plain_hparam(True) == 'True' and tb_logger.plain_hparam(3) == 3
    assert tb_logger.plain_hparam([700, 800]) == '700,800'
    assert tb_logger.plain_hparam(None) is None and tb_logger.plain_hparam(0.5) == 0.5
