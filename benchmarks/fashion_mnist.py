"""Fashion-MNIST tables on the CPU protocol (docs/fashion-mnist.md, docs/results.md).

    python benchmarks/fashion_mnist.py [--tables views finetune] [--seeds 0 1 2] [--jobs 2]

The protocol (chosen with main_ce.py on --val_split 0.1, docs/results.md): ResNet-18 with the
ImageNet stem, 28x28, ``--amp``, batch 128, cosine, all training images, 2 epochs of pretraining
(about 7 minutes of the idle 2 cores); the linear stage 2 epochs on un-augmented images
(``--aug none``, lr 0.1). SupCon's learning rate is chosen once, on seed 0 with ``--val_split 0.1``
for both stages (the test split is never read), among ``--supcon_lrs``; every table then uses it.

The contrastive augmentation is chosen next, the same way (seed 0, validation split, SupCon at
the chosen rate), among RandomResizedCrop's smallest area ``--crop_scale`` 0.2 (the reference's),
0.5 and 0.8, each with the reference's colour distortion (``--aug simclr``) and without it
(``--aug crop``); the tables after ``finetune`` use the winner (``views`` and ``finetune`` were
measured first, on the reference's augmentation, and keep it).

Tables (``--tables``, in this order):

- ``views``: SupCon with 2 views, 4 views, and 2 + 4 small views of 14 px (--small_views 4
  --small_size 14, with --cpu_bf16_wgrad matmul: on the CPU oneDNN's bfloat16 weight gradient is
  wrong where 14 px views reach a 1x1 map): linear top-1 on the test split and the time per
  pretraining epoch.
- ``finetune``: main_linear.py --finetune --aug none (encoder lr 0.01, the default) on the 2-view
  checkpoints, against their linear stage.
- ``batch``: SupCon at batch 32 plain and with ``--moco`` (queue 4096), at 128, and at 512 with
  ``--grad_cache 128``, the chosen augmentation; the learning rate scaled with the batch from the
  one chosen at 128 (linear scaling): linear top-1 and the time per pretraining epoch.
- ``methods``: SupCon (the batch table's 128 row), SimCLR (the chosen augmentation, its rate
  chosen on the validation split among ``--supcon_lrs``) and cross-entropy (``--aug none``, the
  protocol's, its rate chosen the same way), each followed by the same linear stage; every
  encoder's retrieval metrics (main_retrieval.py, test queries against the training images); and
  SupCon with ``--online_probe``: the probe's last value next to its run's linear stage.

Runs go in this order: the 2-view pretraining, its linear stage and its fine-tuning for every
seed, then the other views seed by seed. One intra-op thread per run (``--threads``); ``--jobs 2``
fills the 2 cores.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SIZE, BATCH, EPOCHS, TEMP = 28, 128, 2, 0.1
LINEAR_LR, LINEAR_EPOCHS = 0.1, 2
VIEWS = {  # name: main_supcon.py's extra arguments
    '2 views': [],
    '4 views': ['--n_views', 4],
    # 14 px crops reach a stride-2 convolution on a 1x1 map in the ImageNet stem's ResNet-18, whose
    # bfloat16 weight gradient oneDNN computes wrongly on the CPU (docs/views.md): the matrix
    # product computes those gradients instead
    '2 + 4 small views (14 px)': [
        '--small_views',
        4,
        '--small_size',
        14,
        '--cpu_bf16_wgrad',
        'matmul',
    ],
}
SLUGS = dict(zip(VIEWS, ['v2', 'v4', 'v2s4']))
AUGS = {  # (--aug, --crop_scale): the candidates of the contrastive augmentation
    f'{aug}, crop scale {scale}': (aug, scale)
    for aug in ('simclr', 'crop')
    for scale in (0.2, 0.5, 0.8)
}
BATCHES = {  # name: (batch, main_supcon.py's extra arguments)
    'batch 32': (32, []),
    'batch 32, --moco': (32, ['--moco']),
    'batch 128': (128, []),
    'batch 512, --grad_cache 128': (512, ['--grad_cache', 128]),
}
BATCH_SLUGS = dict(zip(BATCHES, ['b32', 'b32moco', 'b128', 'b512gc']))
TABLES = ('views', 'finetune', 'batch', 'methods')


def common(seed, stem=True):
    """The options of every script; main_linear.py takes the stem from the checkpoint."""
    stem = ['--stem', 'imagenet'] if stem else []
    return ['--dataset', 'fashion_mnist', '--model', 'resnet18', *stem, '--size', SIZE, '--amp',
            '--seed', seed, '--num_workers', 1, '--print_freq', 200]  # fmt: skip


def pretrain_args(seed, lr, extra=(), epochs=EPOCHS, batch=BATCH, method='SupCon'):
    return common(seed) + [
        '--method', method, '--batch_size', batch, '--learning_rate', lr, '--temp', TEMP,
        '--cosine', '--epochs', epochs, '--save_freq', epochs, *extra,
    ]  # fmt: skip


def linear_args(seed, ckpt, extra=()):
    return common(seed, stem=False) + [
        '--batch_size', BATCH, '--learning_rate', LINEAR_LR, '--cosine', '--aug', 'none',
        '--epochs', LINEAR_EPOCHS, '--ckpt', ckpt, *extra,
    ]  # fmt: skip


def supcon(sweep, name, seed, lr, extra=(), linear_extra=(), batch=BATCH, method='SupCon'):
    """Pretraining then the linear stage: (pretraining Result, linear Result)."""
    pre = sweep.run(
        name, 'main_supcon.py', pretrain_args(seed, lr, extra, batch=batch, method=method)
    )
    linear = sweep.run(f'{name}_linear', 'main_linear.py', linear_args(seed, pre.checkpoint,
                                                                       linear_extra))  # fmt: skip
    return pre, linear


def choose_lr(sweep, args):
    """SupCon's rate: the best linear top-1 on the validation split, seed 0, 2 views."""

    def score(lr):
        val = ['--val_split', 0.1]
        _, linear = supcon(sweep, f'val_supcon_lr{lr}', 0, lr, val, val)
        return linear['final accuracy']

    return sweep.choose_rate(score, args.supcon_lrs)


