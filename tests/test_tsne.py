"""Tests for main_tsne.py: the subset, the figure, its errors. The scripts run in this process
(``inprocess.run``: the exit code and output of ``python main_*.py``)."""

import argparse
import glob
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from inprocess import run as run_script
from PIL import Image
from test_knn_and_tsne import write_image_folder

from networks.resnet_big import SupCEResNet, SupConResNet
from supcon.system import runtime

# --------------------------------------------------------------------------- main_tsne.py


def test_stratified_subset_is_fixed_and_balanced():
    from main_tsne import stratified_subset

    targets = np.array([0] * 600 + [1] * 300 + [2] * 100)
    chosen = stratified_subset(targets, 100, seed=0)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert np.all(np.diff(chosen) > 0)
    assert np.bincount(targets[chosen]).tolist() == [60, 30, 10]
    assert stratified_subset(targets, 100, seed=0).tolist() == chosen.tolist()
    assert stratified_subset(targets, 100, seed=1).tolist() != chosen.tolist()
    assert stratified_subset(targets, 5000, seed=0).tolist() == list(range(1000))


@pytest.fixture(scope='module')
def supcon_run(tmp_path_factory):
    """One epoch of main_supcon.py with the kNN monitor on.

    A tiny image folder (1 step of 24) rather than digits (23 steps of 64): a
    resnet18 step costs seconds on a small shared CPU whatever the image size.
    """
    cwd = tmp_path_factory.mktemp('supcon')
    write_image_folder(cwd / 'train', 8, seed=0)
    write_image_folder(cwd / 'test', 30, seed=1)
    data_args = [
        '--dataset',
        'path',
        '--data_folder',
        'train',
        '--test_folder',
        'test',
        '--mean',
        '(0.5, 0.5, 0.5)',
        '--std',
        '(0.3, 0.3, 0.3)',
        '--size',
        '8',
    ]
    result = run_script(
        'main_supcon',
        [
            *data_args,
            '--model',
            'resnet18',
            '--stem',
            'imagenet',
            '--batch_size',
            '24',
            '--epochs',
            '1',
            '--num_workers',
            '0',
            '--print_freq',
            '100',
            '--device',
            'cpu',
            '--knn_every',
            '1',
            '--method',
            'SimCLR',
            '--seed',
            '0',
        ],
        cwd,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (ckpt,) = glob.glob(str(cwd / 'save/SupCon/path_models/*/last.pth'))
    return SimpleNamespace(cwd=cwd, stdout=result.stdout, ckpt=ckpt, data_args=data_args)


@pytest.mark.slow
def test_main_supcon_logs_knn_accuracy(supcon_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert 'knn_acc epoch 1:' in supcon_run.stdout
    (tb_dir,) = glob.glob(str(supcon_run.cwd / 'save/SupCon/path_tensorboard/*'))
    events = EventAccumulator(tb_dir)
    events.Reload()
    assert 'knn_acc' in events.Tags()['scalars']
    (point,) = events.Scalars('knn_acc')
    assert point.step == 1 and 0.0 <= point.value <= 100.0


@pytest.mark.slow
def test_main_tsne_on_a_supcon_checkpoint(supcon_run):
    result = run_script(
        'main_tsne',
        [
            '--ckpt',
            supcon_run.ckpt,
            *supcon_run.data_args,
            '--max_samples',
            '60',
            '--device',
            'cpu',
            '--num_workers',
            '0',
        ],
        supcon_run.cwd,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = os.path.join(os.path.dirname(supcon_run.ckpt), 'last_tsne_encoder.png')
    assert f'wrote {out}' in result.stdout
    assert 'extracting encoder features of 60 path test images' in result.stdout
    with Image.open(out) as image:
        assert image.format == 'PNG' and image.size == (500, 500)


def test_main_tsne_head_features_in_process(tmp_path, monkeypatch, capsys):
    import main_tsne

    torch.manual_seed(0)
    path = tmp_path / 'simclr.pth'
    torch.save(
        {
            'model': SupConResNet('resnet18', feat_dim=16).state_dict(),
            'opt': {'model': 'resnet18', 'method': 'SimCLR'},
            'epoch': 2,
        },
        path,
    )
    out = tmp_path / 'figs' / 'head.png'
    monkeypatch.setattr(
        sys,
        'argv',
        [
            'main_tsne.py',
            '--ckpt',
            str(path),
            '--dataset',
            'digits',
            '--size',
            '8',
            '--max_samples',
            '40',
            '--features',
            'head',
            '--device',
            'cpu',
            '--num_workers',
            '0',
            '--out',
            str(out),
        ],
    )
    main_tsne.main()
    assert f'wrote {out}' in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == (500, 500)


@pytest.mark.parametrize('case', ['ce_head', 'missing'])
def test_main_tsne_user_errors_exit_2_with_one_line(case, tmp_path, monkeypatch, capsys):
    import main_tsne

    path = tmp_path / 'missing.pth'
    if case == 'ce_head':
        torch.manual_seed(0)
        state = SupCEResNet('resnet18', num_classes=10).state_dict()
        ce = {'module.' + k: v for k, v in state.items()}
        path = tmp_path / 'ce.pth'
        torch.save({'model': ce, 'opt': argparse.Namespace(model='resnet18'), 'epoch': 1}, path)
    monkeypatch.setattr(
        sys,
        'argv',
        [
            'main_tsne.py',
            '--ckpt',
            str(path),
            '--dataset',
            'digits',
            '--features',
            'head',
            '--device',
            'cpu',
        ],
    )
    with pytest.raises(SystemExit) as info:
        runtime.launch(main_tsne.main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and f'--ckpt {path}' in err
    if case == 'ce_head':
        assert 'cross-entropy (SupCE)' in err and 'use --features encoder' in err
    else:
        assert 'no such file' in err
    assert not glob.glob(str(tmp_path / '*.png'))


@pytest.mark.parametrize(
    'case',
    ['perplexity_nan', 'perplexity_inf', 'out_is_a_folder', 'out_not_an_image', 'out_not_writable'],
)
def test_main_tsne_refuses_bad_flags_before_loading_anything(case, tmp_path, monkeypatch, capsys):
    """--out is checked before the data, the model and t-SNE, not after minutes of work."""
    import main_tsne
    from supcon.system import checkpoint

    def never(*args, **kwargs):
        raise AssertionError('loaded data before checking the flags')

    monkeypatch.setattr(main_tsne, 'set_loader', never)
    monkeypatch.setattr(main_tsne, 'set_model', never)
    args = ['--ckpt', str(tmp_path / 'any.pth'), '--dataset', 'digits', '--device', 'cpu']
    expected = {
        'perplexity_nan': (['--perplexity', 'nan'], '--perplexity must be a finite number > 0'),
        'perplexity_inf': (['--perplexity', 'inf'], '--perplexity must be a finite number > 0'),
        'out_is_a_folder': (['--out', str(tmp_path)], 'it is a directory'),
        'out_not_an_image': (['--out', str(tmp_path / 'map.txt')], '.txt extension'),
        'out_not_writable': (['--out', str(tmp_path / 'figs' / 'map.png')], 'Permission denied'),
    }
    extra, words = expected[case]
    if case == 'out_not_writable':

        def refuse(*args, **kwargs):
            raise PermissionError(13, 'Permission denied')

        monkeypatch.setattr(checkpoint.tempfile, 'mkstemp', refuse)
    monkeypatch.setattr(sys, 'argv', ['main_tsne.py'] + args + extra)
    with pytest.raises(SystemExit) as info:
        runtime.launch(main_tsne.main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and words in err, err
    if case.startswith('out'):
        assert err.startswith(f'error: --out {extra[1]}: cannot write the figure there')
    assert not (tmp_path / 'figs').exists()
