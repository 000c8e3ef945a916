"""SupCon with and without --moco at a small batch on digits: linear top-1 and time per epoch.

Called by benchmarks/moco_digits.sh (see there and benchmarks/README.md, "MoCo on small batches
(digits)"). Every configuration gets the same pretraining and linear-evaluation settings and the
same learning-rate search:

1. search: for each configuration and pretraining rate, seed 0, pretraining on the training images
   less a stratified --val_split, linear evaluation on that held-out part; the rate with the best
   linear ``final accuracy`` is chosen (ties: higher ``best accuracy``, then the smaller rate);
2. test: for each configuration at its chosen rate, the seeds on the whole training set, linear
   evaluation on the test split.

Runs go round-robin over the configurations (and ``--jobs`` at a time), so the epoch times of the
configurations are measured under the same load. Each run writes its logs under ``--out`` (and its
checkpoints below ``--out``/save/, since the scripts save under ./save/ of their working folder);
a run whose linear log already holds ``final accuracy`` is skipped, so the script can be rerun.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    'SupCon': [],
    'SupCon + moco m=0.99': ['--moco', '--moco_k', '1024', '--moco_m', '0.99'],
    'SupCon + moco m=0.999': ['--moco', '--moco_k', '1024', '--moco_m', '0.999'],
}
SLUG = {
    'SupCon': 'supcon',
    'SupCon + moco m=0.99': 'moco_m0.99',
    'SupCon + moco m=0.999': 'moco_m0.999',
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=os.path.join(REPO, 'save', 'moco_digits'))
    p.add_argument('--epochs', type=int, default=6, help='pretraining epochs (all runs)')
    p.add_argument('--linear_epochs', type=int, default=10, help='linear epochs (all runs)')
    p.add_argument(
        '--lrs',
        type=float,
        nargs='+',
        default=[0.025, 0.05, 0.1],
        help='pretraining learning rates searched for every configuration',
    )
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--val_split', type=float, default=0.2)
    p.add_argument('--batch_size', type=int, default=16, help='pretraining batch size')
    p.add_argument('--jobs', type=int, default=2, help='runs at a time (1 thread each)')
    p.add_argument('--configs', nargs='+', default=list(SLUG.values()), choices=list(SLUG.values()))
    return p.parse_args(argv)


def pretrain_args(opt, extra, lr, seed, val):
    args = [
        '--dataset',
        'digits',
        '--model',
        'resnet18',
        '--size',
        '8',
        '--method',
        'SupCon',
        '--batch_size',
        str(opt.batch_size),
        '--learning_rate',
        str(lr),
        '--cosine',
        '--temp',
        '0.1',
        '--amp',
        '--epochs',
        str(opt.epochs),
        '--save_freq',
        str(opt.epochs),
        '--print_freq',
        '100000',
        '--num_workers',
        '0',
        '--seed',
        str(seed),
        '--trial',
        f's{seed}',
        '--resume',
        'auto',
    ] + extra
    if val:
        args += ['--val_split', str(opt.val_split)]
    return args


def linear_args(opt, ckpt, seed, val):
    args = [
        '--dataset',
        'digits',
        '--size',
        '8',
        '--batch_size',
        '64',
        '--learning_rate',
        '0.5',
        '--cosine',
        '--amp',
        '--epochs',
        str(opt.linear_epochs),
        '--save_freq',
        str(opt.linear_epochs),
        '--print_freq',
        '100000',
        '--num_workers',
        '0',
        '--num_workers_val',
        '0',
        '--seed',
        str(seed),
        '--resume',
        'auto',
        '--ckpt',
        ckpt,
    ]
    if val:
        args += ['--val_split', str(opt.val_split)]
    return args


class Failed(Exception):
    pass


def run_logged(script, args, log, cwd, env):
    """Run ``python script args`` in ``cwd``, appending stdout+stderr to ``log``."""
    cmd = [sys.executable, os.path.join(REPO, script)] + args
    with open(log, 'a') as f:
        f.write('$ ' + ' '.join(cmd) + '\n')
        f.flush()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        with open(log) as f:
            tail = ''.join(f.readlines()[-30:])
        raise Failed(f'exit {done.returncode}: {" ".join(cmd)}\n(cwd {cwd}, log {log})\n{tail}')


def say(line):
    sys.stdout.write(line + '\n')  # one write: lines of parallel jobs do not mix
    sys.stdout.flush()


def read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ''


def job(opt, name, lr, seed, val, env, stop):
    """Pretrain + linear-evaluate one run; returns its result dict (skips what is done)."""
    tag = f'{"search" if val else "test"}_{SLUG[name]}_lr{lr}_seed{seed}'
    logs = os.path.join(opt.out, 'logs')
    pre_log, lin_log = (os.path.join(logs, f'{tag}.{kind}.log') for kind in ('pretrain', 'linear'))
    if 'final accuracy' not in read(lin_log):
        if stop.is_set():
            return None
        found = re.findall(r'^saved (\S+last\.pth)$', read(pre_log), re.M)
        if not (found and os.path.isfile(os.path.join(opt.out, found[-1]))):
            say(f'[{time.strftime("%H:%M:%S")}] pretrain {tag}')
            run_logged(
                'main_supcon.py',
                pretrain_args(opt, CONFIGS[name], lr, seed, val),
                pre_log,
                opt.out,
                env,
            )
            found = re.findall(r'^saved (\S+last\.pth)$', read(pre_log), re.M)
        say(f'[{time.strftime("%H:%M:%S")}] linear   {tag}')
        run_logged('main_linear.py', linear_args(opt, found[-1], seed, val), lin_log, opt.out, env)
    text = read(lin_log)
    epoch_times = {}
    for n, t in re.findall(r'^epoch (\d+), total time ([\d.]+)', read(pre_log), re.M):
        epoch_times[int(n)] = float(t)  # a resumed run's later line for an epoch wins
    return {
        'config': name,
        'lr': lr,
        'seed': seed,
        'val': val,
        'best': float(re.findall(r'^best accuracy: ([\d.]+)$', text, re.M)[-1]),
        'final': float(re.findall(r'^final accuracy: ([\d.]+)$', text, re.M)[-1]),
        'epoch_times': [epoch_times[k] for k in sorted(epoch_times)],
    }


def run_all(opt, specs, env):
    """Run the (config, lr, seed, val) specs in their order, ``opt.jobs`` at a time."""
    stop = threading.Event()
    results, errors = [], []
    with ThreadPoolExecutor(max_workers=opt.jobs) as pool:
        futures = [pool.submit(job, opt, *spec, env, stop) for spec in specs]
        for future in futures:
            try:
                result = future.result()
            except Failed as exc:
                stop.set()  # let the running ones finish, start no more
                errors.append(str(exc))
                continue
            if result is not None:
                results.append(result)
    if errors:
        print('FAILED:\n' + '\n'.join(errors), file=sys.stderr)
        sys.exit(1)
    return results


def fmt_mean_std(values):
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{mean:.2f} ± {std:.2f}'


def main():
    opt = parse_args()
    opt.out = os.path.abspath(opt.out)
    os.makedirs(os.path.join(opt.out, 'logs'), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    names = [n for n in CONFIGS if SLUG[n] in opt.configs]
    started = time.time()

    # 1. learning-rate search on the held-out part of the training images, seed 0
    search = run_all(opt, [(n, lr, 0, True) for lr in opt.lrs for n in names], env)
    chosen = {}
    for n in names:
        rows = [r for r in search if r['config'] == n]
        best = max(rows, key=lambda r: (r['final'], r['best'], -r['lr']))
        chosen[n] = best
        print(
            f'{n}: search '
            + ', '.join(
                f'lr {r["lr"]}: final {r["final"]:.2f} (best {r["best"]:.2f})' for r in rows
            )
            + f' -> lr {best["lr"]}',
            flush=True,
        )

    # 2. the seeds at the chosen rates, on the whole training set, evaluated on the test split
    test = run_all(opt, [(n, chosen[n]['lr'], s, False) for s in opt.seeds for n in names], env)

    with open(os.path.join(opt.out, 'results.json'), 'w') as f:
        json.dump({'search': search, 'test': test, 'options': vars(opt)}, f, indent=1)

    lines = [
        f'pretraining: --dataset digits --model resnet18 --size 8 --batch_size {opt.batch_size}'
        f' --cosine --temp 0.1 --amp, {opt.epochs} epochs; linear: --batch_size 64'
        f' --learning_rate 0.5 --cosine --amp, {opt.linear_epochs} epochs',
        '',
        '| config | lr (search) | val final @ lr | test final (mean ± std) | test best-over-epochs'
        ' (mean ± std) | test final per seed | sec/epoch median | sec/epoch min-max |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for n in names:
        rows = sorted((r for r in test if r['config'] == n), key=lambda r: r['seed'])
        times = [t for r in rows for t in r['epoch_times']]
        search_rows = sorted((r for r in search if r['config'] == n), key=lambda r: r['lr'])
        search_cell = ' / '.join(f'{r["final"]:.2f}' for r in search_rows)
        lines.append(
            f'| {n} | {chosen[n]["lr"]} ({"/".join(str(r["lr"]) for r in search_rows)}:'
            f' {search_cell}) | {chosen[n]["final"]:.2f} |'
            f' {fmt_mean_std([r["final"] for r in rows])} |'
            f' {fmt_mean_std([r["best"] for r in rows])} |'
            f' {", ".join("%.2f" % r["final"] for r in rows)} |'
            f' {statistics.median(times):.2f} | {min(times):.2f}-{max(times):.2f} |'
        )
    lines += [
        '',
        'std: sample standard deviation over the seeds; sec/epoch: the "epoch N, total'
        ' time T" lines of the test runs (all seeds and epochs); val final: linear final'
        f' accuracy on the --val_split {opt.val_split} part, seed 0.',
        f'wall time of this invocation: {time.time() - started:.0f} s',
    ]
    table = '\n'.join(lines)
    with open(os.path.join(opt.out, 'results.md'), 'w') as f:
        f.write(table + '\n')
    print(table)


if __name__ == '__main__':
    main()