def aug_args(aug, scale):
    """main_supcon.py's arguments for one candidate: none for the reference's."""
    return (['--aug', aug] if aug != 'simclr' else []) + (
        ['--crop_scale', scale] if scale != 0.2 else []
    )


def aug_slug(aug, scale):
    return f'{aug}_c{scale}'


def choose_aug(sweep, lr):
    """The candidate of the best linear top-1 on the validation split (seed 0), and the scores."""
    val = ['--val_split', 0.1]

    def score(name):
        extra = aug_args(*AUGS[name])  # the reference's is the rate search's own run
        slug = f'val_aug_{aug_slug(*AUGS[name])}' if extra else f'val_supcon_lr{lr}'
        return supcon(sweep, slug, 0, lr, val + extra, val)[1]['final accuracy']

    scores = dict(zip(AUGS, sweep.map(score, list(AUGS))))
    if None in scores.values():
        raise harness.NotRun('a validation run is missing')
    return max(AUGS, key=lambda name: scores[name]), scores


def batch_job(sweep, lr, aug, config, seed):
    """One row of the batch table for one seed: (pretraining, linear)."""
    batch, extra = BATCHES[config]
    extra = aug_args(*aug) + extra
    if batch == BATCH and not extra:  # the reference's augmentation: the 2-view runs
        return supcon(sweep, f'v2_s{seed}', seed, lr)
    name = f'{BATCH_SLUGS[config]}_{aug_slug(*aug)}_s{seed}'
    return supcon(sweep, name, seed, lr * batch / BATCH, extra, batch=batch)


def batch_table(args, runs):
    """``runs``: {(config, seed): (pretraining, linear)}."""
    rows = []
    header = ['batch', 'lr', 'seed', 'linear final / best', 'pretraining s / epoch (wall)']
    for config in BATCHES:
        finals, times = [], []
        for seed in args.seeds:
            done = runs.get((config, seed))
            if not done:
                continue
            pre, linear = done
            finals.append(linear['final accuracy'])
            times.append(pre.seconds / EPOCHS)
            rate = pre.command[pre.command.index('--learning_rate') + 1]
            best = linear['best accuracy']
            rows.append([config, rate, seed, f'{finals[-1]:.2f} / {best:.2f}', f'{times[-1]:.0f}'])
        rows.append([config, '', 'mean ± std', f'**{harness.mean_std(finals)}**',
                     harness.mean_std(times, 0)])  # fmt: skip
    return harness.table(header, rows)


def ce_args(seed, lr, extra=()):
    """main_ce.py on the protocol: un-augmented images (docs/results.md, the CPU protocol)."""
    return common(seed) + [
        '--batch_size', BATCH, '--learning_rate', lr, '--cosine', '--aug', 'none',
        '--epochs', EPOCHS, '--save_freq', EPOCHS, *extra,
    ]  # fmt: skip


def retrieval(sweep, name, pre):
    args = ['--ckpt', pre.checkpoint, '--dataset', 'fashion_mnist', '--amp', '--num_workers', 1]
    return sweep.run(f'{name}_retrieval', 'main_retrieval.py', args)


