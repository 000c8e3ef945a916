"""positives.py: positives_per_anchor and anchors_without_positive against a plain count of every
anchor's positives, per step, per epoch, with a --moco queue, and on main_supcon.py's epoch line."""

import re
import statistics

import numpy as np
import pytest
import torch
from inprocess import call, save_folder
from PIL import Image
from test_resume import scalars, tb_folder

from supcon.data import datasets
from supcon.data.sampling import SeededSampler
from supcon.objectives.positives import TAGS, PositiveCounter, class_counts, positive_statistics
from util import AverageMeter


def plain_positives(labels, queue_labels=(), n_views=2):
    """Each anchor (view v of image i) and its positives other than its own image's views:
    every view of every other image of its label, and every queue row of its label."""
    per_anchor = []
    for i, label in enumerate(labels):
        for _ in range(n_views):
            if label == -1:  # unlabelled: only its own views (SupConLoss's rule)
                per_anchor.append(0)
                continue
            batch = sum(n_views for j, other in enumerate(labels) if j != i and other == label)
            queue = sum(1 for row in queue_labels if row == label)
            per_anchor.append(batch + queue)
    return per_anchor


def fresh_meters():
    return {tag: AverageMeter() for tag in TAGS}


@pytest.mark.parametrize('queue_size', [0, 5, 40])
def test_one_step_against_a_plain_count(queue_size):
    rng = np.random.default_rng(queue_size)
    for _ in range(20):
        classes = int(rng.integers(2, 12))
        labels = rng.integers(0, classes, int(rng.integers(1, 30))).tolist()
        # a queue not yet full holds -1 in its empty rows
        queue = rng.integers(0, classes, queue_size).tolist()
        filled = int(rng.integers(0, queue_size + 1))
        queue_buffer = queue[:filled] + [-1] * (queue_size - filled)
        counter = PositiveCounter(classes, supervised=True)
        queue_tensor = torch.tensor(queue_buffer) if queue_size else None
        counts = counter.counts_of(torch.tensor(labels), queue_tensor).tolist()
        meters = fresh_meters()
        counter.update(counts, len(labels), meters)
        want = plain_positives(labels, queue[:filled])
        assert meters[TAGS[0]].avg == pytest.approx(statistics.mean(want), rel=1e-12)
        assert meters[TAGS[1]].avg == pytest.approx(np.mean([n == 0 for n in want]), abs=1e-12)
        assert meters[TAGS[0]].count == len(want) == 2 * len(labels)


def test_an_epoch_is_the_mean_over_all_its_anchors():
    rng = np.random.default_rng(1)
    counter, every_anchor = PositiveCounter(6, supervised=True, n_views=3), []
    meters = fresh_meters()
    for size in (7, 7, 7, 2):  # the last batch smaller
        labels = rng.integers(0, 6, size).tolist()
        counter.update(counter.counts_of(torch.tensor(labels)).tolist(), size, meters)
        every_anchor += plain_positives(labels, n_views=3)
    assert meters[TAGS[0]].avg == pytest.approx(statistics.mean(every_anchor), rel=1e-12)
    assert meters[TAGS[1]].avg == pytest.approx(np.mean([n == 0 for n in every_anchor]))


def test_simclr_and_hybrid_have_no_positives_besides_their_own_views():
    counter = PositiveCounter(4, supervised=False)
    counts = counter.counts_of(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1]))
    assert counts.numel() == 0  # nothing to sum over ranks
    meters = fresh_meters()
    counter.update([], 4, meters)
    assert (meters[TAGS[0]].avg, meters[TAGS[1]].avg, meters[TAGS[0]].count) == (0.0, 1.0, 8)


def test_the_queue_counts_come_from_rank_0_only():
    """Ranks hold the same queue: only rank 0 puts it into the sum over ranks."""
    counter = PositiveCounter(3, supervised=True)
    labels, queue = torch.tensor([0, 1]), torch.tensor([2, 2, -1])
    # bin 0 counts the unlabelled images (label -1), then one bin per class, then the queue's
    assert counter.counts_of(labels, queue, rank=0).tolist() == [0, 1, 1, 0, 0, 0, 2]
    assert counter.counts_of(labels, queue, rank=1).tolist() == [0, 1, 1, 0, 0, 0, 0]


def test_unlabelled_anchors_have_only_their_own_views():
    """--labelled_fraction's -1 labels: those anchors count, with no positive of their own."""
    counter = PositiveCounter(3, supervised=True)
    labels = [0, 0, -1, 1, -1, 0, 2, 2]
    meters = fresh_meters()
    counter.update(counter.counts_of(torch.tensor(labels)).tolist(), len(labels), meters)
    expected = plain_positives(labels)
    assert meters[TAGS[0]].avg == pytest.approx(statistics.mean(expected), rel=1e-12)
    assert meters[TAGS[1]].avg == pytest.approx(np.mean([n == 0 for n in expected]))
    assert meters[TAGS[0]].count == 2 * len(labels)


