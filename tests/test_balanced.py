"""balanced.py: class-balanced batches (--sampler balanced --m_per_class M) on 1 and 2 ranks,
resumed mid-epoch to the same weights, and the one-line refusals."""

import collections
import math
import signal

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from inprocess import assert_one_line_error, call, save_folder
from test_positives import plain_positives
from test_resume import Runs, max_abs_diff, scalars, spawn, tb_folder

from supcon.data.balanced import BalancedSampler
from supcon.data.sampling import SeededSampler, build_loader
from supcon.evaluation import classify
from supcon.objectives.positives import TAGS, PositiveCounter
from supcon.system import runtime
from util import AverageMeter

# a long tail: 9 classes of 40 down to 1 image (fewer than M for the last ones)
TAIL = [c for c, n in enumerate([40, 25, 14, 9, 6, 4, 3, 2, 1]) for _ in range(n)]


def epoch_batches(targets, batch, m, epoch=1, seed=0, world_size=1):
    """Global batches of (sample_seed, index), put together from every rank's share."""
    samplers = [
        BalancedSampler(targets, batch, m, seed=seed, rank=r, world_size=world_size)
        for r in range(world_size)
    ]
    shares = []
    for sampler in samplers:
        sampler.set_epoch(epoch)
        items = list(sampler)
        assert len(items) == len(sampler)
        shares.append(items)
    local = batch // world_size
    steps = len(shares[0]) // local
    return [sum((share[s * local : (s + 1) * local] for share in shares), []) for s in range(steps)]


@pytest.mark.parametrize('batch, m', [(8, 4), (12, 2), (9, 1), (16, 8)])
def test_every_global_batch_holds_m_images_of_each_of_its_classes(batch, m):
    for epoch in (1, 2):
        batches = epoch_batches(TAIL, batch, m, epoch=epoch)
        assert len(batches) == math.ceil(len(TAIL) / batch)  # as many steps as random
        appearances = collections.Counter()
        for items in batches:
            labels = collections.Counter(TAIL[i] for _, i in items)
            assert len(items) == batch and len(labels) == batch // m
            assert set(labels.values()) == {m}
            appearances.update(labels.keys())
            assert len({seed for seed, _ in items}) == batch  # repeats augmented differently
        # classes come up in turn: a rare class as often as a common one
        assert max(appearances.values()) - min(appearances.get(c, 0) for c in range(9)) <= 1
    # the one image of class 8 repeats; class 0's images cycle before any repeats
    batches = epoch_batches(TAIL, 16, 8)
    images_of = collections.defaultdict(list)
    for items in batches:
        for _, i in items:
            images_of[TAIL[i]].append(i)
    assert set(images_of[8]) == {len(TAIL) - 1}
    first = images_of[0][:40]
    assert len(set(first)) == len(first)


def test_order_depends_on_seed_and_epoch_and_two_ranks_share_one_global_batch():
    one = epoch_batches(TAIL, 8, 2, epoch=3)
    assert one == epoch_batches(TAIL, 8, 2, epoch=3)
    assert one != epoch_batches(TAIL, 8, 2, epoch=4) and one != epoch_batches(TAIL, 8, 2, seed=1)
    # two ranks: each takes half of every global batch, which is the one-process batch
    assert epoch_batches(TAIL, 8, 2, epoch=3, world_size=2) == one
    assert epoch_batches(TAIL, 8, 2, epoch=3, world_size=4) == one
    # and as many steps on every rank as the random sampler gives
    for world_size in (1, 2, 4):
        random = SeededSampler(len(TAIL), shuffle=True, seed=0, world_size=world_size)
        sampler = BalancedSampler(TAIL, 8, 2, seed=0, world_size=world_size)
        assert len(sampler) // (8 // world_size) == math.ceil(len(random) / (8 // world_size))


def test_set_start_resumes_the_same_items():
    sampler = BalancedSampler(TAIL, 8, 4, seed=5, rank=1, world_size=2)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_start(8)  # after two steps of 4 items on this rank
    assert list(sampler) == full[8:] and len(sampler) == len(full) - 8
    sampler.set_start(0)
    assert list(sampler) == full


# --------------------------------------------------------------------------- 2 gloo ranks


class LabelledIndices(torch.utils.data.Dataset):
    """Item i is (i, its label): the batches say which images they hold."""

    def __init__(self, targets):
        self.targets, self.classes = list(targets), sorted(set(targets))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return index, self.targets[index]


QUEUE = torch.tensor([0, 0, 3, 8, -1, -1])  # the same on every rank, as a --moco queue is


def run_epoch(rank, world_size):
    """One epoch of the training loader and of main_supcon's statistics; then validate's
    per-class counts of a fixed classifier. Returns (global batches, the two means, counts)."""
    rt = runtime.Runtime(device=torch.device('cpu'), rank=rank, world_size=world_size)
    dataset = LabelledIndices(TAIL)
    sampler = BalancedSampler(TAIL, 8, 2, seed=3, rank=rank, world_size=world_size)
    loader, _ = build_loader(
        dataset, 8 // world_size, shuffle=True, seed=3, rank=rank, world_size=world_size,
        sampler=sampler,
    )  # fmt: skip
    sampler.set_epoch(1)
    counter, meters = PositiveCounter(9, supervised=True), {tag: AverageMeter() for tag in TAGS}
    batches = []
    for indices, labels in loader:
        counts = counter.counts_of(labels, QUEUE, rank)
        n, *summed, _ = runtime.step_statistics(rt, len(labels), counts, False)
        counter.update(summed, n, meters)
        if world_size > 1:
            shares = [None] * world_size
            dist.all_gather_object(shares, indices.tolist())
            batches.append(sum(shares, []))
        else:
            batches.append(indices.tolist())
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(TAIL), 5, generator=generator)
    torch.manual_seed(0)
    classifier = nn.Linear(5, 9).eval()
    test_set = torch.utils.data.TensorDataset(features, torch.tensor(TAIL))
    test_loader, _ = build_loader(
        test_set, 7, shuffle=False, seed=0, rank=rank, world_size=world_size, pad=False
    )
    opt = type('Opt', (), {'print_freq': 1000})()
    *_, per_class = classify.validate(
        test_loader, classifier, nn.CrossEntropyLoss(), opt, rt, 9, per_class=True
    )
    return batches, [meters[tag].avg for tag in TAGS], per_class


