"""Long-tailed digits (``--imbalance_ratio 10``): SupCon with random batches, balanced batches and
``--moco``; overall, mean per-class and few-shot linear accuracy (docs/long-tail.md).

    python benchmarks/long_tail_digits.py [--jobs 2] [--seeds 0 1 2] [--out save/long_tail_digits]
    python benchmarks/long_tail_digits.py --positives_only   # the anchors_without_positive table

The harness is benchmarks/digits_results.py's (its ``Bench.run``: one log per command, a run whose
log exists is not run again, a killed run continues with ``--resume auto``; one intra-op thread per
run). Every configuration is pretrained with main_supcon.py at the demo's settings (ResNet-18,
``--dataset digits --size 12 --amp``, cosine, 20 epochs, ``--temp 0.1``) but at ``--batch_size
32`` on the long-tailed training split, then evaluated with main_linear.py ``--aug none`` (20
epochs, lr 0.1, batch 64; it trains on the checkpoint's long-tailed split, the same images):

1. the pretraining rate (LRS, seed 0) is chosen on ``--val_split 0.2`` (the held-out 20% is cut
   from the balanced training images before the long tail, so it is balanced as the test split
   is) by the validation ``final accuracy``, ties broken by the mean per-class accuracy, then by
   the smaller rate;
2. seeds 0, 1, 2 at the chosen rate on the whole long-tailed training split, test split.

The long tail's images are drawn from each run's seed, so the seeds' spread includes the choice of
images. Reported: mean +- std (n - 1) of the final epoch's overall, mean per-class and few-shot
accuracy, and the last epoch's ``anchors_without_positive`` of pretraining.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / 'benchmarks')]

from digits_results import Bench, fmt, say  # noqa: E402

CONFIGS = {
    'random': [],
    'balanced': ['--sampler', 'balanced', '--m_per_class', '4'],
    'moco': ['--moco', '--moco_k', '512', '--moco_m', '0.99'],
}
LABELS = {
    'random': 'SupCon, random batches',
    'balanced': 'SupCon, `--sampler balanced --m_per_class 4`',
    'moco': 'SupCon, `--moco --moco_k 512 --moco_m 0.99` (random batches)',
}
LRS = (0.03, 0.1)
RATIO = 10.0
MEAN_CLASS = re.compile(r'^mean per-class accuracy: ([0-9.]+)\s*$', re.M)
GROUPS = re.compile(r'^many / medium / few-shot accuracy: (\S+) / (\S+) / (\S+)\s*$', re.M)
EPOCH_LINE = re.compile(
    r'^epoch \d+, total time [0-9.]+, positives_per_anchor ([0-9.]+),'
    r' anchors_without_positive ([0-9.]+)\s*$',
    re.M,
)


class LongTailBench(Bench):
    def __init__(self, args):  # Bench's attributes, with a tag of this benchmark's own
        self.args = args
        self.out = Path(args.out)
        self.tag = (
            f'lt{fmt(args.imbalance_ratio)}_s{args.size}_e{args.epochs}_b{args.batch_size}'
            f'_t{fmt(args.temp)}_l{args.linear_epochs}_{fmt(args.linear_lr)}_{args.linear_aug}'
        )
        self.logs = self.out / 'logs' / self.tag
        self.logs.mkdir(parents=True, exist_ok=True)
        self.common = ['--dataset', 'digits', '--size', str(args.size), '--amp']
        self.common += ['--num_workers', str(args.num_workers)]
        self.env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        for key in ('WORLD_SIZE', 'LOCAL_RANK', 'RANK', 'LOCAL_WORLD_SIZE'):
            self.env.pop(key, None)
        self.ran_seconds = 0.0

    def config_run(self, config, lr, seed, val):
        """Pretrain ``config`` at ``lr``, then the linear stage; its accuracies and statistics."""
        a = self.args
        trial = f'lt{seed}{"v" if val else ""}_{config}_{self.tag}'
        split = ['--val_split', '0.2'] if val else []
        name = f'{config}_lr{fmt(lr)}_seed{seed}' + ('_val' if val else '_test')
        pretrain = self.run(
            name + '_pretrain',
            'main_supcon.py',
            self.common
            + ['--model', 'resnet18', '--method', 'SupCon', '--batch_size', a.batch_size]
            + ['--learning_rate', fmt(lr), '--temp', fmt(a.temp), '--cosine']
            + ['--epochs', a.epochs, '--save_freq', 100000, '--print_freq', 1000]
            + ['--imbalance_ratio', fmt(a.imbalance_ratio), '--seed', seed, '--trial', trial]
            + ['--resume', 'auto']
            + CONFIGS[config]
            + split,
        )
        folder = self.one_folder(
            f'save/SupCon/digits_models/SupCon_digits_resnet18_lr_{fmt(lr)}_*_trial_{trial}_cosine*'
        )
        text = self.linear(name + '_linear', folder / 'last.pth', seed, split)
        result = self.accuracies(text, name)
        groups = GROUPS.findall(text)[-1]
        result.update(
            mean_class=float(MEAN_CLASS.findall(text)[-1]),
            many=groups[0],
            medium=groups[1],
            few=groups[2],
        )
        positives, lonely = EPOCH_LINE.findall(pretrain)[-1]
        result.update(positives_per_anchor=float(positives), anchors_without_positive=float(lonely))
        return result

    def main(self):
        a = self.args
        wall = time.time()
        todo = [(c, lr) for c in a.configs for lr in LRS]
        scores = self.pool_map([(self.config_run, c, lr, 0, True) for c, lr in todo])
        validation = {c: {} for c in a.configs}
        for (c, lr), score in zip(todo, scores):
            validation[c][lr] = score
        chosen = {
            c: max(LRS, key=lambda lr: (v[lr]['final'], v[lr]['mean_class'], -lr))
            for c, v in validation.items()
        }
        for c in a.configs:
            say(
                f'{c}: validation final / mean per-class by rate: '
                + ', '.join(
                    f'{lr}: {v["final"]:.2f} / {v["mean_class"]:.2f}'
                    for lr, v in sorted(validation[c].items())
                )
                + f' -> lr {chosen[c]}'
            )
        tests = [(c, seed) for c in a.configs for seed in a.seeds]
        results = self.pool_map([(self.config_run, c, chosen[c], s, False) for c, s in tests])
        per_seed = {c: {} for c in a.configs}
        for (c, seed), result in zip(tests, results):
            per_seed[c][seed] = result
        table = self.lt_table(validation, chosen, per_seed)
        summary = {
            'validation': {c: {str(lr): v for lr, v in vs.items()} for c, vs in validation.items()},
            'chosen_lr': chosen,
            'test': {c: {str(s): r for s, r in rs.items()} for c, rs in per_seed.items()},
            'wall_seconds_this_call': round(time.time() - wall, 1),
            'run_seconds_this_call': round(self.ran_seconds, 1),
        }
        (self.out / 'results.json').write_text(json.dumps(summary, indent=1) + '\n')
        (self.out / 'table.md').write_text(table + '\n')
        print('\n' + table)
        print(
            f'\nthis call: {summary["wall_seconds_this_call"]:.0f} s wall clock,'
            f' {self.ran_seconds:.0f} s of runs; {self.out / "results.json"} has every number'
        )

    def lt_table(self, validation, chosen, per_seed):
        def mean_std(values, digits=2):
            values = [float(v) for v in values]
            std = statistics.stdev(values) if len(values) > 1 else float('nan')
            return f'{statistics.mean(values):.{digits}f} ± {std:.{digits}f}'

        seeds = self.args.seeds
        lines = [
            '| configuration | lr (validation final % per lr) | overall top-1 % |'
            ' mean per-class % | few-shot % | positives_per_anchor / anchors_without_positive'
            ' (last epoch) | per seed overall / per-class / few |',
            '|---|---|---|---|---|---|---|',
        ]
        for c in per_seed:
            rs = [per_seed[c][s] for s in seeds]
            search = ', '.join(
                ('**{}**' if lr == chosen[c] else '{}').format(
                    f'{lr}: {validation[c][lr]["final"]:.2f}'
                )
                for lr in LRS
            )
            each = ', '.join(f'{r["final"]:.2f} / {r["mean_class"]:.2f} / {r["few"]}' for r in rs)
            lines.append(
                f'| {LABELS[c]} | {search} | {mean_std(r["final"] for r in rs)} |'
                f' {mean_std(r["mean_class"] for r in rs)} | {mean_std(r["few"] for r in rs)} |'
                f' {mean_std((r["positives_per_anchor"] for r in rs), 1)} /'
                f' {mean_std((r["anchors_without_positive"] for r in rs), 3)} | {each} |'
            )
        return '\n'.join(lines)


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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='save/long_tail_digits')
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time, one thread each')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument('--imbalance_ratio', type=float, default=RATIO)
    parser.add_argument('--size', type=int, default=12)
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--temp', type=float, default=0.1)
    parser.add_argument('--linear_epochs', type=int, default=20)
    parser.add_argument('--linear_lr', type=float, default=0.1)
    parser.add_argument('--linear_aug', default='none', choices=('none', 'simclr'))
    parser.add_argument('--num_workers', type=int, default=1)
    parser.add_argument('--positives_only', action='store_true', help='only the statistics table')
    args = parser.parse_args(argv)
    if not os.path.isabs(args.out):
        args.out = str(REPO / args.out)
    return args


if __name__ == '__main__':
    options = parse_args()
    if options.positives_only:
        print(positives_table())
    else:
        LongTailBench(options).main()
