"""The online probe and --ce_weight on the digits demo's settings (benchmarks/README.md, "Online
probe and joint cross-entropy").

    python benchmarks/probe_digits.py [--jobs 2] [--seeds 0 1 2] [--probe_lrs 0.01 0.1 1]
                                      [--ce_weights 0 0.5 1] [--linear_epochs 20]

1. ``--probe_lr`` search: SupCon pretraining with ``--online_probe`` at each rate (seed 0) on the
   training images less a stratified 20% (``--val_split 0.2``), the probe scored on that 20% at the
   last epoch; the test split is never read. The highest last-epoch probe accuracy wins (ties: the
   smaller rate). The chosen rate is main_supcon.py's default (supcon/probe.py, PROBE_LR).
2. For every seed and every ``--ce_weight``: pretraining with ``--online_probe`` at the chosen rate
   (test split), then main_linear.py on its last.pth, as demo_digits.sh does. With --ce_weight 0 the
   probe's last-epoch accuracy stands next to main_linear.py's on the same checkpoint; the probe
   does not change the encoder (tests/test_probe.py), so these runs are also plain SupCon runs.

Every run gets one intra-op thread (OMP_NUM_THREADS=1) and ``nice -n 5``; ``--jobs`` runs at most
that many at once. Logs: <out>/logs/<run>.log; a run whose log exists is read, not run again.
Numbers: <out>/results.json.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# demo_digits.sh's settings
COMMON = [
    '--dataset',
    'digits',
    '--model',
    'resnet18',
    '--size',
    '12',
    '--amp',
    '--num_workers',
    '1',
]
PRETRAIN = ['--method', 'SupCon', '--batch_size', '128', '--learning_rate', '0.03', '--temp', '0.1']
PRETRAIN += ['--cosine', '--epochs', '20', '--save_freq', '20', '--print_freq', '100']
LINEAR = ['--batch_size', '64', '--learning_rate', '0.1', '--cosine', '--aug', 'none']
LINEAR += ['--print_freq', '100']


def run(name, script, args, out):
    """``python <script> args`` (nice, one thread); returns (stdout text, seconds)."""
    log = out / 'logs' / f'{name}.log'
    if log.exists():
        text = log.read_text()
        found = re.search(r'^run time: ([0-9.]+) s$', text, re.M)
        return text, float(found.group(1)) if found else None
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    start = time.time()
    done = subprocess.run(
        ['nice', '-n', '5', sys.executable, str(REPO / script)] + args,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.time() - start
    if done.returncode != 0:
        raise RuntimeError(f'{name} failed ({done.returncode}):\n{done.stderr[-2000:]}')
    log.write_text(done.stdout + f'run time: {seconds:.1f} s\n')
    print(f'{name}: {seconds:.0f} s', flush=True)
    return done.stdout, seconds


def last(pattern, text):
    values = re.findall(pattern, text, re.M)
    return float(values[-1]) if values else None


def saved_last(text):
    return re.findall(r'^saved (.*last\.pth)$', text, re.M)[-1]


def pretrain(name, seed, extra, out, linear_epochs=None):
    args = COMMON + ['--seed', str(seed)] + PRETRAIN + extra + ['--trial', name]
    text, seconds = run(name, 'main_supcon.py', args, out)
    result = {
        'probe_acc': last(r'^probe accuracy: ([0-9.]+)$', text),
        'ce_acc': last(r'^ce accuracy: ([0-9.]+)$', text),
        'pretrain_s': seconds,
    }
    if linear_epochs:
        ckpt = str(REPO / saved_last(text))
        args = COMMON + ['--seed', str(seed)] + LINEAR + ['--epochs', str(linear_epochs)]
        text, seconds = run(f'{name}_linear', 'main_linear.py', args + ['--ckpt', ckpt], out)
        result['linear_final'] = last(r'^final accuracy: ([0-9.]+)$', text)
        result['linear_best'] = last(r'^best accuracy: ([0-9.]+)$', text)
        result['linear_s'] = seconds
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--probe_lrs', type=float, nargs='+', default=[0.01, 0.1, 1.0])
    parser.add_argument('--ce_weights', type=float, nargs='+', default=[0.0, 0.5, 1.0])
    parser.add_argument('--linear_epochs', type=int, default=20)
    parser.add_argument('--out', type=Path, default=REPO / 'save' / 'probe_digits')
    args = parser.parse_args()
    (args.out / 'logs').mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {'search': {}, 'runs': {}}
    with ThreadPoolExecutor(args.jobs) as pool:
        search = {
            lr: pool.submit(
                pretrain,
                f'plr{lr}_val',
                0,
                ['--online_probe', '--probe_lr', str(lr), '--val_split', '0.2'],
                args.out,
            )
            for lr in args.probe_lrs
        }
        results['search'] = {str(lr): job.result() for lr, job in search.items()}
        chosen = max(args.probe_lrs, key=lambda lr: (results['search'][str(lr)]['probe_acc'], -lr))
        results['chosen_probe_lr'] = chosen
        print(f'chosen --probe_lr {chosen}', flush=True)
        jobs = {}
        for weight in args.ce_weights:
            for seed in args.seeds:
                extra = ['--online_probe', '--probe_lr', str(chosen)]
                if weight:
                    extra += ['--ce_weight', str(weight)]
                name = f'pd{seed}_ce{weight}'
                jobs[name] = pool.submit(pretrain, name, seed, extra, args.out, args.linear_epochs)
        results['runs'] = {name: job.result() for name, job in jobs.items()}
    results['wall_s'] = time.time() - started
    (args.out / 'results.json').write_text(json.dumps(results, indent=1))
    print_tables(results, args)


def print_tables(results, args):
    print('| --probe_lr | probe last-epoch accuracy (validation) | pretraining s |')
    print('|---|---|---|')
    for lr, r in results['search'].items():
        print(f'| {lr} | {r["probe_acc"]:.2f} | {r["pretrain_s"]:.0f} |')
    print()
    print('| --ce_weight | seed | probe (last epoch) | ce classifier | linear final / best |')
    print('|---|---|---|---|---|')
    for weight in args.ce_weights:
        finals = []
        for seed in args.seeds:
            r = results['runs'][f'pd{seed}_ce{weight}']
            finals.append(r['linear_final'])
            ce = '' if r['ce_acc'] is None else f'{r["ce_acc"]:.2f}'
            print(
                f'| {weight} | {seed} | {r["probe_acc"]:.2f} | {ce} |'
                f' {r["linear_final"]:.2f} / {r["linear_best"]:.2f} |'
            )
        if len(finals) > 1:
            print(
                f'| {weight} | mean ± std | | | {statistics.mean(finals):.2f} ±'
                f' {statistics.stdev(finals):.2f} |'
            )
    print(f'\nwall clock {results["wall_s"]:.0f} s')


if __name__ == '__main__':
    main()
