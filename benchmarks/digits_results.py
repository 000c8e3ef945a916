"""The digits comparison of README.md "Results": SupCon, SimCLR and cross-entropy, equal epochs.

    python benchmarks/digits_results.py [--jobs 2] [--seeds 0 1 2] [--out save/digits_results]
    bash benchmarks/digits_results.sh            # the same, what README.md quotes

For each method, in this order:

1. a learning-rate search: one run (seed 0) per rate, trained on the training images less a
   stratified 20% (``--val_split 0.2``) and scored on that held-out 20%; the test split is never
   read. The score is the ``final accuracy`` (the last epoch's linear top-1; for cross-entropy the
   network's own top-1). Every method starts from the same three rates, START (steps of about 3x
   on LADDER); while the best rate is the smallest or the largest one tried, the next rate of
   LADDER beyond it is tried too (at most MAX_EXTENSIONS more), so that a winner at the edge of
   the grid is not taken for the optimum. The rate with the highest score wins; ties go to the
   higher ``best accuracy`` on the validation split, then to the smaller rate.
2. ``--seeds`` runs (default 0 1 2) at the chosen rate on the full training set, evaluated on the
   test split.

SupCon and SimCLR are pretrained with main_supcon.py, then main_linear.py trains a linear classifier
on the frozen encoder (LINEAR, the same settings for both and for every rate; by default on
un-augmented images, ``--aug none``, as demo_digits.sh does); cross-entropy is main_ce.py, with the
reference's crop-and-flip augmentation. Every method trains its network for EPOCHS epochs (the
contrastive ones see two views of each image per epoch, cross-entropy one; the linear classifier's
epochs come on top). The defaults are demo_digits.sh's settings, so the SupCon runs at lr 0.1 are
the demo's runs.

The cross-entropy encoders of the seed runs also get the same linear stage as SupCon and SimCLR
("cross-entropy encoder + linear"): the network's own classifier was trained on augmented views, so
that row compares the three encoders under one protocol.

The table gives, per method, the mean and standard deviation (n - 1) over the seeds of the final
linear top-1 on the test split, and next to it the ``best accuracy`` the scripts print as the
reference does: the best test accuracy over the epochs, i.e. chosen on the test split itself.

Resumable: every command's output goes to <out>/logs/<run>.log (written as .part while it runs,
renamed when it exits 0); a run whose log exists is not run again, and a run that was killed
continues from its last epoch (``--resume auto``; a finished run whose log was deleted is only
re-read, not retrained: delete its folder under ./save/SupCon/ too to train it again). Runs are
filed under ./save/SupCon/ with the trial name ``res<seed>_<settings>`` (e.g.
``res0_s12_e20_b128_t0.1_l20_0.1_none``; the search runs' names end in ``_val_0.2``), so they never
mix with the demo's runs or with runs of other settings. Each run gets one intra-op thread
(``OMP_NUM_THREADS=1``): on this shared 2-core machine two threads per process were several times
slower whenever other jobs ran. ``--jobs 2`` runs two of them at a time. Ends with the t-SNE
pictures of the seed-0 test runs in figures/ (``--no_tsne`` skips them).
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SIZE = 12
EPOCHS = 20
BATCH = 128
TEMP = 0.1
VAL_SPLIT = 0.2
SEARCH_SEED = 0
LINEAR = dict(epochs=20, learning_rate=0.1, batch_size=64, aug='none')
METHODS = ('SupCon', 'SimCLR', 'CE')
# the learning-rate search: the same log-spaced start for every method, extended along LADDER
LADDER = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
START = (0.03, 0.1, 0.3)
MAX_EXTENSIONS = 3
LABELS = {'SupCon': 'SupCon + linear', 'SimCLR': 'SimCLR + linear', 'CE': 'cross-entropy'}
PROBE_LABEL = 'cross-entropy encoder + linear'
TSNE_NAMES = {'SupCon': 'SupCon', 'SimCLR': 'SimCLR', 'CE': 'SupCE'}

ACCURACY = re.compile(r'^(best|final) accuracy: ([0-9.]+)\s*$', re.M)
_print_lock = threading.Lock()


def say(*args):
    with _print_lock:
        print(*args, flush=True)


def fmt(value):
    """A number as the scripts put it into run names (str of the float, as argparse reads it)."""
    return str(float(value))


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        # runs of other settings never share a log or a run folder with these
        self.tag = (
            f's{args.size}_e{args.epochs}_b{args.batch_size}_t{fmt(args.temp)}'
            f'_l{args.linear_epochs}_{fmt(args.linear_lr)}_{args.linear_aug}'
        )
        self.logs = self.out / 'logs' / self.tag
        self.logs.mkdir(parents=True, exist_ok=True)
        self.common = [
            '--dataset',
            'digits',
            '--model',
            'resnet18',
            '--size',
            str(args.size),
            '--amp',
            '--num_workers',
            str(args.num_workers),
        ]
        self.env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        for key in ('WORLD_SIZE', 'LOCAL_RANK', 'RANK', 'LOCAL_WORLD_SIZE'):
            self.env.pop(key, None)
        self.ran_seconds = 0.0

    # ------------------------------------------------------------------ one command

    def run(self, name, script, argv):
        """Run ``python <script> argv`` unless <logs>/<name>.log exists; return that log's text."""
        log = self.logs / f'{name}.log'
        if log.exists():
            return log.read_text()
        part = log.with_suffix('.log.part')
        command = [sys.executable, str(REPO / script)] + [str(a) for a in argv]
        say(f'[start] {name}: {" ".join(command[1:])}')
        start = time.time()
        with open(part, 'a') as handle:  # a resumed run's log keeps the killed part
            handle.write('# ' + ' '.join(command[1:]) + '\n')
            handle.flush()
            code = subprocess.call(
                command, cwd=str(REPO), env=self.env, stdout=handle, stderr=subprocess.STDOUT
            )
        seconds = time.time() - start
        self.ran_seconds += seconds
        if code != 0:
            tail = ''.join(part.read_text().splitlines(True)[-15:])
            raise RuntimeError(
                f'{name} exited {code} after {seconds:.0f} s; its output is in '
                f'{part}; last lines:\n{tail}'
            )
        with open(part, 'a') as handle:
            handle.write(f'# exit 0, {seconds:.1f} s\n')
        part.rename(log)
        say(f'[done ] {name} in {seconds:.0f} s')
        return log.read_text()

    @staticmethod
    def accuracies(text, name):
        found = dict(ACCURACY.findall(text))
        if 'best' not in found or 'final' not in found:
            raise RuntimeError(f'{name}: no "best accuracy"/"final accuracy" lines in its log')
        return {'best': float(found['best']), 'final': float(found['final'])}

    @staticmethod
    def one_folder(pattern):
        found = sorted(Path(REPO).glob(pattern))
        if len(found) != 1:
            raise RuntimeError(f'expected one run folder {pattern}, found {len(found)}')
        return found[0]

    # ------------------------------------------------------------------ one run of a method

    def method_run(self, method, lr, seed, val):
        """Train ``method`` at rate ``lr`` and seed; return its best/final top-1 and checkpoint."""
        args = self.args
        trial = f'res{seed}_{self.tag}'
        suffix = f'_val_{fmt(VAL_SPLIT)}' if val else ''
        split = ['--val_split', fmt(VAL_SPLIT)] if val else []
        name = f'{method}_lr{fmt(lr)}_seed{seed}' + ('_val' if val else '_test')
        tail = [
            '--seed',
            seed,
            '--cosine',
            '--epochs',
            args.epochs,
            '--save_freq',
            100000,
            '--print_freq',
            1000,
            '--trial',
            trial,
            '--resume',
            'auto',
        ] + split
        if method == 'CE':
            text = self.run(
                name,
                'main_ce.py',
                self.common + ['--batch_size', args.batch_size, '--learning_rate', fmt(lr)] + tail,
            )
            folder = self.one_folder(
                f'save/SupCon/digits_models/SupCE_digits_resnet18_lr_{fmt(lr)}_decay_*_bsz_'
                f'{args.batch_size}_trial_{trial}_cosine{suffix}'
            )
            result = dict(self.accuracies(text, name), ckpt=str(folder / 'last.pth'))
            if not val:  # the same linear probe as SupCon's and SimCLR's, on this encoder
                probe = self.linear(name + '_probe', folder / 'last.pth', seed, split)
                result['probe'] = self.accuracies(probe, name + '_probe')
            return result
        self.run(
            name + '_pretrain',
            'main_supcon.py',
            self.common
            + [
                '--method',
                method,
                '--batch_size',
                args.batch_size,
                '--learning_rate',
                fmt(lr),
                '--temp',
                fmt(args.temp),
            ]
            + tail,
        )
        folder = self.one_folder(
            f'save/SupCon/digits_models/{method}_digits_resnet18_lr_{fmt(lr)}_decay_*_bsz_'
            f'{args.batch_size}_temp_{fmt(args.temp)}_trial_{trial}_cosine{suffix}'
        )
        ckpt = folder / 'last.pth'
        text = self.linear(name + '_linear', ckpt, seed, split)
        return dict(self.accuracies(text, name), ckpt=str(ckpt))

    def linear(self, name, ckpt, seed, split):
        """main_linear.py on ``ckpt`` with the LINEAR settings; its log's text."""
        args = self.args
        return self.run(
            name,
            'main_linear.py',
            self.common
            + [
                '--seed',
                seed,
                '--batch_size',
                LINEAR['batch_size'],
                '--learning_rate',
                fmt(args.linear_lr),
                '--cosine',
                '--aug',
                args.linear_aug,
                '--epochs',
                args.linear_epochs,
                '--print_freq',
                1000,
                '--resume',
                'auto',
                '--ckpt',
                Path(ckpt).relative_to(REPO),
            ]
            + split,
        )

    # ------------------------------------------------------------------ the whole comparison

    def pool_map(self, jobs):
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            futures = [pool.submit(*job) for job in jobs]
            return [f.result() for f in futures]

    def main(self):
        args = self.args
        wall = time.time()
        methods = args.methods
        validation = {m: {} for m in methods}
        todo = [(m, lr) for m in methods for lr in START]
        extensions = dict.fromkeys(methods, 0)
        while todo:
            scores = self.pool_map([(self.method_run, m, lr, SEARCH_SEED, True) for m, lr in todo])
            for (m, lr), score in zip(todo, scores):
                validation[m][lr] = {'final': score['final'], 'best': score['best']}
            todo = []
            for m in methods:
                tried = sorted(validation[m])
                best = self.choose(validation[m])
                step = -1 if best == tried[0] else 1 if best == tried[-1] else 0
                index = LADDER.index(best) + step
                if step and 0 <= index < len(LADDER) and extensions[m] < MAX_EXTENSIONS:
                    extensions[m] += 1
                    todo.append((m, LADDER[index]))
                    say(
                        f'{m}: the best rate so far, {best}, is at the edge of those tried;'
                        f' trying {LADDER[index]} too'
                    )
        chosen = {m: self.choose(validation[m]) for m in methods}
        for m in methods:
            say(
                f'{m}: validation final/best top-1 by rate: '
                + ', '.join(
                    f'{lr}: {validation[m][lr]["final"]:.2f}/{validation[m][lr]["best"]:.2f}'
                    for lr in sorted(validation[m])
                )
                + f' -> lr {chosen[m]}'
            )

        tests = [(m, seed) for m in methods for seed in args.seeds]
        results = self.pool_map([(self.method_run, m, chosen[m], seed, False) for m, seed in tests])
        per_seed = {m: {} for m in methods}
        for (m, seed), result in zip(tests, results):
            per_seed[m][seed] = result

        summary = {
            'settings': self.settings(),
            'validation': validation,
            'chosen_lr': chosen,
            'test': {
                m: {
                    str(s): {k: r[k] for k in ('best', 'final', 'probe') if k in r}
                    for s, r in per_seed[m].items()
                }
                for m in methods
            },
        }
        table = self.table(methods, validation, chosen, per_seed)
        if not args.no_tsne:
            self.tsne(methods, per_seed)
        summary['wall_seconds_this_call'] = round(time.time() - wall, 1)
        summary['run_seconds_this_call'] = round(self.ran_seconds, 1)
        (self.out / 'results.json').write_text(json.dumps(summary, indent=1) + '\n')
        (self.out / 'table.md').write_text(table + '\n')
        print()
        print(table)
        print(
            f'\nthis call: {summary["wall_seconds_this_call"]:.0f} s wall clock, '
            f'{self.ran_seconds:.0f} s of runs (runs found in {self.logs} were not rerun); '
            f'{self.out / "results.json"} has every number'
        )

    @staticmethod
    def choose(scores):
        """The rate of the highest validation final top-1; then best top-1; then the smaller."""
        return max(scores, key=lambda lr: (scores[lr]['final'], scores[lr]['best'], -lr))

    def settings(self):
        a = self.args
        return {
            'size': a.size,
            'epochs': a.epochs,
            'batch_size': a.batch_size,
            'temp': a.temp,
            'linear': dict(
                LINEAR, epochs=a.linear_epochs, learning_rate=a.linear_lr, aug=a.linear_aug
            ),
            'val_split': VAL_SPLIT,
            'lr_start': START,
            'lr_ladder': LADDER,
            'max_extensions': MAX_EXTENSIONS,
            'seeds': a.seeds,
            'amp': True,
        }

    def table(self, methods, validation, chosen, per_seed):
        def mean_std(values):
            std = statistics.stdev(values) if len(values) > 1 else float('nan')
            return f'{statistics.mean(values):.2f} ± {std:.2f}'

        seeds = self.args.seeds
        lines = [
            f'| method | lr (validation final top-1 % per lr) | final top-1 % on test, mean ± std'
            f' ({len(seeds)} seeds) | best-over-epochs on the test set % (chosen on test) |'
            f' per seed final / best |',
            '|---|---|---|---|---|',
        ]

        def row(label, search, results):
            finals = [r['final'] for r in results]
            bests = [r['best'] for r in results]
            each = ', '.join(f'{r["final"]:.2f} / {r["best"]:.2f}' for r in results)
            return f'| {label} | {search} | {mean_std(finals)} | {mean_std(bests)} | {each} |'

        for m in methods:
            search = ', '.join(
                ('**{}**' if lr == chosen[m] else '{}').format(
                    f'{lr}: {validation[m][lr]["final"]:.2f}'
                )
                for lr in sorted(validation[m])
            )
            lines.append(row(LABELS[m], search, [per_seed[m][s] for s in seeds]))
            if m == 'CE':
                lines.append(
                    row(
                        PROBE_LABEL,
                        f'the encoders above, lr {chosen[m]}',
                        [per_seed[m][s]['probe'] for s in seeds],
                    )
                )
        return '\n'.join(lines)

    def tsne(self, methods, per_seed):
        seed = self.args.seeds[0]
        (REPO / 'figures').mkdir(exist_ok=True)
        for m in methods:
            out = f'figures/tsne_digits_{TSNE_NAMES[m]}.png'
            ckpt = Path(per_seed[m][seed]['ckpt']).relative_to(REPO)
            command = [
                sys.executable,
                str(REPO / 'main_tsne.py'),
                '--dataset',
                'digits',
                '--size',
                str(self.args.size),
                '--ckpt',
                str(ckpt),
                '--max_samples',
                '360',
                '--num_workers',
                '0',
                '--out',
                out,
            ]
            say(f'[tsne ] {out}')
            result = subprocess.run(
                command, cwd=str(REPO), env=self.env, capture_output=True, text=True
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f't-SNE of {ckpt} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}'
                )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        '--out',
        default='save/digits_results',
        help='logs, results.json and table.md (relative to the repository root)',
    )
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time, one thread each')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--size', type=int, default=SIZE)
    parser.add_argument('--epochs', type=int, default=EPOCHS)
    parser.add_argument('--linear_epochs', type=int, default=LINEAR['epochs'])
    parser.add_argument('--linear_lr', type=float, default=LINEAR['learning_rate'])
    parser.add_argument(
        '--linear_aug',
        default=LINEAR['aug'],
        choices=('none', 'simclr'),
        help="main_linear.py's --aug: none trains the classifier on un-augmented"
        " images, simclr on the reference's crops and flips",
    )
    parser.add_argument('--batch_size', type=int, default=BATCH)
    parser.add_argument('--temp', type=float, default=TEMP)
    parser.add_argument('--num_workers', type=int, default=1, help='data loading workers per run')
    parser.add_argument('--no_tsne', action='store_true', help='skip the t-SNE figures')
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error('--jobs must be 1 or more')
    if not os.path.isabs(args.out):
        args.out = str(REPO / args.out)
    return args


if __name__ == '__main__':
    Bench(parse_args()).main()
