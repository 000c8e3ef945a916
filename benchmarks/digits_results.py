"""SupCon, SimCLR and cross-entropy on digits at the demo's settings, rates chosen on a validation
split (docs/results.md, "Digits").

    python benchmarks/digits_results.py [--jobs 2] [--seeds 0 1 2] [--rates SupCon=0.03 ...]

Every method trains a ResNet-18 for the same epochs at demo_digits.sh's settings (``--size 12
--amp``, batch 128, cosine; benchmarks/digits_demo.py holds them). SupCon and SimCLR are
pretrained with main_supcon.py (``--temp 0.1``), then main_linear.py trains a linear classifier on
the frozen encoder (the demo's: 20 epochs, lr 0.1, ``--aug none``); cross-entropy is main_ce.py
with its own classifier, and its encoder also gets the same linear stage ("cross-entropy encoder +
linear": the three encoders under one protocol).

1. Each method's rate: seed 0, trained on the training images less a stratified 20%
   (``--val_split 0.2`` in both stages), scored on that 20% by the last epoch's top-1 (ties: the
   best epoch's, then the smaller rate); the test split is never read. The rates START are tried,
   and while the best is at an edge the next rate of LADDER beyond it (at most 3 more).
   ``--rates METHOD=LR`` skips the search for that method.
2. ``--seeds`` at the chosen rate on the whole training set, scored on the test split.

``--tsne`` then redraws figures/tsne_digits_*.png from the first seed's encoders.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from digits_demo import (  # noqa: E402
    BATCH,
    EPOCHS,
    LINEAR_EPOCHS,
    SIZE,
    common,
    linear_args,
    pretrain_args,
)

METHODS = ('SupCon', 'SimCLR', 'CE')
LABELS = {'SupCon': 'SupCon + linear', 'SimCLR': 'SimCLR + linear', 'CE': 'cross-entropy'}
TSNE = {'SupCon': 'SupCon', 'SimCLR': 'SimCLR', 'CE': 'SupCE'}
START = (0.03, 0.1, 0.3)
LADDER = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
VAL = ['--val_split', 0.2]


def method_run(sweep, args, method, lr, seed, val):
    """{'net': Result of the method's own classifier (linear stage or main_ce),
    'linear': Result of the linear stage, 'pretrain': Result of the encoder's training}."""
    split = VAL if val else []
    name = f'{method}_lr{lr}_s{seed}' + ('_val' if val else '')
    if method == 'CE':
        ce_args = common(seed) + ['--num_workers', 1, '--batch_size', BATCH, '--learning_rate', lr]
        ce_args += ['--cosine', '--epochs', args.epochs, '--save_freq', args.epochs]
        pretrain = sweep.run(name, 'main_ce.py', ce_args + ['--print_freq', 100] + split)
        if val:
            return {'net': pretrain, 'pretrain': pretrain}
    else:
        pretrain = sweep.run(
            name, 'main_supcon.py', pretrain_args(seed, method, lr, args.epochs) + split
        )
    linear = sweep.run(
        name + '_linear',
        'main_linear.py',
        linear_args(seed, pretrain.checkpoint, args.linear_epochs) + split,
    )
    own = pretrain if method == 'CE' else linear
    return {'net': own, 'linear': linear, 'pretrain': pretrain}


def choose(sweep, args, method):
    """(chosen rate, {rate: (final, best)} on the validation split)."""
    given = dict(args.rates)
    if method in given:
        return given[method], {}

    def score(lr):
        net = method_run(sweep, args, method, lr, 0, True)['net']
        return net['final accuracy'], net['best accuracy']

    return sweep.choose_rate(score, START, LADDER, max_extensions=3)


def method_job(sweep, args, method):
    """(rate, validation scores, the seeds' runs) of one method: its search, then its seeds, which
    start as soon as its own rate is chosen."""
    lr, scores = choose(sweep, args, method)
    runs = sweep.map(lambda s: method_run(sweep, args, method, lr, s, False), args.seeds)
    return lr, scores, runs


def run_sweep(args, sweep):
    done = dict(zip(args.methods, sweep.map(lambda m: method_job(sweep, args, m), args.methods)))
    methods = [m for m in args.methods if done[m] is not None]
    runs = {(m, s): r for m in methods for s, r in zip(args.seeds, done[m][2])}
    rows = []
    for m in methods:
        lr, scores, _ = done[m]
        search = ', '.join(
            ('**{}: {:.2f}**' if r == lr else '{}: {:.2f}').format(r, scores[r][0])
            for r in sorted(scores)
        )
        rows.append(row(LABELS[m], search or f'{lr} (given)', m, 'net', runs, args.seeds))
        if m == 'CE':
            rows.append(
                row('cross-entropy encoder + linear', 'the encoders above', m, 'linear', runs,
                    args.seeds)
            )  # fmt: skip
    header = ['method', 'lr (validation final top-1 % per rate)', 'final top-1 %, mean ± std']
    header += ['best over epochs % (chosen on test)', 'per seed final / best']
    sweep.report('Digits results', [('Test split', harness.table(header, rows))])
    if args.tsne:
        for m in methods:
            result = runs[m, args.seeds[0]]
            if result is not None:
                figure = harness.REPO / 'figures' / f'tsne_digits_{TSNE[m]}.png'
                tsne = ['--dataset', 'digits', '--size', SIZE, '--max_samples', 360]
                tsne += ['--num_workers', 0, '--ckpt', result['pretrain'].checkpoint]
                sweep.run(f'tsne_{m}', 'main_tsne.py', tsne + ['--out', figure])


def row(label, search, method, stage, runs, seeds):
    results = [runs[method, s] and runs[method, s][stage] for s in seeds]
    finals = [r and r['final accuracy'] for r in results]
    bests = [r and r['best accuracy'] for r in results]
    per_seed = ', '.join('-' if r is None else f'{f:.2f} / {b:.2f}' for r, f, b in
                         zip(results, finals, bests))  # fmt: skip
    return [label, search, harness.mean_std(finals), harness.mean_std(bests), per_seed]


def rates(text):
    method, _, lr = text.partition('=')
    if method not in METHODS or not lr:
        raise argparse.ArgumentTypeError(f'{text}: give METHOD=RATE, METHOD one of {METHODS}')
    return method, float(lr)


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--rates', type=rates, nargs='+', default=[], help='METHOD=RATE, no search')
    parser.add_argument('--epochs', type=int, default=EPOCHS)
    parser.add_argument('--linear_epochs', type=int, default=LINEAR_EPOCHS)
    parser.add_argument('--tsne', action='store_true', help='redraw figures/tsne_digits_*.png')
    return harness.add_arguments(parser, out='save/bench/digits_results', jobs=2)


if __name__ == '__main__':
    harness.main(build, run_sweep)