def choose_method_rates(sweep, args, aug):
    """{'SimCLR': (lr, scores), 'cross-entropy': (lr, scores)}, chosen on the validation split
    (seed 0) as SupCon's was."""
    val = ['--val_split', 0.1]

    def simclr(lr):
        name = f'val_simclr_{aug_slug(*aug)}_lr{lr}'
        run = supcon(sweep, name, 0, lr, val + aug_args(*aug), val, method='SimCLR')
        return run[1]['final accuracy']

    def ce(lr):
        return sweep.run(f'val_ce_lr{lr}', 'main_ce.py', ce_args(0, lr, val))['final accuracy']

    kinds = {'SimCLR': simclr, 'cross-entropy': ce}
    chosen = sweep.map(lambda kind: sweep.choose_rate(kinds[kind], args.supcon_lrs), list(kinds))
    if None in chosen:
        raise harness.NotRun('a validation run is missing')
    return dict(zip(kinds, chosen))


def methods_job(sweep, lr, aug, rates, seed):
    """{row: (encoder's run, linear run, retrieval run)} of one seed, and the probe's runs."""
    sup = batch_job(sweep, lr, aug, 'batch 128', seed)
    rows = {'SupCon': sup}
    sim = supcon(sweep, f'simclr_{aug_slug(*aug)}_s{seed}', seed, rates['SimCLR'][0],
                 aug_args(*aug), method='SimCLR')  # fmt: skip
    rows['SimCLR'] = sim
    ce = sweep.run(f'ce_s{seed}', 'main_ce.py', ce_args(seed, rates['cross-entropy'][0]))
    rows['cross-entropy'] = (ce, sweep.run(f'ce_s{seed}_linear', 'main_linear.py',
                                           linear_args(seed, ce.checkpoint)))  # fmt: skip
    rows = {row: (*runs, retrieval(sweep, runs[0].name, runs[0])) for row, runs in rows.items()}
    probe = supcon(sweep, f'probe_{aug_slug(*aug)}_s{seed}', seed, lr,
                   aug_args(*aug) + ['--online_probe'])  # fmt: skip
    return rows, probe


def methods_table(args, done):
    """``done``: {seed: methods_job's result}."""
    header = ['method', 'seed', 'linear final', 'encoder top-1 (cross-entropy)', 'P@1', 'MAP@R']
    rows = []
    for row in ('SupCon', 'SimCLR', 'cross-entropy'):
        cols = {k: [] for k in header[2:]}
        for seed in args.seeds:
            if seed not in done:
                continue
            pre, linear, found = done[seed][0][row]
            own = pre['final accuracy'] if row == 'cross-entropy' else None
            values = [linear['final accuracy'], own, 100 * found['precision_at_1'],
                      100 * found['mean_average_precision_at_r']]  # fmt: skip
            for key, value in zip(header[2:], values):
                if value is not None:
                    cols[key].append(value)
            rows.append([row, seed] + ['' if v is None else f'{v:.2f}' for v in values])
        rows.append([row, 'mean ± std'] + [harness.mean_std(v) if v else '' for v in cols.values()])
    probe_rows, probes, linears = [], [], []
    for seed in args.seeds:
        if seed in done:
            pre, linear = done[seed][1]
            probes.append(pre['probe accuracy'])
            linears.append(linear['final accuracy'])
            probe_rows.append([seed, f'{probes[-1]:.2f}', f'{linears[-1]:.2f}'])
    probe_rows.append(['mean ± std', harness.mean_std(probes), harness.mean_std(linears)])
    probe_header = ['seed', 'online probe, last epoch', 'linear stage of the same run']
    return harness.table(header, rows) + '\n\n' + harness.table(probe_header, probe_rows)


def config_job(sweep, args, lr, config, seed):
    """One configuration of one seed: (pretraining, linear), and for 2 views with the
    ``finetune`` table also the fine-tuning: (pretraining, linear, fine-tuned)."""
    pre, linear = supcon(sweep, f'{SLUGS[config]}_s{seed}', seed, lr, VIEWS[config])
    if config != '2 views' or 'finetune' not in args.tables:
        return pre, linear
    tuned = sweep.run(f'v2_s{seed}_finetune', 'main_linear.py',
                      linear_args(seed, pre.checkpoint, ['--finetune']))  # fmt: skip
    return pre, linear, tuned


def seed_jobs(sweep, args, lr):
    """{seed: {config: runs}}: the 2-view runs (and fine-tuning) of every seed first, then the
    other views seed by seed, so that a sweep cut short has whole tables of the cheaper runs."""
    configs = list(VIEWS) if 'views' in args.tables else ['2 views']
    jobs = [('2 views', s) for s in args.seeds]
    jobs += [(c, s) for s in args.seeds for c in configs if c != '2 views']
    done = sweep.map(lambda c, s: config_job(sweep, args, lr, c, s), jobs)
    seeds = {s: {} for s in args.seeds}
    for (config, seed), runs in zip(jobs, done):
        if runs is not None:
            seeds[seed][config] = runs[:2]
            if len(runs) == 3:
                seeds[seed]['finetune'] = runs[2]
    return [seeds[s] for s in args.seeds]


