"""demo_digits.sh over several seeds: the spread that README.md quotes.

    python benchmarks/digits_demo.py [--seeds 0 1 2] [--nice 10]

Each seed runs the demo's two commands (tests/test_benchmarks.py checks they are the ones
demo_digits.sh runs): SupCon pretraining of a ResNet-18 on ``--dataset digits`` at ``--size 12
--amp``, 20 epochs, then main_linear.py on its last.pth, 20 epochs on un-augmented images. One
intra-op thread per run, as the demo's default ``THREADS=1`` (the thread count changes the bfloat16
arithmetic a little). The table: each seed's ``best accuracy`` and ``final accuracy`` (top-1 % on
the 360 test images) and run times, and their mean ± std. The other digits benchmarks take their
settings from here.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# demo_digits.sh's settings
SIZE, BATCH, LR, TEMP, EPOCHS = 12, 128, 0.03, 0.1, 20
LINEAR_LR, LINEAR_BATCH, LINEAR_EPOCHS, LINEAR_AUG = 0.1, 64, 20, 'none'


def common(seed, size=SIZE):
    return ['--dataset', 'digits', '--model', 'resnet18', '--size', size, '--amp', '--seed', seed]


def pretrain_args(seed, method='SupCon', lr=LR, epochs=EPOCHS, batch=BATCH):
    """main_supcon.py's arguments in demo_digits.sh (its --trial naming too)."""
    trial = '0' if seed == 0 else f'seed{seed}'
    return common(seed) + [
        '--num_workers', 1, '--method', method, '--batch_size', batch, '--learning_rate', lr,
        '--temp', TEMP, '--cosine', '--epochs', epochs, '--save_freq', epochs,
        '--print_freq', 100, '--trial', trial,
    ]  # fmt: skip


def linear_args(seed, ckpt, epochs=LINEAR_EPOCHS, lr=LINEAR_LR, aug=LINEAR_AUG):
    """main_linear.py's arguments in demo_digits.sh, on ``ckpt``."""
    return common(seed) + [
        '--num_workers', 1, '--batch_size', LINEAR_BATCH, '--learning_rate', lr, '--cosine',
        '--aug', aug, '--epochs', epochs, '--print_freq', 100, '--ckpt', ckpt,
    ]  # fmt: skip


def demo(sweep, seed):
    """One seed of the demo: (pretraining Result, linear Result)."""
    pretrain = sweep.run(f'supcon_s{seed}', 'main_supcon.py', pretrain_args(seed))
    linear = sweep.run(
        f'supcon_s{seed}_linear', 'main_linear.py', linear_args(seed, pretrain.checkpoint)
    )
    return pretrain, linear


def run_sweep(args, sweep):
    done = sweep.map(lambda s: demo(sweep, s), args.seeds)
    rows, finals, bests = [], [], []
    for seed, runs in zip(args.seeds, done):
        if runs is None:
            rows.append([seed, '-', '-', '-', '-'])
            continue
        pretrain, linear = runs
        bests.append(linear['best accuracy'])
        finals.append(linear['final accuracy'])
        rows.append(
            [seed, f'{bests[-1]:.2f}', f'{finals[-1]:.2f}', f'{pretrain.seconds:.0f}',
             f'{linear.seconds:.0f}']
        )  # fmt: skip
    rows.append(['mean ± std', harness.mean_std(bests), f'**{harness.mean_std(finals)}**', '', ''])
    header = ['seed', '`best accuracy`', '`final accuracy`', 'pretraining s', 'linear s']
    sweep.report('Digits demo', [('demo_digits.sh, one seed a row', harness.table(header, rows))])


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    return harness.add_arguments(parser, out='save/bench/digits_demo')


if __name__ == '__main__':
    harness.main(build, run_sweep)