def test_class_counts_and_the_plain_function():
    assert class_counts(torch.tensor([2, 0, 2, 2]), 4).tolist() == [1, 0, 3, 0]
    # classes of 3, 1 and 2 images: per anchor 4, 0 and 2 positives
    mean, lonely, anchors = positive_statistics([3, 1, 2])
    assert anchors == 12
    assert mean == pytest.approx((6 * 4 + 2 * 0 + 4 * 2) / 12) and lonely == pytest.approx(2 / 12)
    assert positive_statistics([0, 0]) == (0.0, 0.0, 0)


# --------------------------------------------------------------------------- main_supcon.py

EPOCH_LINE = re.compile(
    r'^epoch (\d+), total time [0-9.]+, positives_per_anchor ([0-9.]+),'
    r' anchors_without_positive ([0-9.]+)$',
    re.M,
)


@pytest.fixture(scope='module')
def three_classes(tmp_path_factory):
    """8 training images in each of 3 classes, 8x8."""
    root = tmp_path_factory.mktemp('three')
    rng = np.random.default_rng(0)
    for name in ('a', 'b', 'c'):
        (root / name).mkdir()
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                root / name / f'{i}.png'
            )
    return root


def supcon_args(root, **changes):
    options = dict(
        dataset='path',
        data_folder=root,
        mean='(0.5,0.5,0.5)',
        std='(0.25,0.25,0.25)',
        size=8,
        model='resnet18',
        batch_size=4,
        epochs=2,
        imbalance_ratio=8,
        num_workers=0,
        device='cpu',
        seed=0,
        print_freq=100,
        learning_rate=0.01,
    )
    options.update(changes)
    return [x for k, v in options.items() for x in ((f'--{k}',) if v is True else (f'--{k}', v))]


def expected_epochs(root, epochs, batch_size, queue_size=0):
    """Each epoch's plain mean and fraction, from the seeded order of the long-tailed split
    (the queue simulated: each step enqueues the labels of its two views' keys)."""
    targets = datasets.build_dataset(
        'path', 'train', None, data_folder=root, imbalance_ratio=8, imbalance_seed=0
    ).targets
    assert np.bincount(targets).tolist() == [8, int(8 * 8**-0.5), 1]
    queue, result = [], []
    for epoch in range(1, epochs + 1):
        sampler = SeededSampler(len(targets), shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        order = [index for _, index in sampler]
        anchors = []
        for start in range(0, len(order), batch_size):
            labels = [targets[i] for i in order[start : start + batch_size]]
            anchors += plain_positives(labels, queue[-queue_size:] if queue_size else ())
            queue += labels + labels
        result.append((statistics.mean(anchors), np.mean([n == 0 for n in anchors])))
    return result


@pytest.mark.slow
@pytest.mark.parametrize('moco', [False, True])
def test_the_epoch_line_and_tensorboard_hold_the_plain_count(three_classes, tmp_path, moco):
    # with --moco two epochs: the queue carries the first epoch's labels into the second
    epochs = 2 if moco else 1
    changes = dict(moco=True, moco_k=6, moco_m=0.9) if moco else {}
    args = supcon_args(three_classes, epochs=epochs, **changes)
    result = call('main_supcon', args, tmp_path)
    assert result.code == 0, result.err
    lines = EPOCH_LINE.findall(result.out)
    assert [int(epoch) for epoch, _, _ in lines] == list(range(1, epochs + 1)), result.out
    want = expected_epochs(three_classes, epochs, 4, queue_size=6 if moco else 0)
    assert any(lonely > 0 for _, lonely in want)  # the data has anchors without positive
    for (_, mean, lonely), (want_mean, want_lonely) in zip(lines, want):
        assert (mean, lonely) == (f'{want_mean:.2f}', f'{want_lonely:.3f}')
    folder = tb_folder('main_supcon', args, tmp_path)
    for tag, column in zip(TAGS, (0, 1)):
        logged = [value for _, value in scalars(folder, tag)]
        assert logged == pytest.approx([w[column] for w in want], rel=1e-6)
    name = save_folder('main_supcon', args, tmp_path).name
    assert name.endswith('_imb8') and '_balanced' not in name


def test_simclr_prints_zero_positives_and_every_anchor_without(three_classes, tmp_path):
    args = supcon_args(three_classes, method='SimCLR', epochs=1)
    result = call('main_supcon', args, tmp_path)
    assert result.code == 0, result.err
    assert EPOCH_LINE.findall(result.out) == [('1', '0.00', '1.000')]
