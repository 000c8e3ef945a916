"""--sampler balanced on data whose labels are not one class per image (supcon/balanced.py):
unlabelled images (-1) spread over the epoch, every one of them seen, the labelled part of each
batch balanced over the labelled classes, exact resume; multi-hot labels refused in one line.
Once -1 was balanced as one more class (an epoch of digits at --labelled_fraction 0.3 saw 128 of
its 1292 unlabelled images) and multi-hot rows ended in a traceback."""

import collections
import signal

import numpy as np
import pytest
from inprocess import assert_one_line_error, call, save_folder
from test_csv_dataset import write_csv, write_png
from test_resume import max_abs_diff, spawn

from supcon.data.balanced import BalancedSampler

NORM = ['--mean', '(0.5,0.5,0.5)', '--std', '(0.25,0.25,0.25)']
FAST = ['--size', '8', '--num_workers', '0', '--device', 'cpu', '--seed', '0']
TRAIN = NORM + FAST + ['--model', 'resnet18', '--batch_size', '4', '--epochs', '1']


def partly_labelled(n=130, classes=5, unlabelled=0.6, seed=0):
    """Targets: a share ``unlabelled`` of -1, the rest of ``classes`` classes, unevenly."""
    rng = np.random.default_rng(seed)
    shares = np.arange(classes, 0, -1) ** 2  # class 0 the most frequent, the last the rarest
    targets = rng.choice(classes, size=n, p=shares / shares.sum())
    targets[rng.random(n) < unlabelled] = -1
    return targets.tolist()