def views_table(args, seeds):
    rows, header = [], ['views', 'seed', 'linear final / best', 'pretraining s / epoch (wall)']
    for config in VIEWS:
        finals, times = [], []
        for seed, done in zip(args.seeds, seeds):
            runs = (done or {}).get(config)
            if not runs:
                continue
            pre, linear = runs
            finals.append(linear['final accuracy'])
            times.append(pre.seconds / EPOCHS)  # every attempt's wall time: resumes included
            best = linear['best accuracy']
            rows.append([config, seed, f'{finals[-1]:.2f} / {best:.2f}', f'{times[-1]:.0f}'])
        rows.append([config, 'mean ± std', f'**{harness.mean_std(finals)}**',
                     harness.mean_std(times, 0)])  # fmt: skip
    return harness.table(header, rows)


def finetune_table(args, seeds):
    rows, linears, tuned = [], [], []
    for seed, done in zip(args.seeds, seeds):
        if not done or 'finetune' not in done:
            continue
        linears.append(done['2 views'][1]['final accuracy'])
        tuned.append(done['finetune']['final accuracy'])
        rows.append([seed, f'{linears[-1]:.2f}', f'{tuned[-1]:.2f}',
                     f'{done["finetune"].seconds:.0f}'])  # fmt: skip
    rows.append(['mean ± std', harness.mean_std(linears), harness.mean_std(tuned), ''])
    header = ['seed', 'linear stage', 'fine-tuned, `--aug none`', 'fine-tuning s']
    return harness.table(header, rows)


def run_sweep(args, sweep):
    sections = []
    lr, scores = None, {}
    try:
        lr, scores = choose_lr(sweep, args)
    except harness.NotRun:
        pass
    rows = [[r, f'{s:.2f}'] for r, s in sorted(scores.items())]
    title = f'SupCon learning rate (seed 0, validation split; chosen: {lr})'
    sections.append((title, harness.table(['lr', 'linear top-1, validation'], rows)))
    seeds = []
    if lr is not None:
        try:
            seeds = seed_jobs(sweep, args, lr)
        except harness.NotRun:
            pass
    if 'views' in args.tables:
        sections.append(('More views per image (test split)', views_table(args, seeds)))
    if 'finetune' in args.tables:
        sections.append(('Fine-tuning against the linear stage (test split)',
                         finetune_table(args, seeds)))  # fmt: skip
    aug, scores = None, {}
    if lr is not None and {'batch', 'methods'} & set(args.tables):
        try:
            aug, scores = choose_aug(sweep, lr)
        except harness.NotRun:
            pass
        rows = [[name, f'{score:.2f}'] for name, score in scores.items()]
        title = f'Contrastive augmentation (seed 0, validation split, lr {lr}; chosen: {aug})'
        sections.append((title, harness.table(['augmentation', 'linear top-1, validation'], rows)))
    if aug is not None:
        jobs = [(c, s) for s in args.seeds for c in BATCHES]
        try:
            done = sweep.map(lambda c, s: batch_job(sweep, lr, AUGS[aug], c, s), jobs)
        except harness.NotRun:
            done = [None] * len(jobs)
        runs = {job: result for job, result in zip(jobs, done) if result is not None}
        sections.append((f'Batch size ({aug}, test split)', batch_table(args, runs)))
    if aug is not None and 'methods' in args.tables:
        sections += methods_sections(sweep, args, lr, AUGS[aug])
    sweep.report('Fashion-MNIST', sections)


def methods_sections(sweep, args, lr, aug):
    rates, sections = {}, []
    try:
        rates = choose_method_rates(sweep, args, aug)
    except harness.NotRun:
        pass
    for kind, (rate, scores) in rates.items():
        rows = [[r, f'{s:.2f}'] for r, s in sorted(scores.items())]
        title = f'{kind} learning rate (seed 0, validation split; chosen: {rate})'
        sections.append((title, harness.table(['lr', 'top-1, validation'], rows)))
    if len(rates) == 2:
        try:
            done = sweep.map(lambda s: methods_job(sweep, lr, aug, rates, s), args.seeds)
        except harness.NotRun:
            done = [None] * len(args.seeds)
        done = {seed: runs for seed, runs in zip(args.seeds, done) if runs is not None}
        sections.append(('Methods (test split)', methods_table(args, done)))
    return sections


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tables', nargs='+', default=list(TABLES), choices=TABLES)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--supcon_lrs', type=float, nargs='+', default=[0.03, 0.1, 0.3])
    return harness.add_arguments(parser, out='save/bench/fashion_mnist', jobs=2)


if __name__ == '__main__':
    harness.main(build, run_sweep)
