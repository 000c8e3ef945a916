"""The online probe and --ce_weight on the digits demo's settings (docs/monitoring.md).

    python benchmarks/probe_digits.py [--jobs 2] [--seeds 0 1 2] [--sweep_lrs 0.01 0.03 0.1 0.3 1]
                                      [--ce_weights 0 0.5 1] [--linear_epochs 20]

Every pretraining run is main_supcon.py --online_probe (demo_digits.sh's settings,
benchmarks/digits_demo.py) with, beside the run's own probe, one more probe per rate of
``--sweep_lrs`` trained on the same steps: a probe never changes the encoder and draws no random
number (tests/test_probe.py), so N probes in one run are N runs' probes, for the price of one.
These extra probes are not checkpointed, so an interrupted pretraining starts again from nothing.

1. ``--probe_lr`` search: seed 0, trained on the training images less a stratified 20%
   (``--val_split 0.2``), every probe scored on that 20% at the last epoch; the test split is never
   read. The highest last-epoch accuracy wins (ties: the smaller rate).
2. For every seed and every ``--ce_weight``: pretraining on the whole training set (test split),
   then main_linear.py on its last.pth, as demo_digits.sh does. With --ce_weight 0 the probes'
   last-epoch accuracies stand next to main_linear.py's on the same checkpoint (and these are plain
   SupCon runs: the probe does not change the encoder).

Runs go in the order seed 0 (all weights), seed 1, seed 2, so a cut-short grid still compares the
weights.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from digits_demo import EPOCHS, LINEAR_EPOCHS, linear_args, pretrain_args  # noqa: E402


def pretrain(sweep, args, name, seed, extra):
    """main_supcon.py --online_probe with the sweep's extra probes (through this file)."""
    lrs = ','.join(str(lr) for lr in args.sweep_lrs)
    argv = ['--with_probes', lrs, '--'] + pretrain_args(seed, epochs=args.epochs)
    argv += ['--online_probe'] + extra
    return sweep.run(name, 'benchmarks/probe_digits.py', argv, resume=False)


def seed_run(sweep, args, seed, weight):
    extra = ['--ce_weight', weight] if weight else []
    name = f'pd{seed}_ce{weight}'
    run = pretrain(sweep, args, name, seed, extra)
    linear = linear_args(seed, run.checkpoint, args.linear_epochs)
    return run, sweep.run(f'{name}_linear', 'main_linear.py', linear)


def run_sweep(args, sweep):
    lrs = [str(lr) for lr in args.sweep_lrs]
    jobs = [(s, w) for s in args.seeds for w in args.ce_weights]
    search, grid = sweep.map(
        lambda job: job(),
        [
            lambda: pretrain(sweep, args, 'probe_val', 0, ['--val_split', 0.2]),
            lambda: sweep.map(lambda s, w: seed_run(sweep, args, s, w), jobs),
        ],
    )
    sections = []
    if search is not None:
        values = [search[f'probe_lr{lr} accuracy'] for lr in lrs]
        chosen = max(zip(values, [-lr for lr in args.sweep_lrs]))
        rows = [['validation, last epoch'] + [f'{v:.2f}' for v in values]]
        title = f'--probe_lr (validation split; chosen: {-chosen[1]})'
        sections.append((title, harness.table(['probe rate'] + lrs, rows)))
    rows = []
    for weight in args.ce_weights:
        runs = [r for (s, w), r in zip(jobs, grid or []) if w == weight]
        finals = []
        for seed, r in zip(args.seeds, runs):
            if r is None:
                continue
            run, linear = r
            finals.append(linear['final accuracy'])
            probes = ' / '.join(f'{run[f"probe_lr{lr} accuracy"]:.2f}' for lr in lrs)
            ce = run.values.get('ce accuracy')
            rows.append([
                weight, seed, probes, '' if ce is None else f'{ce:.2f}',
                f'{finals[-1]:.2f} / {linear["best accuracy"]:.2f}', f'{run.seconds:.0f}',
            ])  # fmt: skip
        rows.append([weight, 'mean ± std', '', '', harness.mean_std(finals), ''])
    header = ['--ce_weight', 'seed', f'probe, last epoch, at {" / ".join(lrs)}']
    header += ['joint classifier', 'linear final / best', 'pretraining s']
    sections.append(('Test split', harness.table(header, rows)))
    sweep.report('Online probe and joint cross-entropy (digits)', sections)


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


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--sweep_lrs', type=float, nargs='+', default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument('--ce_weights', type=float, nargs='+', default=[0.0, 0.5, 1.0])
    parser.add_argument('--epochs', type=int, default=EPOCHS, help='pretraining epochs')
    parser.add_argument('--linear_epochs', type=int, default=LINEAR_EPOCHS)
    return harness.add_arguments(parser, out='save/bench/probe_digits', jobs=2)


if __name__ == '__main__':
    if len(sys.argv) > 3 and sys.argv[1] == '--with_probes' and sys.argv[3] == '--':
        run_with_probes([float(lr) for lr in sys.argv[2].split(',')], sys.argv[4:])
    else:
        harness.main(build, run_sweep)
