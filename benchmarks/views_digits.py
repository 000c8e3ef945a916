"""More views per image on digits: 2 views, 4 views, 2 + 4 small views; linear top-1 and time.

    python benchmarks/views_digits.py [--seeds 0 1 2] [--jobs 2] [--nice 10]

Every configuration is the digits demo (benchmarks/digits_demo.py: ResNet-18, ``--size 12
--amp``, batch 128, lr 0.03, ``--temp 0.1 --cosine``, 20 epochs, then main_linear.py on
un-augmented images, 20 epochs, on the test split) with main_supcon.py's ``--n_views 4`` or
``--small_views 4 --small_size 6`` added; the 2-view rows are the demo itself. Runs go seed by
seed (every configuration of seed 0 first), one intra-op thread each, as the demo. The table:
per-seed and mean final top-1, mean best top-1 and the mean time per pretraining epoch.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from digits_demo import EPOCHS, LINEAR_EPOCHS, linear_args, pretrain_args  # noqa: E402

CONFIGS = {  # name: (run-name slug, main_supcon.py's extra arguments)
    '2 views': ('v2', []),
    '4 views': ('v4', ['--n_views', 4]),
    '2 + 4 small views (6 px)': ('v2_small4x6', ['--small_views', 4, '--small_size', 6]),
}


def one(sweep, args, config, seed):
    slug, extra = CONFIGS[config]
    pre = sweep.run(f'{slug}_s{seed}', 'main_supcon.py',
                    pretrain_args(seed, epochs=args.epochs) + extra)  # fmt: skip
    linear = linear_args(seed, pre.checkpoint, args.linear_epochs)
    return pre, sweep.run(f'{slug}_s{seed}_linear', 'main_linear.py', linear)


def run_sweep(args, sweep):
    jobs = [(c, s) for s in args.seeds for c in CONFIGS]
    done = dict(zip(jobs, sweep.map(lambda c, s: one(sweep, args, c, s), jobs)))
    rows = []
    for config in CONFIGS:
        runs = [(s, done[config, s]) for s in args.seeds if done.get((config, s))]
        finals = [linear['final accuracy'] for _, (_, linear) in runs]
        bests = [linear['best accuracy'] for _, (_, linear) in runs]
        times = [sum(p.epoch_times) / len(p.epoch_times) for _, (p, _) in runs]
        rows.append([
            config, ' / '.join(f'{v:.2f}' for v in finals), f'**{harness.mean_std(finals)}**',
            harness.mean_std(bests), ' / '.join(f'{t:.1f}' for t in times),
        ])  # fmt: skip
    header = ['views', 'final top-1 per seed', 'final mean ± std', 'best mean ± std']
    header += ['s / pretraining epoch per seed']
    sweep.report('More views per image (digits)', [('Test split', harness.table(header, rows))])


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=EPOCHS, help='pretraining epochs')
    parser.add_argument('--linear_epochs', type=int, default=LINEAR_EPOCHS)
    return harness.add_arguments(parser, out='save/bench/views_digits')


if __name__ == '__main__':
    harness.main(build, run_sweep)
