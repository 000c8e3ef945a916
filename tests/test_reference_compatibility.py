"""Faithful to the seed systems: the fork's hybrid loss and flags, the reference's help and notes,
the reference author's released ImageNet checkpoint (torchvision layout)."""

import argparse
import contextlib
import io

import pytest
import torch
import torchvision
from helpers import FAST
from inprocess import call

import main_ce
import main_linear
import main_supcon
import main_tsne
from networks.from_checkpoint import (
    encoder_from_checkpoint,
    from_torchvision_layout,
    head_from_checkpoint,
)
from networks.resnet_big import SupConResNet
from supcon.data import datasets
from supcon.system.checkpoint import load_checkpoint

DIGITS = ['--dataset', 'digits', '--model', 'resnet18', '--size', '8'] + FAST
# a tenth of the digits' training images (144), for quick end-to-end runs
SMALL = DIGITS + ['--val_split', '0.9', '--batch_size', '48', '--epochs', '1']


def describe(result):
    return f'rc={result.code}\n{result.out[-2000:]}\n{result.err[-2000:]}'


# --------------------------------------------------------------------------- the fork's hybrid


def test_hybrid_method_names_its_run_as_the_fork():
    opt = main_supcon.parse_option(['--method', 'SupCon_hybrid', '--dataset', 'digits'])
    assert opt.model_name.startswith('SupCon_hybrid_digits_resnet50_lr_0.05_')
    # the fork's later spelling means the same loss and the same name
    assert main_supcon.parse_option(['--method', 'SupConHybrid']).method == 'SupCon_hybrid'


@pytest.mark.slow
def test_hybrid_trains_on_digits(tmp_path):
    args = SMALL + ['--method', 'SupCon_hybrid']
    result = call('main_supcon', args, tmp_path)
    assert result.code == 0, describe(result)
    run = tmp_path / main_supcon.parse_option(args).save_folder
    ckpt = load_checkpoint(str(run / 'last.pth'))
    assert ckpt['opt']['method'] == 'SupCon_hybrid'
    assert all(v.isfinite().all() for v in ckpt['model'].values() if v.is_floating_point())


# --------------------------------------------------------------------------- flags and help


@pytest.mark.parametrize('module', [main_supcon, main_ce, main_linear, main_tsne])
def test_help_names_the_script_and_shows_defaults_and_units(module):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        module.parse_option(['--help'])
    assert exit_info.value.code == 0
    text = ' '.join(out.getvalue().split())
    name = module.__name__ + '.py'
    assert text.startswith(f'usage: {name}') and 'argument for training' not in text
    assert '(default:' in text
    if module is not main_tsne:
        assert 'print every N steps (default: 10)' in text
        assert 'every N epochs (default: 50)' in text
        assert 'comma-separated epochs' in text
    if module in (main_linear, main_tsne):
        assert '--ckpt CKPT (required)' in text
    if module is main_supcon:
        assert 'test image folder for --dataset path' in text
        assert '(pretraining: only for --knn_every, --online_probe, --ce_weight)' in text
        # item 19 of the hostile test: --resume auto takes the furthest checkpoint, not the newest
        assert 'furthest in training' in text and 'newest' not in text
        assert (
            'evaluation batch size (pretraining: only for --knn_every, --online_probe,'
            ' --ce_weight)' in text
        )


def test_num_workers_val_sets_the_test_loaders_workers():
    """The fork's flag (main_ce.py and main_linear.py, default 8) sizes the test loader only."""
    assert main_ce.parse_option(['--dataset', 'digits']).num_workers_val == 8
    opt = main_ce.parse_option(
        [
            '--dataset',
            'digits',
            '--num_workers',
            '0',
            '--num_workers_val',
            '1',
            '--device',
            'cpu',
            '--seed',
            '0',
        ]
    )
    from supcon.system import runtime

    rt = runtime.setup_runtime(opt)
    train_loader, _, val_loader, num_classes = datasets.classification_loaders(opt, rt)
    assert (train_loader.num_workers, val_loader.num_workers, num_classes) == (0, 1, 10)


def test_cifar_mean_std_are_applied_and_said_once(capsys):
    opt = main_ce.parse_option(['--mean', '(0.5, 0.5, 0.5)', '--std', '(0.2, 0.2, 0.2)'])
    out = capsys.readouterr().out
    assert out.count('note: using the given --mean/--std for cifar10') == 1
    assert datasets.resolve_mean_std(opt.dataset, opt.mean, opt.std) == ((0.5,) * 3, (0.2,) * 3)
    main_ce.parse_option([])
    assert 'note:' not in capsys.readouterr().out


