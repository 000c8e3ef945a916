"""Feature extraction and the weighted kNN (supcon/evaluation/extract.py, knn.py: KNNMonitor) and
main_tsne.py."""

import contextlib
import io
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from helpers import free_port
from PIL import Image

from supcon.data import augment, datasets, sampling
from supcon.evaluation.extract import extract_features
from supcon.evaluation.knn import KNNMonitor, knn_accuracy, knn_predict
from supcon.system import runtime
from util import UserError

# what setup_runtime gives one CPU process without --amp (evaluation batches of 512)
CPU_RT = runtime.Runtime(device=torch.device('cpu'), local_batch_size_val=512)


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


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
        100.0 * hits / 10
    )


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
    rt = CPU_RT
    encoder.train()
    with torch.no_grad():
        expected = torch.cat([encoder.eval()(dataset.images[i : i + 1]) for i in range(10)])
    encoder.train()

    # shuffled and padded: rows still come back once each, in data-set order
    for shuffle in (False, True):
        loader, _ = sampling.build_loader(dataset, 4, shuffle=shuffle, seed=0, pad=True)
        feats, labels = extract_features(encoder, loader, rt)
        assert feats.dtype == torch.float32 and labels.dtype == torch.int64
        assert feats.shape == (10, 4)
        assert labels.tolist() == dataset.targets
        torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-6)
    assert encoder.training  # the caller's mode is restored
    assert 'features: 3/3 batches' in capsys.readouterr().out

    loader, _ = sampling.build_loader(dataset, 4, shuffle=False, seed=0, pad=False)
    projected, _ = extract_features(encoder, loader, rt, head=head, progress=False)
    assert projected.shape == (10, 3)
    torch.testing.assert_close(projected.norm(dim=1), torch.ones(10))
    assert capsys.readouterr().out == ''


def monitor_opt(**changes):
    opt = dict(
        dataset='digits',
        data_folder='./datasets/',
        test_folder=None,
        mean=None,
        std=None,
        size=8,
        val_split=0.0,
    )
    opt.update(changes)
    return SimpleNamespace(**opt)


def test_knn_monitor_with_val_split_never_reads_the_test_split(capsys):
    full = KNNMonitor(monitor_opt(), CPU_RT)
    held = KNNMonitor(monitor_opt(val_split=0.2), CPU_RT)
    train_rows = len(full.train_loader.dataset)
    # the 20% held out of the training images replace the test split; the bank is the rest
    assert len(held.test_loader.dataset) + len(held.train_loader.dataset) == train_rows
    assert 0.19 < len(held.test_loader.dataset) / train_rows < 0.21
    assert (
        held.test_loader.dataset.dataset.indices
        == datasets.build_dataset('digits', 'test', None, val_split=0.2).indices
    )
    held(nn.Sequential(nn.Flatten()), 1)
    assert f'{len(held.test_loader.dataset)} held-out and' in capsys.readouterr().out


def test_knn_monitor_on_digits_pixels(capsys):
    # kNN on raw pixels already separates the digits well: a sanity check of the whole path
    encoder = nn.Sequential(nn.Flatten())
    monitor = KNNMonitor(monitor_opt(), CPU_RT)
    encoder.train()
    acc = monitor(encoder, 3)
    assert isinstance(acc, float) and 85.0 < acc <= 100.0
    assert encoder.training
    encoder.eval()
    assert monitor(encoder, 4) == acc
    assert not encoder.training
    out = capsys.readouterr().out
    assert f'knn_acc epoch 3: {acc:.2f}\n' in out and 'knn_acc epoch 4:' in out


def test_knn_monitor_path_needs_test_folder():
    with pytest.raises(UserError, match='--knn_every needs --test_folder') as info:
        KNNMonitor(monitor_opt(dataset='path', data_folder='somewhere'), CPU_RT)
    assert '\n' not in str(info.value)