@pytest.mark.parametrize('batch, m', [(16, 4), (12, 3), (10, 2), (8, 8)])
def test_unlabelled_images_are_spread_and_each_seen_and_the_rest_is_balanced(batch, m):
    targets = partly_labelled()
    unlabelled = {i for i, t in enumerate(targets) if t < 0}
    sampler = BalancedSampler(targets, batch, m, seed=3)
    sampler.set_epoch(2)
    batches = sampler.global_batches()
    assert len(batches) == -(-len(targets) // batch)  # as many steps as --sampler random
    seen = collections.Counter()
    for step, items in enumerate(batches):
        indices = [index for _, index in items]
        assert len(indices) == batch
        labels = collections.Counter(targets[i] for i in indices if targets[i] >= 0)
        # M images of each labelled class in the batch, and as many classes as fit
        assert set(labels.values()) <= {m}
        extra = sum(1 for i in indices if i in unlabelled)
        assert extra == batch - m * len(labels) and extra - sampler.unlabelled_per_batch[step] < m
        seen.update(i for i in indices if i in unlabelled)
    # every unlabelled image at least once an epoch, none more than twice
    assert set(seen) == unlabelled and max(seen.values()) <= 2
    # the unlabelled share of each batch follows the data's (about 60%), not one class's M
    assert sum(seen.values()) >= len(unlabelled)
    assert sum(sampler.unlabelled_per_batch) == len(unlabelled)


def test_without_unlabelled_images_the_batches_are_the_plain_balanced_ones():
    """Labelled images only: every batch is batch / M classes of M images, as before."""
    targets = [t for t in partly_labelled() if t >= 0]
    sampler = BalancedSampler(targets, 8, 2, seed=1)
    assert sampler.unlabelled_per_batch == [0] * sampler.steps
    assert sampler.classes_per_batch == [4] * sampler.steps
    for items in sampler.global_batches():
        counts = collections.Counter(targets[i] for _, i in items)
        assert len(counts) == 4 and set(counts.values()) == {2}


def test_set_start_and_two_ranks_cover_the_same_items_with_unlabelled_images():
    targets = partly_labelled(n=61)
    whole = BalancedSampler(targets, 8, 2, seed=5)
    whole.set_epoch(4)
    items = list(whole)
    whole.set_start(11)
    assert list(whole) == items[11:] and len(whole) == len(items) - 11
    ranks = [BalancedSampler(targets, 8, 2, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(4)
    shares = [list(sampler) for sampler in ranks]
    together = [
        x for step in range(whole.steps) for s in shares for x in s[4 * step : 4 * step + 4]
    ]
    assert together == items


def test_too_few_labelled_classes_for_the_labelled_part_is_refused_with_advice():
    targets = [0, 1] * 10 + [-1] * 4  # two classes; 24 images, batches of 8: 1 unlabelled each
    with pytest.raises(Exception) as info:
        BalancedSampler(targets, 8, 2, seed=0)
    message = str(info.value)
    assert 'the 7 labelled images of a --batch_size 8 batch' in message
    assert '= 3 classes per batch, but the training data has 2' in message
    assert 'raise --m_per_class to 4' in message
    BalancedSampler(targets, 8, 4, seed=0)  # the advice works


# --------------------------------------------------------------------------- the scripts


@pytest.fixture(scope='module')
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp('lists')
    for i in range(24):
        write_png(root / 'img' / f'{i}.png', i)
    rows = [[f'img/{i}.png', '' if i % 4 == 0 else 'ab'[i % 2]] for i in range(16)]
    write_csv(root / 'partly.csv', rows)  # 4 unlabelled, 6 of a, 6 of b
    write_csv(root / 'test.csv', [[f'img/{i}.png', 'ab'[i % 2]] for i in range(16, 24)])
    multi = ['a', 'b', 'a;b', 'b']
    write_csv(root / 'multi.csv', [[f'img/{i}.png', multi[i % 4]] for i in range(16)])
    write_csv(root / 'mtest.csv', [[f'img/{i}.png', multi[i % 4]] for i in range(16, 24)])
    return root


@pytest.mark.parametrize('script', ['main_supcon', 'main_ce', 'main_linear'])
def test_balanced_batches_of_multi_hot_labels_are_refused_in_one_line(lists, script):
    data = ['--dataset', 'csv', '--data_csv', 'multi.csv', '--test_csv', 'mtest.csv']
    balanced = ['--sampler', 'balanced', '--m_per_class', '2']
    args = data + TRAIN + balanced
    if script == 'main_linear':  # an encoder to evaluate, trained without the sampler
        ce = call('main_ce', data + TRAIN, lists)
        assert ce.code == 0, ce.err
        ckpt = save_folder('main_ce', data + TRAIN, lists) / 'last.pth'
        args = data + NORM + FAST + ['--batch_size', '4', '--ckpt', ckpt] + balanced
    result = call(script, args, lists)
    assert_one_line_error(
        result, '--sampler balanced fills a batch', 'rows with several labels; drop --sampler'
    )


@pytest.mark.slow
def test_sigterm_mid_epoch_and_resume_equal_the_uninterrupted_run(lists, tmp_path):
    """A partly labelled CSV, balanced batches of 1 class x 2 labelled images and 2 unlabelled
    ones (of 4): killed in epoch 2 and resumed, the same weights as without the kill."""
    args = ['--dataset', 'csv', '--data_csv', lists / 'partly.csv', *NORM, *FAST]
    args += ['--model', 'resnet18', '--batch_size', '4', '--epochs', '2', '--sampler', 'balanced']
    args += ['--m_per_class', '2', '--print_freq', '1']
    reference_cwd = tmp_path / 'uninterrupted'
    reference_cwd.mkdir()
    done = call('main_supcon', args, reference_cwd)
    assert done.code == 0, done.err
    reference = save_folder('main_supcon', args, reference_cwd) / 'last.pth'

    proc = spawn('main_supcon', args, tmp_path)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith('Train: [2][2/'):  # mid-epoch 2
            proc.send_signal(signal.SIGTERM)
            break
    output.append(proc.stdout.read())
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == 128 + signal.SIGTERM, ''.join(output)
    result = call('main_supcon', args + ['--resume', 'auto'], tmp_path)
    assert result.code == 0, result.err
    assert 'continuing at epoch 2, step ' in result.out
    assert max_abs_diff(reference, save_folder('main_supcon', args, tmp_path) / 'last.pth') == 0