def test_the_cifar_note_is_said_by_rank_0_only_and_survives_a_bad_rank(capsys, monkeypatch):
    flags = ['--mean', '(0.5, 0.5, 0.5)', '--std', '(0.2, 0.2, 0.2)']
    torchrun = dict(WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='29500')
    # under torchrun (all its variables set) only rank 0 speaks; a RANK alone, or one that is
    # no number (refused later, by runtime.setup_runtime), is a single process, which must
    for rank, env, said in (
        ('1', torchrun, False),
        ('0', torchrun, True),
        ('abc', torchrun, True),
        ('1', {}, True),
    ):
        for key in torchrun:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv('RANK', rank)
        main_ce.parse_option(flags)
        assert ('note: using the given' in capsys.readouterr().out) == said, (rank, env)


def test_supcon_checks_num_classes_against_the_data(tmp_path):
    result = call('main_supcon', SMALL + ['--num_classes', '7'], tmp_path)
    assert result.code == 2, describe(result)
    assert result.err.strip().startswith('error: --num_classes 7 does not match the 10')


# --------------------------------------------------------------------------- the released model


def torchvision_checkpoint(arch, seed=0):
    """A file as the reference author released: ``module.encoder.*`` in torchvision's layout
    (its ``fc`` included) plus ``module.head.0/2.*``, under ``model``; and the torchvision net."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)()
    width = net.fc.in_features
    head = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 128)
    )
    # non-trivial BatchNorm statistics, so that loading them is tested too
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    state = {f'module.encoder.{k}': v for k, v in net.state_dict().items()}
    state.update({f'module.head.{k}': v for k, v in head.state_dict().items()})
    return {'model': state, 'epoch': 100}, net.eval(), head.eval()


def test_released_resnet50_maps_every_tensor_and_gives_torchvision_features(tmp_path):
    ckpt, net, head = torchvision_checkpoint('resnet50')
    path = tmp_path / 'supcon.pth'
    torch.save(ckpt, path)
    loaded = load_checkpoint(str(path))
    state, model, stem = from_torchvision_layout(loaded['model'])
    assert (model, stem) == ('resnet50', 'imagenet')
    ours = SupConResNet('resnet50', stem='imagenet').state_dict()
    # every tensor lands: our keys are exactly the file's, less torchvision's unused fc
    dropped = {k for k in loaded['model'] if k.startswith('encoder.fc.')}
    assert dropped == {'encoder.fc.weight', 'encoder.fc.bias'}
    assert set(state) == set(ours) and len(state) == len(loaded['model']) - 2

    encoder, name = encoder_from_checkpoint(loaded, str(path))
    assert name == 'resnet50' and encoder.feature_dim == 2048
    images = torch.randn(2, 3, 64, 64)
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = net(images)
        got = encoder(images)
        projection = head_from_checkpoint(loaded, str(path), name, encoder.feature_dim)(got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(projection, head(expected), rtol=1e-5, atol=1e-5)


def test_a_bare_torchvision_state_dict_loads_too(tmp_path):
    ckpt, net, _ = torchvision_checkpoint('resnet18', seed=1)
    torch.save(ckpt['model'], tmp_path / 'bare.pth')  # no 'model' key around it
    encoder, name = encoder_from_checkpoint(load_checkpoint(str(tmp_path / 'bare.pth')), 'bare.pth')
    assert name == 'resnet18'
    net.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), net(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_linear_and_tsne_run_on_a_torchvision_layout_checkpoint(tmp_path):
    ckpt, _, _ = torchvision_checkpoint('resnet18', seed=2)
    torch.save(ckpt, tmp_path / 'supcon.pth')
    result = call(
        'main_linear',
        DIGITS[:2]
        + [
            '--size',
            '16',
            '--ckpt',
            'supcon.pth',
            '--epochs',
            '1',
            '--batch_size',
            '48',
            '--val_split',
            '0.9',
        ]
        + FAST,
        tmp_path,
    )
    assert result.code == 0, describe(result)
    assert 'best accuracy:' in result.out and 'final accuracy:' in result.out
    linear = tmp_path / 'save/SupCon/digits_linear_models' / tmp_path.name / 'supcon'
    assert list(linear.glob('*/last.pth'))
    result = call(
        'main_tsne',
        [
            '--dataset',
            'digits',
            '--size',
            '16',
            '--ckpt',
            'supcon.pth',
            '--max_samples',
            '60',
            '--num_workers',
            '0',
            '--device',
            'cpu',
        ],
        tmp_path,
    )
    assert result.code == 0, describe(result)
    assert (tmp_path / 'supcon_tsne_encoder.png').stat().st_size > 1000


@pytest.mark.slow
def test_checkpoint_options_stay_a_namespace_for_users_tools(tmp_path):
    result = call('main_ce', SMALL, tmp_path)
    assert result.code == 0, describe(result)
    path = next((tmp_path / 'save/SupCon/digits_models').glob('*/last.pth'))
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, weights_only=True)
    assert isinstance(ckpt['opt'], argparse.Namespace) and ckpt['opt'].model == 'resnet18'
    assert result.out.count('==> Saving...') == 2  # epoch 1, then last.pth