def _worker(rank, world):
    return run_epoch(rank, world)


@pytest.mark.filterwarnings('ignore:This process .* is multi-threaded:DeprecationWarning')
def test_two_gloo_ranks_hold_the_one_process_batches_statistics_and_class_counts(gloo_ranks):
    batches, means, per_class = gloo_ranks(_worker)[0]
    one_batches, one_means, one_per_class = run_epoch(0, 1)
    assert batches == one_batches and len(batches) == math.ceil(len(TAIL) / 8)
    for batch in batches:  # 4 classes x 2 images in every global batch
        assert sorted(collections.Counter(TAIL[i] for i in batch).values()) == [2, 2, 2, 2]
    # the statistics of the global batches, the queue counted once (not once per rank)
    anchors = sum((plain_positives([TAIL[i] for i in b], QUEUE[QUEUE >= 0]) for b in batches), [])
    want = [np.mean(anchors), np.mean([n == 0 for n in anchors])]
    assert means == pytest.approx(want, rel=1e-12) and one_means == pytest.approx(want, rel=1e-12)
    # per-class counts summed over the ranks' unequal shares: each test image once
    assert per_class == one_per_class
    assert per_class[1] == np.bincount(TAIL).tolist()


# --------------------------------------------------------------------------- the scripts


@pytest.fixture(scope='module')
def runs(tmp_path_factory, images):
    return Runs(tmp_path_factory.mktemp('balanced_runs'), images)


def script_args(runs, script, **changes):
    """``runs.args`` without the options set to None; main_linear.py with a --ckpt that does
    not exist (the refusals come before it is read)."""
    args = [str(a) for a in runs.args('main_ce' if script == 'main_linear' else script, **changes)]
    if script == 'main_linear':
        args += ['--ckpt', 'never-read.pth']
    pairs = [
        (flag, value)
        for flag, value in zip(args, args[1:] + [''])
        if flag.startswith('--') and not (flag == '--model' and script == 'main_linear')
    ]
    kept = []
    for flag, value in pairs:
        if value == 'None':
            continue
        kept += [flag] if value.startswith('--') or value == '' else [flag, value]
    return kept


BALANCED = dict(sampler='balanced', m_per_class=2, imbalance_ratio=4, moco=True, moco_k=6, epochs=2)


@pytest.mark.slow
def test_sigterm_mid_epoch_and_resume_equal_the_uninterrupted_balanced_run(runs, tmp_path):
    """Two classes of 8 training images cut to 8 and 2 (--imbalance_ratio 4), batches of
    2 x 2, with --moco: the same weights, queue and logged statistics after a resume."""
    script = 'main_supcon'
    args = runs.args(script, **BALANCED)
    reference_cwd = tmp_path / 'uninterrupted'
    reference_cwd.mkdir()
    assert call(script, args, reference_cwd).code == 0
    reference = save_folder(script, args, reference_cwd) / 'last.pth'
    assert save_folder(script, args, tmp_path).name.endswith('_moco_k6_m0.999_balanced_m2_imb4')

    proc = spawn(script, runs.args(script, print_freq=1, **BALANCED), tmp_path)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith('Train: [2][1/'):  # mid-epoch 2, after a finished epoch
            proc.send_signal(signal.SIGTERM)
            break
    output.append(proc.stdout.read())
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == 128 + signal.SIGTERM, ''.join(output)

    result = call(script, args + ['--resume', 'auto'], tmp_path)
    assert result.code == 0, result.err
    assert 'continuing at epoch ' in result.out and ', step ' in result.out
    resumed = save_folder(script, args, tmp_path) / 'last.pth'
    assert max_abs_diff(reference, resumed) == 0
    for tag in ('loss',) + TAGS:
        got = scalars(tb_folder(script, args, tmp_path), tag)
        assert got == scalars(tb_folder(script, args, reference_cwd), tag), tag
        assert [step for step, _ in got] == [1, 2]

    # a run of balanced batches resumes only with balanced batches
    random = script_args(runs, script, **dict(BALANCED, sampler='random', m_per_class=None))
    result = call(script, random + ['--resume', resumed], tmp_path)
    assert_one_line_error(result, '--sampler random differs from the run\'s balanced')


@pytest.mark.parametrize(
    'script, changes, fragments',
    [
        ('main_supcon', dict(sampler='balanced', m_per_class=3), ['--batch_size 4', '3 divides']),
        ('main_ce', dict(m_per_class=2), ['--m_per_class only acts with --sampler balanced']),
        ('main_linear', dict(sampler='balanced', m_per_class=0), ['--m_per_class must be 1']),
        (
            'main_ce',
            dict(sampler='balanced', m_per_class=1),
            ['4 classes per batch', 'has 2', 'raise --m_per_class to 2'],
        ),
    ],
)
def test_batches_that_cannot_be_balanced_are_refused_in_one_line(
    runs, tmp_path, script, changes, fragments
):
    result = call(script, script_args(runs, script, **changes), tmp_path)
    assert_one_line_error(result, *fragments)
    assert not list(tmp_path.rglob('*.pth'))