def test_knn_monitor_refuses_test_classes_other_than_the_training_ones(tmp_path):
    """Labels are class indices: with other class folders the kNN accuracy means nothing."""
    write_image_folder(tmp_path / 'train', 1, seed=0)
    write_image_folder(tmp_path / 'test', 1, seed=1)
    (tmp_path / 'test' / 'class_2').rename(tmp_path / 'test' / 'class_9')
    opt = monitor_opt(
        dataset='path',
        data_folder=tmp_path / 'train',
        test_folder=tmp_path / 'test',
        mean='0.5,0.5,0.5',
        std='0.3,0.3,0.3',
    )
    with pytest.raises(UserError) as info:
        KNNMonitor(opt, CPU_RT)
    message = str(info.value)
    assert message.startswith('train and test data have different classes')
    assert 'only in train: class_2; only in test: class_9' in message and '\n' not in message


def _extract_on_rank(rank, world, port, folder):
    """Rank ``rank`` of ``world``, forked, with torchrun's variables: the runtime joins the gloo
    group as a script's does, gathers the test images' features and scores the kNN monitor.
    Saves them and what it printed in rank<rank>.pt."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=str(port),
    )
    os.chdir(folder)
    torch.set_num_threads(1)
    opt = SimpleNamespace(batch_size=2, batch_size_val=8, num_workers=0, amp=False,
                          amp_dtype='auto', channels_last=False, compile=False, seed=0,
                          device='cpu', dataset='path', data_folder='train',
                          test_folder='test', mean='0.5,0.5,0.5', std='0.3,0.3,0.3', size=8,
                          val_split=0.0)  # fmt: skip
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rt = runtime.setup_runtime(opt)
        transform = augment.test_transform(8, (0.5,) * 3, (0.3,) * 3)
        dataset = datasets.build_dataset('path', 'test', transform, 'train', 'test')
        loader, _ = sampling.build_loader(dataset, 4, shuffle=False, seed=0, rank=rt.rank,
                                          world_size=rt.world_size, pad=False)  # fmt: skip
        encoder = tiny_encoder()
        feats, labels = extract_features(encoder, loader, rt, progress=False)
        acc = KNNMonitor(opt, rt)(encoder, 1)
        runtime.cleanup_runtime()
    torch.save({'feats': feats, 'labels': labels, 'acc': acc, 'share': len(loader.sampler),
                'printed': printed.getvalue()}, f'rank{rank}.pt')  # fmt: skip


@pytest.mark.slow
def test_extract_features_gathers_every_sample_once_over_two_processes(tmp_path):
    write_image_folder(tmp_path / 'train', 10, seed=0)
    write_image_folder(tmp_path / 'test', 11, seed=1)  # 33 images: the ranks' shares differ
    mp.start_processes(
        _extract_on_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method='fork'
    )
    # start_processes raises if a rank fails; both ranks finished and saved their part
    assert sorted(path.name for path in tmp_path.glob('rank*.pt')) == ['rank0.pt', 'rank1.pt']
    results = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    outputs = [result['printed'] for result in results]
    assert outputs[0].count('knn_acc epoch 1:') == 1 and 'knn_acc' not in outputs[1]

    # the same in one process
    mean_std = dict(mean='0.5,0.5,0.5', std='0.3,0.3,0.3')
    dataset = datasets.build_dataset(
        'path',
        'test',
        augment.test_transform(8, (0.5,) * 3, (0.3,) * 3),
        tmp_path / 'train',
        tmp_path / 'test',
    )
    loader, _ = sampling.build_loader(dataset, 4, shuffle=False, seed=0, pad=False)
    encoder = tiny_encoder()
    feats, labels = extract_features(encoder, loader, CPU_RT, progress=False)
    acc = KNNMonitor(
        monitor_opt(
            dataset='path',
            data_folder=tmp_path / 'train',
            test_folder=tmp_path / 'test',
            **mean_std,
        ),
        runtime.Runtime(device=torch.device('cpu'), local_batch_size_val=8),
    )(encoder, 1)

    assert sorted(r['share'] for r in results) == [16, 17]
    for result in results:
        assert result['labels'].tolist() == labels.tolist()
        torch.testing.assert_close(result['feats'], feats, rtol=1e-4, atol=1e-5)
        assert result['acc'] == pytest.approx(acc)
