"""Partial and multiple labels on digits: the measurement of docs/labels.md.

    python benchmarks/partial_labels.py [--jobs 2] [--seeds 0 1 2] [--stages search grid multi]

Partial labels (``--dataset digits``, ``--labelled_fraction`` F in FRACTIONS), three pretrainings,
each followed by main_linear.py on the same labelled images (F of the training images, stratified,
chosen by the seed; the SimCLR encoders get them with ``main_linear.py --labelled_fraction F``):

- ``partial``: SupCon on every image, the labels of F kept, the rest unlabelled (-1);
- ``simclr``: SimCLR on every image (no labels; one pretraining a seed serves every F);
- ``labonly``: SupCon on the labelled images alone (``--labelled_only``), for ``--epochs`` / F
  epochs so that it sees as many images as the others, in batches of BATCH_LABONLY (F = 0.1 of the
  search's training part is fewer images than BATCH).

Stage ``search`` chooses each method's rate from SEARCH: seed 0, the smallest F, both stages on the
training images less a stratified 20% (``--val_split 0.2``), scored by the linear ``final
accuracy`` on that 20% (ties: the smaller rate); without it the rates are RATES, the ones it chose
on 2026-12-01. Stage ``grid``: every method, F and seed on the whole training split, scored on the
test split. Stage ``multi``: the two-digit CSV set (``benchmarks/two_digits_csv.py``, built as a
run of its own) at ``--size`` MULTI_SIZE, SupCon ``--multilabel any`` and ``jaccard`` and SimCLR at
the rates of ``partial`` and ``simclr``, scored by the linear ``final mean average precision``.
Runs go seed by seed, so a call stopped early holds every comparison at the first seeds.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

FRACTIONS = (0.1, 0.3)
SIZE, EPOCHS, BATCH, TEMP = 8, 6, 128, 0.1
BATCH_LABONLY = 64  # F = 0.1 of the 1149 images of the search's training part is 115 images
LINEAR = ['--epochs', 20, '--learning_rate', 0.1, '--batch_size', 64, '--aug', 'none', '--cosine']
RATES = {'partial': 0.01, 'labonly': 0.01, 'simclr': 0.003}  # the search's choice, 2026-12-01
SEARCH = {
    'partial': (0.01, 0.03, 0.1),
    'labonly': (0.01, 0.03, 0.1),
    'simclr': (0.001, 0.003, 0.01),
}
MULTI = {'any': 'partial', 'jaccard': 'partial', 'simclr': 'simclr'}  # rate taken from
MULTI_SIZE = 12  # each digit of the two is 6 pixels wide then (the digits themselves are 8x8)


def pretrain_and_probe(sweep, name, data, pretrain, linear, seed, val, batch=BATCH, pname=None):
    """Pretraining (run ``pname``, shared by jobs that name it) then the linear stage; the
    linear stage's Result."""
    split = ['--val_split', 0.2] if val else []
    tail = ['--seed', seed, '--num_workers', 0, '--print_freq', 1000]
    common = ['--model', 'resnet18', '--amp', '--cosine', '--batch_size', batch, '--temp', TEMP]
    common += ['--save_freq', 100000]
    done = sweep.run(pname or name, 'main_supcon.py', data + common + pretrain + tail + split)
    linear = data + ['--amp', '--ckpt', done.checkpoint] + LINEAR + linear + tail + split
    return sweep.run(f'{name}_linear', 'main_linear.py', linear)


def partial_run(sweep, epochs, method, fraction, lr, seed, val=False):
    data = ['--dataset', 'digits', '--size', SIZE]
    epochs = round(epochs / fraction) if method == 'labonly' else epochs
    pretrain, linear = ['--learning_rate', lr, '--epochs', epochs], []
    if method == 'simclr':
        pretrain += ['--method', 'SimCLR']
        linear = ['--labelled_fraction', fraction]
    else:
        pretrain += ['--labelled_fraction', fraction]
        pretrain += ['--labelled_only'] if method == 'labonly' else []
    split = '_val' if val else ''
    name = f'{method}_F{fraction}_lr{lr}_s{seed}{split}'
    # SimCLR reads no labels: one pretraining serves every F
    pname = f'simclr_lr{lr}_s{seed}{split}' if method == 'simclr' else name
    batch = BATCH_LABONLY if method == 'labonly' else BATCH
    result = pretrain_and_probe(sweep, name, data, pretrain, linear, seed, val, batch, pname)
    return result['final accuracy']


