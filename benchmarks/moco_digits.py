"""SupCon with and without --moco at a small batch on digits: linear top-1 and time per epoch
(docs/small-batches.md).

    python benchmarks/moco_digits.py [--jobs 2] [--seeds 0 1 2] [--epochs 6] [--lrs 0.025 0.05 0.1]

Every configuration (CONFIGS) gets the same pretraining (ResNet-18, ``--dataset digits --size 8
--amp``, ``--batch_size`` 16, cosine, ``--temp 0.1``) and linear stage (batch 64, lr 0.5, cosine):

1. the pretraining rate, from ``--lrs``: seed 0, trained on the training images less a stratified
   ``--val_split``, the linear stage scored on that held-out part by its last epoch's top-1 (ties:
   the best epoch's, then the smaller rate);
2. ``--seeds`` at the chosen rate on the whole training set, scored on the test split.

Runs go round-robin over the configurations, so their epoch times are measured under the same
load; the table gives the median and range of the test runs' ``epoch N, total time T`` lines.
"""

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

CONFIGS = {
    'supcon': ('SupCon', []),
    'moco_m0.99': ('SupCon + moco m=0.99', ['--moco', '--moco_k', 1024, '--moco_m', 0.99]),
    'moco_m0.999': ('SupCon + moco m=0.999', ['--moco', '--moco_k', 1024, '--moco_m', 0.999]),
}


def config_run(sweep, args, config, lr, seed, val):
    """(pretraining Result, linear Result) of one configuration, rate and seed."""
    split = ['--val_split', args.val_split] if val else []
    name = f'{config}_lr{lr}_s{seed}' + ('_val' if val else '')
    data = ['--dataset', 'digits', '--size', 8]
    pretrain = sweep.run(
        name,
        'main_supcon.py',
        data
        + ['--model', 'resnet18', '--method', 'SupCon', '--batch_size', args.batch_size]
        + ['--learning_rate', lr, '--cosine', '--temp', 0.1, '--amp', '--epochs', args.epochs]
        + ['--save_freq', args.epochs, '--print_freq', 100000, '--num_workers', 0, '--seed', seed]
        + CONFIGS[config][1]
        + split,
    )
    linear = sweep.run(
        name + '_linear',
        'main_linear.py',
        data
        + ['--batch_size', 64, '--learning_rate', 0.5, '--cosine', '--amp']
        + ['--epochs', args.linear_epochs, '--save_freq', args.linear_epochs]
        + ['--print_freq', 100000, '--num_workers', 0, '--num_workers_val', 0, '--seed', seed]
        + ['--ckpt', pretrain.checkpoint]
        + split,
    )
    return pretrain, linear


def run_sweep(args, sweep):
    # the search, round-robin over the configurations at each rate
    search = [(c, lr) for lr in args.lrs for c in args.configs]
    found = sweep.map(lambda c, lr: config_run(sweep, args, c, lr, 0, True), search)
    validation = {c: {} for c in args.configs}
    for (c, lr), runs in zip(search, found):
        if runs is not None:
            validation[c][lr] = (runs[1]['final accuracy'], runs[1]['best accuracy'])
    chosen = {
        c: max(sorted(v), key=lambda lr, v=v: (v[lr], -lr))
        for c, v in validation.items()
        if len(v) == len(args.lrs)
    }
    tests = [(c, s) for s in args.seeds for c in args.configs if c in chosen]
    found = sweep.map(lambda c, s: config_run(sweep, args, c, chosen[c], s, False), tests)
    tested = dict(zip(tests, found))
    rows = []
    for c in args.configs:
        runs = [tested.get((c, s)) for s in args.seeds]
        finals = [r and r[1]['final accuracy'] for r in runs]
        times = [t for r in runs if r for t in r[0].epoch_times]
        search_cell = ' / '.join(f'{validation[c][lr][0]:.2f}' for lr in sorted(validation[c]))
        rows.append([
            CONFIGS[c][0], chosen.get(c, '-'), search_cell, harness.mean_std(finals),
            harness.mean_std([r and r[1]['best accuracy'] for r in runs]), harness.each(finals),
            f'{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})' if times else '-',
        ])  # fmt: skip
    header = ['config', 'lr chosen', f'val final at {" / ".join(map(str, sorted(args.lrs)))}']
    header += ['test final', 'test best-over-epochs', 'final per seed', 'sec/epoch median (range)']
    sweep.report('MoCo on small batches (digits)', [('Test split', harness.table(header, rows))])


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--configs', nargs='+', default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument('--lrs', type=float, nargs='+', default=[0.025, 0.05, 0.1])
    parser.add_argument('--epochs', type=int, default=6, help='pretraining epochs')
    parser.add_argument('--linear_epochs', type=int, default=10)
    parser.add_argument('--batch_size', type=int, default=16, help='pretraining batch size')
    parser.add_argument('--val_split', type=float, default=0.2)
    return harness.add_arguments(parser, out='save/bench/moco_digits', jobs=2)


if __name__ == '__main__':
    harness.main(build, run_sweep)
