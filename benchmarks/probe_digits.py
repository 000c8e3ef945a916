"""The online probe and --ce_weight on the digits demo's settings (benchmarks/README.md, "Online
probe and joint cross-entropy").

    python benchmarks/probe_digits.py [--jobs 2] [--seeds 0 1 2] [--sweep_lrs 0.01 0.03 0.1 0.3 1]
                                      [--ce_weights 0 0.5 1] [--linear_epochs 20]

Every pretraining run is main_supcon.py --online_probe (demo_digits.sh's settings) with, beside the
run's own probe, one more probe per rate of ``--sweep_lrs`` trained on the same steps: a probe never
changes the encoder and draws no random number (tests/test_probe.py), so N probes in one run are N
runs' probes, for the price of one.

1. ``--probe_lr`` search: seed 0, trained on the training images less a stratified 20%
   (``--val_split 0.2``), every probe scored on that 20% at the last epoch; the test split is never
   read. The highest last-epoch accuracy wins (ties: the smaller rate).
2. For every seed and every ``--ce_weight``: pretraining on the whole training set (test split),
   then main_linear.py on its last.pth, as demo_digits.sh does. With --ce_weight 0 the probes'
   last-epoch accuracies stand next to main_linear.py's on the same checkpoint; with --ce_weight 0
   these are plain SupCon runs (the probe does not change the encoder).

Runs go in the order seed 0 (all weights), seed 1, seed 2, so a cut-short grid still compares the
weights. Every run gets one intra-op thread (OMP_NUM_THREADS=1) and ``nice -n 5``; ``--jobs`` runs
at most that many at once. Logs: <out>/logs/<run>.log; a run whose log exists is read, not run
again. Numbers: <out>/results.json.
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

import torch

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


def run(name, script, args, out, sweep_lrs=None):
    """``python <script> args`` (nice, one thread); returns (stdout text, seconds). With
    ``sweep_lrs`` main_supcon.py runs through this file, with those extra probes."""
    log = out / 'logs' / f'{name}.log'
    if log.exists():
        text = log.read_text()
        found = re.search(r'^run time: ([0-9.]+) s$', text, re.M)
        return text, float(found.group(1)) if found else None
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    command = [sys.executable, str(REPO / script)] + args
    if sweep_lrs:
        lrs = ','.join(str(lr) for lr in sweep_lrs)
        command = [sys.executable, __file__, '--with_probes', lrs, '--'] + args
    start = time.time()
    done = subprocess.run(
        ['nice', '-n', '5'] + command, cwd=REPO, env=env, capture_output=True, text=True
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


def pretrain(name, seed, extra, out, sweep_lrs, linear_epochs=None):
    args = COMMON + ['--seed', str(seed)] + PRETRAIN + ['--online_probe'] + extra
    text, seconds = run(name, 'main_supcon.py', args + ['--trial', name], out, sweep_lrs)
    result = {
        'probe_acc': last(r'^probe accuracy: ([0-9.]+)$', text),
        'sweep': {str(lr): last(rf'^probe_lr{lr} accuracy: ([0-9.]+)$', text) for lr in sweep_lrs},
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


def run_with_probes(lrs, argv):
    """main_supcon.main() with one more OnlineProbe per rate of ``lrs`` (not checkpointed)."""
    sys.path.insert(0, str(REPO))
    import main_supcon
    from supcon.objectives import probe
    from supcon.system import runtime

    class SweepHeads(probe.ClassifierHeads):
        def __init__(self, opt, rt, dim, num_classes, evaluation):
            super().__init__(opt, rt, dim, num_classes, evaluation)
            self.lrs = lrs
            self.sweep = torch.nn.ModuleList(
                probe.OnlineProbe(dim, num_classes, lr, opt.epochs, rt.device) for lr in lrs
            )

        def forward(self, encoded, labels):
            term = super().forward(encoded, labels)
            both = torch.cat([labels, labels])
            self._sweep_losses = [p.loss(encoded, both) for p in self.sweep]
            return term

        def step(self, epoch, step, steps_per_epoch):
            super().step(epoch, step, steps_per_epoch)
            for p, loss in zip(self.sweep, self._sweep_losses):
                p.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                p.set_lr(epoch, step, steps_per_epoch)
                p.optimizer.step()

        def classifiers(self):
            found = super().classifiers()
            found.update({f'probe_lr{lr}': p.classifier for lr, p in zip(self.lrs, self.sweep)})
            return found

    def build_heads(opt, rt, model, train_set):
        evaluation = probe.EvaluationSplit(opt, rt, train_set)
        width, classes = probe.feature_width(model), len(train_set.classes)
        return SweepHeads(opt, rt, width, classes, evaluation)

    probe.build_heads = build_heads
    sys.argv = [str(REPO / 'main_supcon.py')] + argv
    runtime.launch(main_supcon.main)


def main():
    if len(sys.argv) > 3 and sys.argv[1] == '--with_probes' and sys.argv[3] == '--':
        return run_with_probes([float(lr) for lr in sys.argv[2].split(',')], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--jobs', type=int, default=2)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--sweep_lrs', type=float, nargs='+', default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument('--ce_weights', type=float, nargs='+', default=[0.0, 0.5, 1.0])
    parser.add_argument('--linear_epochs', type=int, default=20)
    parser.add_argument('--out', type=Path, default=REPO / 'save' / 'probe_digits')
    args = parser.parse_args()
    (args.out / 'logs').mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {'runs': {}}
    with ThreadPoolExecutor(args.jobs) as pool:
        search = pool.submit(
            pretrain, 'probe_val', 0, ['--val_split', '0.2'], args.out, args.sweep_lrs
        )
        jobs = {}
        for seed in args.seeds:
            for weight in args.ce_weights:
                extra = ['--ce_weight', str(weight)] if weight else []
                name = f'pd{seed}_ce{weight}'
                jobs[name] = pool.submit(
                    pretrain, name, seed, extra, args.out, args.sweep_lrs, args.linear_epochs
                )
        results['search'] = search.result()
        sweep = results['search']['sweep']
        results['chosen_probe_lr'] = max(args.sweep_lrs, key=lambda lr: (sweep[str(lr)], -lr))
        print(f'chosen --probe_lr {results["chosen_probe_lr"]}', flush=True)
        for name, job in jobs.items():
            results['runs'][name] = job.result()
            (args.out / 'results.json').write_text(json.dumps(results, indent=1))
    results['wall_s'] = time.time() - started
    (args.out / 'results.json').write_text(json.dumps(results, indent=1))
    print_tables(results, args)


def print_tables(results, args):
    lrs = [str(lr) for lr in args.sweep_lrs]
    print('| probe rate | ' + ' | '.join(lrs) + ' |')
    print('|---|' + '---|' * len(lrs))
    sweep = results['search']['sweep']
    print('| validation, last epoch | ' + ' | '.join(f'{sweep[lr]:.2f}' for lr in lrs) + ' |')
    print()
    print('| --ce_weight | seed | probe at ' + ' / '.join(lrs) + ' | ce classifier | linear'
          ' final / best | pretraining s |')  # fmt: skip
    print('|---|---|---|---|---|---|')
    for weight in args.ce_weights:
        finals = []
        for seed in args.seeds:
            r = results['runs'].get(f'pd{seed}_ce{weight}')
            if r is None:
                continue
            finals.append(r['linear_final'])
            ce = '' if r['ce_acc'] is None else f'{r["ce_acc"]:.2f}'
            probes = ' / '.join(f'{r["sweep"][lr]:.2f}' for lr in lrs)
            print(
                f'| {weight} | {seed} | {probes} | {ce} |'
                f' {r["linear_final"]:.2f} / {r["linear_best"]:.2f} | {r["pretrain_s"]:.0f} |'
            )
        if len(finals) > 1:
            print(
                f'| {weight} | mean ± std | | | {statistics.mean(finals):.2f} ±'
                f' {statistics.stdev(finals):.2f} | |'
            )
    print(f'\nwall clock {results["wall_s"]:.0f} s')


if __name__ == '__main__':
    main()