def multi_run(sweep, epochs, rule, lr, seed):
    folder = sweep.out / 'two_digits'
    build = ['--out', folder]
    sweep.run('two_digits', 'benchmarks/two_digits_csv.py', build, resume=False)
    mean, std = (folder / 'mean_std.txt').read_text().split('\n')[:2]
    data = ['--dataset', 'csv', '--data_csv', folder / 'train.csv', '--test_csv']
    data += [folder / 'test.csv', '--mean', mean, '--std', std, '--size', MULTI_SIZE]
    pretrain = ['--learning_rate', lr, '--epochs', epochs]
    pretrain += ['--method', 'SimCLR'] if rule == 'simclr' else ['--multilabel', rule]
    name = f'multi_{rule}_lr{lr}_s{seed}'
    result = pretrain_and_probe(sweep, name, data, pretrain, [], seed, False)
    return result['final mean average precision']


def run_sweep(args, sweep):
    chosen, sections = dict(RATES), []

    def grid(method, fraction, seed):
        return partial_run(sweep, args.epochs, method, fraction, chosen[method], seed)

    def multi(rule, seed):
        return multi_run(sweep, args.epochs, rule, chosen[MULTI[rule]], seed)

    if 'search' in args.stages:

        def choose(method):
            score = lambda lr: partial_run(sweep, args.epochs, method, FRACTIONS[0], lr, 0, True)  # noqa: E731
            return sweep.choose_rate(score, SEARCH[method])

        found = dict(zip(SEARCH, sweep.map(choose, list(SEARCH))))
        if None in found.values():  # no grid at rates the search has not chosen
            raise harness.NotRun('the rate search is not finished')
        rows = []
        for m, (lr, scores) in found.items():
            chosen[m] = lr
            rows.append([m, ', '.join(f'{r}: {v:.2f}' for r, v in sorted(scores.items())), lr])
        title = f'Rates (validation, F = {FRACTIONS[0]}, seed 0)'
        sections.append((title, harness.table(['method', 'final % per rate', 'chosen'], rows)))
    jobs, keys = [], []
    for s in args.seeds:  # seed by seed: a call stopped early has every comparison
        if 'grid' in args.stages:
            for f in FRACTIONS:
                jobs += [(grid, m, f, s) for m in RATES]
                keys += [('grid', m, f, s) for m in RATES]
        if 'multi' in args.stages:
            jobs += [(multi, r, s) for r in MULTI]
            keys += [('multi', r, None, s) for r in MULTI]
    scores = dict(zip(keys, sweep.map(lambda job, *item: job(*item), jobs)))

    def cell(stage, key, f):
        values = [scores.get((stage, key, f, s)) for s in args.seeds]
        return f'{harness.each(values)}: **{harness.mean_std(values)}**'

    if 'grid' in args.stages:
        header = ['pretraining'] + [
            f'F = {f}, seeds {harness.each(args.seeds, 0)}' for f in FRACTIONS
        ]
        rows = [[f'{m} (lr {chosen[m]})'] + [cell('grid', m, f) for f in FRACTIONS] for m in RATES]
        sections.append(
            ('Partial labels, linear top-1 % (test split)', harness.table(header, rows))
        )
    if 'multi' in args.stages:
        rows = [[r, cell('multi', r, None)] for r in MULTI]
        table = harness.table(['pretraining', 'final mean average precision'], rows)
        sections.append(('Two-digit multi-label set', table))
    sweep.report('Partial and multiple labels (digits)', sections)


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=EPOCHS, help='pretraining epochs')
    parser.add_argument(
        '--stages', nargs='+', default=['grid', 'multi'], choices=('search', 'grid', 'multi')
    )
    return harness.add_arguments(parser, out='save/bench/partial_labels', jobs=2)


if __name__ == '__main__':
    harness.main(build, run_sweep)
