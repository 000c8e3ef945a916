"""Tests for features.py (extraction, weighted kNN, KNNMonitor) and main_tsne.py."""

import argparse
import glob
import math
import os
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import features
import util
from features import KNNMonitor, extract_features, knn_accuracy, knn_predict
from networks.resnet_big import SupCEResNet, SupConResNet
from util import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_OPT = dict(device=torch.device('cpu'), amp_torch_dtype=None, channels_last=False)


def run_script(script, args, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 6, 6, generator=g)
        self.targets = [i % 3 for i in range(n)]
        self.classes = ['a', 'b', 'c']

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def write_image_folder(root, per_class, seed):
    """Three classes of 8x8 PNGs, each class a noisy version of its own colour."""
    rng = np.random.default_rng(seed)
    for label, colour in enumerate([(220, 40, 40), (40, 200, 40), (40, 40, 220)]):
        folder = root / f'class_{label}'
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 40, (8, 8, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i:03d}.png')


# --------------------------------------------------------------------------- kNN

def brute_force_knn(train_x, train_y, test_x, num_classes, k, temperature):
    """The weighted kNN written out with loops, in float64."""
    def unit(row):
        norm = math.sqrt(sum(v * v for v in row))
        return [v / norm for v in row]
    train = [unit(r) for r in train_x.tolist()]
    labels = train_y.tolist()
    preds = []
    for row in test_x.tolist():
        q = unit(row)
        sims = [sum(a * b for a, b in zip(q, t)) for t in train]
        nearest = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in nearest:
            votes[labels[j]] += math.exp(sims[j] / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return preds


@pytest.mark.parametrize('k,temperature', [(1, 0.07), (5, 0.07), (5, 0.5), (100, 0.3)])
def test_knn_predict_matches_brute_force(k, temperature):
    g = torch.Generator().manual_seed(k)
    train_x, test_x = torch.randn(30, 8, generator=g), torch.randn(10, 8, generator=g)
    train_y = torch.randint(0, 3, (30,), generator=g)
    expected = brute_force_knn(train_x, train_y, test_x, 3, min(k, 30), temperature)
    pred = knn_predict(train_x, train_y, test_x, 3, k=k, temperature=temperature)
    assert pred.dtype == torch.int64
    assert pred.tolist() == expected
    # chunks of test rows give the same answer as one block
    chunked = knn_predict(train_x, train_y, test_x, 3, k, temperature, chunk_size=3)
    assert chunked.tolist() == expected

    test_y = torch.randint(0, 3, (10,), generator=g)
    hits = sum(p == t for p, t in zip(expected, test_y.tolist()))
    assert knn_accuracy(train_x, train_y, test_x, test_y, 3, k, temperature) == pytest.approx(
        100.0 * hits / 10)


def test_knn_weights_favour_close_neighbours():
    # one very close neighbour of class 1 outvotes two far ones of class 0, unless the
    # temperature is so high that the votes become nearly equal
    train = torch.tensor([[1.0, 0.05], [0.2, 1.0], [0.1, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, query, 2, k=3, temperature=0.1).tolist() == [1]
    assert knn_predict(train, labels, query, 2, k=3, temperature=100.0).tolist() == [0]
    assert knn_accuracy(train, labels, query, torch.tensor([1]), 2, k=3, temperature=0.1) == 100.0


# --------------------------------------------------------------------------- extraction

def test_extract_features_shapes_order_and_modes(capsys):
    dataset = TensorImages(10)
    encoder, head = tiny_encoder(), nn.Linear(4, 3)
    opt = SimpleNamespace(**CPU_OPT)
    encoder.train()
    with torch.no_grad():
        expected = torch.cat([encoder.eval()(dataset.images[i:i + 1]) for i in range(10)])
    encoder.train()

    # shuffled and padded: rows still come back once each, in data-set order
    for shuffle in (False, True):
        loader, _ = data.build_loader(dataset, 4, shuffle=shuffle, seed=0, pad=True)
        feats, labels = extract_features(encoder, loader, opt)
        assert feats.dtype == torch.float32 and labels.dtype == torch.int64
        assert feats.shape == (10, 4)
        assert labels.tolist() == dataset.targets
        torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    assert encoder.training  # the caller's mode is restored
    assert 'features: 3/3 batches' in capsys.readouterr().out

    loader, _ = data.build_loader(dataset, 4, shuffle=False, seed=0, pad=False)
    projected, _ = extract_features(encoder, loader, opt, head=head, progress=False)
    assert projected.shape == (10, 3)
    torch.testing.assert_close(projected.norm(dim=1), torch.ones(10))
    assert capsys.readouterr().out == ''


def monitor_opt(**changes):
    opt = dict(dataset='digits', data_folder='./datasets/', test_folder=None, mean=None,
               std=None, size=8, local_batch_size_val=512, num_workers=0, pin_memory=False,
               seed=0, rank=0, world_size=1, **CPU_OPT)
    opt.update(changes)
    return SimpleNamespace(**opt)


def test_knn_monitor_on_digits_pixels(capsys):
    # kNN on raw pixels already separates the digits well: a sanity check of the whole path
    encoder = nn.Sequential(nn.Flatten())
    monitor = KNNMonitor(monitor_opt())
    encoder.train()
    acc = monitor.monitor(encoder, 3)
    assert isinstance(acc, float) and 85.0 < acc <= 100.0
    assert encoder.training
    encoder.eval()
    assert monitor(encoder, 4) == acc
    assert not encoder.training
    out = capsys.readouterr().out
    assert f'knn_acc epoch 3: {acc:.2f}\n' in out and 'knn_acc epoch 4:' in out


def test_knn_monitor_path_needs_test_folder():
    with pytest.raises(UserError, match='--knn_every needs --test_folder') as info:
        KNNMonitor(monitor_opt(dataset='path', data_folder='somewhere'))
    assert '\n' not in str(info.value)


DIST_SCRIPT = textwrap.dedent('''
    import argparse, sys, torch
    import torch.nn as nn
    import data, util
    from features import KNNMonitor, extract_features

    opt = argparse.Namespace(batch_size=2, batch_size_val=8, num_workers=0, amp=False,
                             amp_dtype='auto', channels_last=False, compile=False, seed=0,
                             device='cpu', dataset='path', data_folder='train',
                             test_folder='test', mean='0.5,0.5,0.5', std='0.3,0.3,0.3', size=8)
    util.setup_runtime(opt)
    dataset = data.build_dataset('path', 'test', data.test_transform(8, (0.5,) * 3, (0.3,) * 3),
                                 'train', 'test')
    loader, _ = data.build_loader(dataset, 4, shuffle=False, seed=0, rank=opt.rank,
                                  world_size=opt.world_size, pad=False)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    feats, labels = extract_features(encoder, loader, opt, progress=False)
    acc = KNNMonitor(opt)(encoder, 1)
    torch.save({'feats': feats, 'labels': labels, 'acc': acc, 'share': len(loader.sampler)},
               f'rank{opt.rank}.pt')
    util.cleanup_runtime()
''')


def test_extract_features_gathers_every_sample_once_over_two_processes(tmp_path):
    write_image_folder(tmp_path / 'train', 10, seed=0)
    write_image_folder(tmp_path / 'test', 11, seed=1)  # 33 images: the ranks' shares differ
    script = tmp_path / 'dist_extract.py'
    script.write_text(DIST_SCRIPT)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=REPO, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE='2', LOCAL_WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port), OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[0].count('knn_acc epoch 1:') == 1 and 'knn_acc' not in outputs[1]

    # the same in one process
    mean_std = dict(mean='0.5,0.5,0.5', std='0.3,0.3,0.3')
    dataset = data.build_dataset('path', 'test', data.test_transform(8, (0.5,) * 3, (0.3,) * 3),
                                 tmp_path / 'train', tmp_path / 'test')
    loader, _ = data.build_loader(dataset, 4, shuffle=False, seed=0, pad=False)
    encoder = tiny_encoder()
    feats, labels = extract_features(encoder, loader, SimpleNamespace(**CPU_OPT), progress=False)
    acc = KNNMonitor(monitor_opt(dataset='path', data_folder=tmp_path / 'train',
                                 test_folder=tmp_path / 'test', local_batch_size_val=8,
                                 **mean_std))(encoder, 1)

    results = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    assert sorted(r['share'] for r in results) == [16, 17]
    for result in results:
        assert result['labels'].tolist() == labels.tolist()
        torch.testing.assert_close(result['feats'], feats, rtol=1e-4, atol=1e-5)
        assert result['acc'] == pytest.approx(acc)


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_helpers_read_reference_and_ce_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = SupConResNet('resnet18', head='linear', feat_dim=8)
    # the reference's layout: a Namespace opt and DataParallel's "encoder.module." keys
    state = {k.replace('encoder.', 'encoder.module.'): v for k, v in model.state_dict().items()}
    path = str(tmp_path / 'ref.pth')
    torch.save({'model': state, 'opt': argparse.Namespace(model='resnet18', method='SimCLR'),
                'epoch': 7}, path)
    ckpt = util.load_checkpoint(path)
    encoder, name = features.build_encoder(ckpt, path)
    assert name == 'resnet18' and not encoder.training
    torch.testing.assert_close(encoder.conv1.weight, model.encoder.conv1.weight)
    head = features.build_head(ckpt, path, name)
    torch.testing.assert_close(head.weight, model.head.weight)
    assert features.checkpoint_method(ckpt) == 'SimCLR'
    with pytest.raises(UserError, match='pass --model resnet18'):
        features.build_encoder(ckpt, path, 'resnet50')

    ce = {'model': SupCEResNet('resnet18', num_classes=3).state_dict(), 'opt': {}, 'epoch': 1}
    assert features.checkpoint_method(ce) == 'SupCE'
    with pytest.raises(UserError, match='cross-entropy .* use --features encoder'):
        features.build_head(ce, 'ce.pth', 'resnet18')


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
    """One real epoch of main_supcon.py with the kNN monitor on.

    A tiny image folder (1 step of 24) rather than digits (23 steps of 64): a
    resnet18 step costs seconds on a small shared CPU whatever the image size.
    """
    cwd = tmp_path_factory.mktemp('supcon')
    write_image_folder(cwd / 'train', 8, seed=0)
    write_image_folder(cwd / 'test', 30, seed=1)
    data_args = ['--dataset', 'path', '--data_folder', 'train', '--test_folder', 'test',
                 '--mean', '(0.5, 0.5, 0.5)', '--std', '(0.3, 0.3, 0.3)', '--size', '8']
    result = run_script('main_supcon.py', [
        *data_args, '--model', 'resnet18', '--stem', 'imagenet', '--batch_size', '24',
        '--epochs', '1', '--num_workers', '0', '--print_freq', '100', '--device', 'cpu',
        '--knn_every', '1', '--method', 'SimCLR', '--seed', '0'], cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt, = glob.glob(str(cwd / 'save/SupCon/path_models/*/last.pth'))
    return SimpleNamespace(cwd=cwd, stdout=result.stdout, ckpt=ckpt, data_args=data_args)


def test_main_supcon_logs_knn_accuracy(supcon_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert 'knn_acc epoch 1:' in supcon_run.stdout
    tb_dir, = glob.glob(str(supcon_run.cwd / 'save/SupCon/path_tensorboard/*'))
    events = EventAccumulator(tb_dir)
    events.Reload()
    assert 'knn_acc' in events.Tags()['scalars']
    (point,) = events.Scalars('knn_acc')
    assert point.step == 1 and 0.0 <= point.value <= 100.0


def test_main_tsne_on_a_supcon_checkpoint(supcon_run):
    result = run_script('main_tsne.py', ['--ckpt', supcon_run.ckpt, *supcon_run.data_args,
                                         '--max_samples', '60', '--device', 'cpu',
                                         '--num_workers', '0'], supcon_run.cwd)
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
    torch.save({'model': SupConResNet('resnet18', feat_dim=16).state_dict(),
                'opt': {'model': 'resnet18', 'method': 'SimCLR'}, 'epoch': 2}, path)
    out = tmp_path / 'figs' / 'head.png'
    monkeypatch.setattr(sys, 'argv', ['main_tsne.py', '--ckpt', str(path), '--dataset', 'digits',
                                      '--size', '8', '--max_samples', '40', '--features', 'head',
                                      '--device', 'cpu', '--num_workers', '0', '--out', str(out)])
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
    monkeypatch.setattr(sys, 'argv', ['main_tsne.py', '--ckpt', str(path), '--dataset', 'digits',
                                      '--features', 'head', '--device', 'cpu'])
    with pytest.raises(SystemExit) as info:
        util.run_main(main_tsne.main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and f'--ckpt {path}' in err
    if case == 'ce_head':
        assert 'cross-entropy (SupCE)' in err and 'use --features encoder' in err
    else:
        assert 'no such file' in err
    assert not glob.glob(str(tmp_path / '*.png'))
