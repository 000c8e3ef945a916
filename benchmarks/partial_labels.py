"""Partial and multiple labels on digits: the measurement of docs/labels.md.

    python benchmarks/partial_labels.py [--jobs 2] [--seeds 0 1 2] [--stages grid multi]

Partial labels (``--dataset digits``, ``--labelled_fraction`` F in FRACTIONS), three pretrainings,
each followed by main_linear.py on the same labelled images (F of the training images, stratified,
chosen by the seed; the SimCLR encoders get them with ``main_linear.py --labelled_fraction F``):

- ``partial``: SupCon on every image, the labels of F kept, the rest unlabelled (-1);
- ``simclr``: SimCLR on every image (no labels);
- ``labonly``: SupCon on the labelled images alone (``--labelled_only``), for EPOCHS / F epochs so
  that it sees as many images as the others, in batches of BATCH_LABONLY (F = 0.1 of the search's
  training part is fewer images than BATCH).

Learning rates: RATES, the ones benchmarks/digits_results.py chose on ``--val_split 0.2`` for
SupCon and SimCLR with every label (README.md "Results"); stage ``search`` (not run by default:
on the shared 2-core machine it would take longer than everything else together) re-chooses them
for partial labels: seed 0, the smallest F, pretraining on the training images less a stratified
20% (``--val_split 0.2`` in both scripts), scored by the linear ``final accuracy`` on that 20%, the
higher score winning (ties: the smaller rate). Stage ``grid``: every method, F and seed on the
whole training split, scored on the test split; one SimCLR pretraining per seed serves every F.
Stage ``multi``: the two-digit CSV set (``benchmarks/two_digits_csv.py``, built when missing) at
``--size`` MULTI_SIZE, SupCon ``--multilabel any`` and ``jaccard`` and SimCLR at the rates of
``partial`` and ``simclr``, linear evaluation by ``final mean average precision``. Runs go seed
by seed, so a call stopped early holds every comparison at the first seeds.

Every command's output goes to <out>/logs/<name>.log (.part while it runs); a run whose log exists
is not run again, a killed one resumes (``--resume auto``). Each run gets one thread
(``OMP_NUM_THREADS=1``) under ``nice -n 5``. Writes <out>/results.json and prints the tables.
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
FRACTIONS = (0.1, 0.3)
SIZE, EPOCHS, BATCH, TEMP, VAL_SPLIT = 8, 6, 128, 0.1, 0.2
BATCH_LABONLY = 64  # F = 0.1 of the 1149 images of the search's training part is 115 images
LINEAR = ['--epochs', 20, '--learning_rate', 0.1, '--batch_size', 64, '--aug', 'none', '--cosine']
RATES = {'partial': 0.03, 'labonly': 0.03, 'simclr': 0.003}  # digits_results.py's choices
SEARCH = {
    'partial': (0.01, 0.03, 0.1),
    'labonly': (0.01, 0.03, 0.1),
    'simclr': (0.001, 0.003, 0.01),
}
MULTI = {'any': 'partial', 'jaccard': 'partial', 'simclr': 'simclr'}  # rate taken from
MULTI_SIZE = 12  # each digit of the two is 6 pixels wide then (the digits themselves are 8x8)
RESULT = re.compile(r'^final (accuracy|mean average precision): ([0-9.]+)\s*$', re.M)
_lock = threading.Lock()


def say(*args):
    with _lock:
        print(*args, flush=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.logs = self.out / 'logs'
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
        for key in ('WORLD_SIZE', 'LOCAL_RANK', 'RANK', 'LOCAL_WORLD_SIZE'):
            self.env.pop(key, None)
        self.seconds = {}
        self.locks = {}

    def pretrain_lock(self, name):
        """One lock per pretraining, so that two linear runs sharing it wait for one run."""
        with _lock:
            return self.locks.setdefault(name, threading.Lock())

    def run(self, name, script, argv):
        """``nice -n 5 python <script> argv`` unless <logs>/<name>.log exists; the log's text."""
        log = self.logs / f'{name}.log'
        if log.exists():
            return log.read_text()
        part = log.with_suffix('.log.part')
        command = ['nice', '-n', '5', sys.executable, str(REPO / script)] + [str(a) for a in argv]
        say(f'[start] {name}')
        start = time.time()
        with open(part, 'a') as handle:
            handle.write('# ' + ' '.join(command[3:]) + '\n')
            handle.flush()
            code = subprocess.call(
                command, cwd=str(REPO), env=self.env, stdout=handle, stderr=subprocess.STDOUT
            )
        seconds = time.time() - start
        if code != 0:
            raise RuntimeError(f'{name} exited {code} after {seconds:.0f} s; see {part}')
        with open(part, 'a') as handle:
            handle.write(f'# exit 0, {seconds:.1f} s\n')
        part.rename(log)
        say(f'[done ] {name} in {seconds:.0f} s')
        return log.read_text()

    @staticmethod
    def final(text, name):
        found = RESULT.findall(text)
        if not found:
            raise RuntimeError(f'{name}: no "final ..." line in its log')
        return float(found[-1][1])

    @staticmethod
    def saved(text, name):
        found = re.findall(r'^saved (\S+last\.pth)$', text, re.M)
        if not found:
            raise RuntimeError(f'{name}: no "saved .../last.pth" line in its log')
        return found[-1]

    def pretrain_and_probe(self, name, data, pretrain, linear, seed, val, batch=BATCH, pname=None):
        split = ['--val_split', VAL_SPLIT] if val else []
        tail = ['--seed', seed, '--num_workers', 0, '--print_freq', 1000, '--resume', 'auto']
        common = ['--model', 'resnet18', '--amp', '--cosine', '--batch_size', batch, '--temp', TEMP]
        common += ['--save_freq', 100000, '--trial', f'bench_s{seed}']  # a run folder per seed
        pretrain_argv = data + common + pretrain + tail + split
        with self.pretrain_lock(pname or name):
            texts = [self.run(f'{pname or name}_pretrain', 'main_supcon.py', pretrain_argv)]
        ckpt = self.saved(texts[0], name)
        linear = data + ['--amp', '--ckpt', ckpt] + LINEAR + linear + tail + split
        texts.append(self.run(f'{name}_linear', 'main_linear.py', linear))
        self.seconds[name] = [
            float(s) for text in texts for s in re.findall(r'^# exit 0, ([0-9.]+) s$', text, re.M)
        ]
        return self.final(texts[1], name)

    def partial_run(self, method, fraction, lr, seed, val=False):
        data = ['--dataset', 'digits', '--size', SIZE]
        epochs = round(EPOCHS / fraction) if method == 'labonly' else EPOCHS
        pretrain = ['--learning_rate', lr, '--epochs', epochs]
        linear = []
        if method == 'simclr':
            pretrain += ['--method', 'SimCLR']
            linear = ['--labelled_fraction', fraction]
        else:
            pretrain += ['--labelled_fraction', fraction]
            if method == 'labonly':
                pretrain += ['--labelled_only']
        split = 'val' if val else 'test'
        name = f'{method}_F{fraction}_lr{lr}_seed{seed}_{split}'
        # SimCLR reads no labels: one pretraining serves every F
        pretrain_name = f'simclr_lr{lr}_seed{seed}_{split}' if method == 'simclr' else name
        batch = BATCH_LABONLY if method == 'labonly' else BATCH
        return self.pretrain_and_probe(
            name, data, pretrain, linear, seed, val, batch, pretrain_name
        )

    def multi_run(self, rule, lr, seed):
        folder = self.out / 'two_digits'
        if not (folder / 'mean_std.txt').exists():
            subprocess.check_call(
                [sys.executable, str(REPO / 'benchmarks/two_digits_csv.py'), '--out', folder]
            )
        mean, std = (folder / 'mean_std.txt').read_text().split('\n')[:2]
        data = ['--dataset', 'csv', '--data_csv', folder / 'train.csv', '--test_csv']
        data += [folder / 'test.csv', '--mean', mean, '--std', std, '--size', MULTI_SIZE]
        pretrain = ['--learning_rate', lr, '--epochs', EPOCHS]
        pretrain += ['--method', 'SimCLR'] if rule == 'simclr' else ['--multilabel', rule]
        name = f'multi_{rule}_lr{lr}_seed{seed}'
        return self.pretrain_and_probe(name, data, pretrain, [], seed, False)

    def pool(self, jobs):
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            futures = [pool.submit(*job) for job in jobs]
            return [f.result() for f in futures]

    def main(self):
        args, wall = self.args, time.time()
        results = {'settings': {'size': SIZE, 'epochs': EPOCHS, 'batch': BATCH, 'temp': TEMP}}
        chosen = dict(RATES)
        if 'search' in args.stages:
            search = [(m, lr) for m in SEARCH for lr in SEARCH[m]]
            jobs = [(self.partial_run, m, FRACTIONS[0], lr, 0, True) for m, lr in search]
            validation = {m: {} for m in SEARCH}
            for (m, lr), score in zip(search, self.pool(jobs)):
                validation[m][lr] = score
            chosen = {m: max(sorted(v), key=lambda lr, v=v: v[lr]) for m, v in validation.items()}
            results['validation'] = validation
            say(f'validation (F={FRACTIONS[0]}, seed 0): {validation}; chosen: {chosen}')
        results['chosen_lr'] = chosen
        # seed by seed, so that a call stopped early has every comparison at the first seeds
        jobs, keys = [], []
        for s in args.seeds:
            if 'grid' in args.stages:
                for f in FRACTIONS:
                    for m in RATES:
                        jobs.append((self.partial_run, m, f, chosen[m], s))
                        keys.append(('grid', {'method': m, 'fraction': f, 'seed': s}))
            if 'multi' in args.stages:
                for r in MULTI:
                    jobs.append((self.multi_run, r, chosen[MULTI[r]], s))
                    keys.append(('multi', {'rule': r, 'seed': s}))
        for (stage, key), score in zip(keys, self.pool(jobs)):
            results.setdefault(stage, []).append(dict(key, final=score))
        results['run_seconds'] = self.seconds
        results['wall_seconds_this_call'] = round(time.time() - wall, 1)
        (self.out / 'results.json').write_text(json.dumps(results, indent=1) + '\n')
        print(self.tables(results))

    @staticmethod
    def tables(results):
        def cell(values):
            if len(values) > 1:
                return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'
            return f'{values[0]:.2f}' if values else '-'

        lines = ['| method | ' + ' | '.join(f'F = {f}' for f in FRACTIONS) + ' |', '|---' * 3 + '|']
        for m in RATES:
            row = [
                [
                    g['final']
                    for g in results.get('grid', [])
                    if (g['method'], g['fraction']) == (m, f)
                ]
                for f in FRACTIONS
            ]
            lines.append(
                f'| {m} (lr {results["chosen_lr"][m]}) | ' + ' | '.join(map(cell, row)) + ' |'
            )
        lines += ['', '| rule | mean average precision |', '|---|---|']
        for r in MULTI:
            values = [g['final'] for g in results.get('multi', []) if g['rule'] == r]
            lines.append(f'| {r} | {cell(values)} |')
        return '\n'.join(lines)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--stages', nargs='+', default=['grid', 'multi'])
    parser.add_argument('--out', default='save/partial_labels', help='logs and results')
    return parser.parse_args(argv)


if __name__ == '__main__':
    Bench(parse()).main()
