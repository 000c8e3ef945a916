"""More views per image on digits: 2 views, 4 views, 2 + 4 small views; linear top-1 and time.

    nice -n 10 python benchmarks/views_digits.py [--seeds 0 1 2] [--out save/views_digits]

Every configuration gets demo_digits.sh's settings (ResNet-18, ``--size 12 --amp``, batch 128,
lr 0.03, ``--temp 0.1 --cosine``, 20 epochs, one loader worker), then main_linear.py as the demo
runs it (``--aug none``, lr 0.1, batch 64, 20 epochs), on the test split. Runs go one at a time,
round-robin over the configurations (seed 0 of each, then seed 1, ...), so that the load of a
shared machine falls on all of them alike; one intra-op thread each (``OMP_NUM_THREADS=1``, as the
demo). Each run works in ``--out``/runs/<config>_s<seed>/ (its ./save/ is there) and logs to
``--out``/logs/; a run whose linear log holds ``final accuracy`` is skipped, so the script can be
rerun. Checkpoints are deleted once the linear stage has read them (``--keep`` keeps them). Prints
a markdown table of the per-seed and mean final / best top-1, the mean time per pretraining epoch
(the ``epoch N, total time`` lines) and the load average during each run; writes results.json.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    '2 views': [],
    '4 views': ['--n_views', '4'],
    '2 + 4 small views (6 px)': ['--small_views', '4', '--small_size', '6'],
}
SLUG = {'2 views': 'v2', '4 views': 'v4', '2 + 4 small views (6 px)': 'v2_small4x6'}
COMMON = ['--dataset', 'digits', '--model', 'resnet18', '--size', '12', '--amp', '--num_workers']
COMMON += ['1', '--print_freq', '100']
PRETRAIN = ['--method', 'SupCon', '--batch_size', '128', '--learning_rate', '0.03', '--temp']
PRETRAIN += ['0.1', '--cosine']
LINEAR = ['--batch_size', '64', '--learning_rate', '0.1', '--cosine', '--aug', 'none']


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', default=os.path.join(REPO, 'save', 'views_digits'))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--configs', nargs='+', default=list(SLUG.values()), choices=list(SLUG.values()))
    p.add_argument('--epochs', type=int, default=20, help='pretraining epochs (the demo: 20)')
    p.add_argument('--linear_epochs', type=int, default=20, help='linear epochs (the demo: 20)')
    p.add_argument('--keep', action='store_true', help='keep the checkpoints')
    return p.parse_args(argv)


def run(command, cwd, log):
    """Run ``command`` in ``cwd``, output to ``log``; returns (seconds, load before, after)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    load, start = os.getloadavg()[0], time.time()
    with open(log + '.part', 'w') as f:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f'error: {" ".join(command)} failed; see {log}.part')
    os.replace(log + '.part', log)
    return time.time() - start, load, os.getloadavg()[0]


def one(config, seed, args):
    slug = SLUG[config]
    cwd = os.path.join(args.out, 'runs', f'{slug}_s{seed}')
    logs = os.path.join(args.out, 'logs')
    os.makedirs(cwd, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    pre_log, lin_log = (os.path.join(logs, f'{slug}_s{seed}_{s}.log') for s in ('pre', 'lin'))
    record = os.path.join(logs, f'{slug}_s{seed}.json')
    if os.path.exists(record):
        return json.load(open(record))
    python = [sys.executable]
    options = COMMON + ['--seed', str(seed)]
    epochs = ['--epochs', str(args.epochs), '--save_freq', str(args.epochs)]
    pre = python + [os.path.join(REPO, 'main_supcon.py')] + options + PRETRAIN + epochs
    pre += CONFIGS[config]
    wall, load0, load1 = run(pre + ['--trial', str(seed)], cwd, pre_log)
    text = open(pre_log).read()
    ckpt = re.search(r'saved (\S+last\.pth)', text).group(1)
    epoch_times = [float(t) for t in re.findall(r'epoch \d+, total time ([\d.]+)', text)]
    lin = python + [os.path.join(REPO, 'main_linear.py')] + options + LINEAR
    lin += ['--epochs', str(args.linear_epochs), '--ckpt', ckpt]
    run(lin, cwd, lin_log)
    lin_text = open(lin_log).read()
    result = {
        'config': config,
        'seed': seed,
        'final': float(re.search(r'final accuracy: ([\d.]+)', lin_text).group(1)),
        'best': float(re.search(r'best accuracy: ([\d.]+)', lin_text).group(1)),
        'epoch_s': statistics.mean(epoch_times),
        'pretrain_wall_s': wall,
        'load': [load0, load1],
        'command': ' '.join(pre[1:] + ['--trial', str(seed)]),
        'linear_command': ' '.join(lin[1:]),
    }
    json.dump(result, open(record, 'w'), indent=1)
    if not args.keep:
        shutil.rmtree(os.path.join(cwd, 'save'), ignore_errors=True)
    return result


def table(results):
    def mean_std(values):
        return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'

    lines = [
        '| views | final top-1 per seed | final mean ± std | best mean ± std | s / epoch per seed'
        ' | load average per run |',
        '|---|---|---|---|---|---|',
    ]
    for config in CONFIGS:
        rows = sorted((r for r in results if r['config'] == config), key=lambda r: r['seed'])
        if not rows:
            continue
        finals, bests = [r['final'] for r in rows], [r['best'] for r in rows]
        spread = mean_std(finals) if len(rows) > 1 else f'{finals[0]:.2f}'
        best = mean_std(bests) if len(rows) > 1 else f'{bests[0]:.2f}'
        per_seed = ' / '.join(f'{v:.2f}' for v in finals)
        times = ' / '.join(f'{r["epoch_s"]:.1f}' for r in rows)
        loads = ' / '.join(f'{r["load"][0]:.1f}-{r["load"][1]:.1f}' for r in rows)
        lines.append(f'| {config} | {per_seed} | {spread} | {best} | {times} | {loads} |')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    args.out = os.path.abspath(args.out)
    results = []
    for seed in args.seeds:
        for config in CONFIGS:
            if SLUG[config] in args.configs:
                results.append(one(config, seed, args))
                print(json.dumps(results[-1]), flush=True)
    json.dump(results, open(os.path.join(args.out, 'results.json'), 'w'), indent=1)
    print(table(results))


if __name__ == '__main__':
    main()
