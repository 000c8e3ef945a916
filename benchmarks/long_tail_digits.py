"""Long-tailed digits (``--imbalance_ratio 10``): SupCon with random batches, balanced batches and
``--moco``; overall, mean per-class and few-shot linear accuracy (docs/long-tail.md).

    python benchmarks/long_tail_digits.py [--jobs 2] [--seeds 0 1 2]
    python benchmarks/long_tail_digits.py --positives_only   # the anchors_without_positive table

Every configuration is pretrained with main_supcon.py at the demo's settings (benchmarks/
digits_demo.py: ResNet-18, ``--size 12 --amp``, cosine, 20 epochs, ``--temp 0.1``) but at
``--batch_size 32`` on the long-tailed training split, then evaluated by the demo's linear stage
(it trains on the checkpoint's long-tailed split, the same images):

1. the pretraining rate (LRS, seed 0) is chosen on ``--val_split 0.2`` (the held-out 20% is cut
   from the balanced training images before the long tail, so it is balanced as the test split
   is) by the validation ``final accuracy``, ties broken by the mean per-class accuracy, then by
   the smaller rate;
2. ``--seeds`` at the chosen rate on the whole long-tailed training split, test split.

The long tail's images are drawn from each run's seed, so the seeds' spread includes the choice of
images. Reported: mean +- std (n - 1) of the final epoch's overall, mean per-class and few-shot
accuracy, and the last epoch's ``anchors_without_positive`` of pretraining.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), os.path.dirname(os.path.abspath(__file__))]
import harness  # noqa: E402
from digits_demo import linear_args, pretrain_args  # noqa: E402

CONFIGS = {
    'random': [],
    'balanced': ['--sampler', 'balanced', '--m_per_class', 4],
    'moco': ['--moco', '--moco_k', 512, '--moco_m', 0.99],
}
LABELS = {
    'random': 'SupCon, random batches',
    'balanced': 'SupCon, `--sampler balanced --m_per_class 4`',
    'moco': 'SupCon, `--moco --moco_k 512 --moco_m 0.99` (random batches)',
}
LRS = (0.03, 0.1)
RATIO = 10.0
FEW = 'many / medium / few-shot accuracy'


def config_run(sweep, args, config, lr, seed, val):
    """(pretraining Result, linear Result) of one configuration, rate and seed."""
    split = ['--val_split', 0.2] if val else []
    name = f'{config}_lr{lr}_s{seed}' + ('_val' if val else '')
    pretrain = pretrain_args(seed, 'SupCon', lr, args.epochs, args.batch_size)
    pretrain += ['--imbalance_ratio', args.imbalance_ratio] + CONFIGS[config] + split
    pretrain = sweep.run(name, 'main_supcon.py', pretrain)
    linear = linear_args(seed, pretrain.checkpoint, args.linear_epochs) + split
    return pretrain, sweep.run(name + '_linear', 'main_linear.py', linear)


def choose(sweep, args, config):
    def score(lr):
        linear = config_run(sweep, args, config, lr, 0, True)[1]
        return linear['final accuracy'], linear['mean per-class accuracy']

    return sweep.choose_rate(score, LRS)


def config_job(sweep, args, config):
    """(rate, validation scores, the seeds' runs): the search, then the seeds at its rate."""
    lr, scores = choose(sweep, args, config)
    runs = sweep.map(lambda s: config_run(sweep, args, config, lr, s, False), args.seeds)
    return lr, scores, runs


def run_sweep(args, sweep):
    if args.positives_only:
        print(positives_table())
        return
    done = dict(zip(args.configs, sweep.map(lambda c: config_job(sweep, args, c), args.configs)))
    configs = [c for c in args.configs if done[c] is not None]
    choices = {c: done[c][:2] for c in configs}
    runs = {(c, s): r for c in configs for s, r in zip(args.seeds, done[c][2])}
    rows = []
    for c in configs:
        lr, scores = choices[c]
        search = ', '.join(
            ('**{}: {:.2f}**' if r == lr else '{}: {:.2f}').format(r, scores[r][0])
            for r in sorted(scores)
        )
        tested = [runs[c, s] for s in args.seeds]
        overall = [r and r[1]['final accuracy'] for r in tested]
        per_class = [r and r[1]['mean per-class accuracy'] for r in tested]
        few = [r and r[1][FEW][2] for r in tested]
        last = [r and r[0].epochs[max(r[0].epochs)] for r in tested]
        positives = harness.mean_std([e and e['positives_per_anchor'] for e in last], 1)
        lonely = harness.mean_std([e and e['anchors_without_positive'] for e in last], 3)
        each = ', '.join(harness.each(v) for v in zip(overall, per_class, few))
        rows.append([
            LABELS[c], search, harness.mean_std(overall), harness.mean_std(per_class),
            harness.mean_std(few), f'{positives} / {lonely}', each,
        ])  # fmt: skip
    header = ['configuration', 'lr (validation final % per rate)', 'overall top-1 %']
    header += ['mean per-class %', 'few-shot %', 'positives_per_anchor / anchors_without_positive']
    header += ['per seed overall / per-class / few']
    sweep.report('Long-tailed digits', [('Test split', harness.table(header, rows))])


def positives_table(draws=2000, seed=0):
    """anchors_without_positive of random batches (supcon.objectives.positives), no training:
    uniform labels
    over 10 and 100 classes, and the long-tailed digits training split (--imbalance_ratio 10,
    seed 0) with random and with balanced batches; plain SupCon, 2 views, no queue."""
    from supcon.data.balanced import BalancedSampler
    from supcon.data.datasets import build_dataset
    from supcon.objectives.positives import positive_statistics

    rng = np.random.default_rng(seed)

    def mean_lonely(batches, num_classes):
        fractions = []
        for labels in batches:
            counts = np.bincount(labels, minlength=num_classes)
            fractions.append(positive_statistics(counts)[1])
        return float(np.mean(fractions))

    digits = build_dataset('digits', 'train', None, imbalance_ratio=RATIO, imbalance_seed=0)
    targets = np.asarray(digits.targets)
    rows = []
    for batch in (16, 64, 256):
        row = [batch]
        for classes in (10, 100):
            measured = mean_lonely(rng.integers(0, classes, (draws, batch)), classes)
            expected = (1 - 1 / classes) ** (batch - 1)  # P(no other image of one's class)
            row.append(f'{measured:.4f} ({expected:.4f})')
        lt_random = [rng.choice(targets, batch, replace=False) for _ in range(draws)]
        row.append(f'{mean_lonely(lt_random, 10):.4f}')
        # --m_per_class 4, or the smallest that fits 10 classes (what the refusal suggests)
        m = min(k for k in range(4, batch + 1) if batch % k == 0 and batch // k <= 10)
        sampler = BalancedSampler(targets, batch, m, seed=seed)
        sampled = [[targets[i] for _, i in b] for b in sampler.global_batches()]
        row.append(f'{mean_lonely(sampled, 10):.4f} (m={m})')
        rows.append(row)
    lines = [
        f'| batch | 10 classes, uniform (expected) | 100 classes, uniform (expected) |'
        f' digits-LT ({len(targets)} images), random | digits-LT, balanced |',
        '|---|---|---|---|---|',
    ]
    lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument('--imbalance_ratio', type=float, default=RATIO)
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--linear_epochs', type=int, default=20)
    parser.add_argument('--positives_only', action='store_true', help='only the statistics table')
    return harness.add_arguments(parser, out='save/bench/long_tail_digits', jobs=2)


if __name__ == '__main__':
    harness.main(build, run_sweep)
