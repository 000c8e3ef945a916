"""Fashion-MNIST tables on the CPU protocol (docs/fashion-mnist.md, docs/results.md).

    python benchmarks/fashion_mnist.py [--tables views finetune] [--seeds 0 1 2] [--jobs 2]

The protocol (chosen with main_ce.py on --val_split 0.1, docs/results.md): ResNet-18 with the
ImageNet stem, 28x28, ``--amp``, batch 128, cosine, all training images, 2 epochs of pretraining
(about 7 minutes of the idle 2 cores); the linear stage 2 epochs on un-augmented images
(``--aug none``, lr 0.1). SupCon's learning rate is chosen once, on seed 0 with ``--val_split 0.1``
for both stages (the test split is never read), among ``--supcon_lrs``; every table then uses it.

The contrastive augmentation is chosen next, the same way (seed 0, validation split, SupCon at
the chosen rate), among RandomResizedCrop's smallest area ``--crop_scale`` 0.2 (the reference's),
0.5, 0.8 and 1 (no crop: the whole image, flipped or not), each with the reference's colour
distortion (``--aug simclr``) and without it (``--aug crop``); the tables after ``finetune`` use
the winner (``views`` and ``finetune`` were measured first, on the reference's augmentation, and
keep it).

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
- ``labels``: ``--labelled_fraction`` 0.01 and 0.1: SupCon on partial labels, SupCon on the
  labelled images only (``--labelled_only``), SimCLR (no labels) and cross-entropy on a
  class-balanced subset of as many images (``main_ce.py --train_subset``); every linear stage on
  the labelled images its encoder's row learnt from (``main_linear.py --labelled_fraction``;
  cross-entropy's on its subset, the checkpoint's); runs on F of the images take
  2 / F epochs (200 and 20: as many images as 2 epochs of all), main_ce.py and main_linear.py
  scoring the test split after the last one only (``--eval_freq``); the rates of ``methods``.
- ``long_tail``: ``--imbalance_ratio 100`` (CIFAR-10-LT's ratio; 14,886 training images): SupCon
  with random batches, balanced batches (``--sampler balanced --m_per_class 16``: 8 classes of 16)
  and ``--moco``, 8 epochs and the linear stage 8 epochs on the same long tail (as many images
  as 2 epochs of all): overall, mean per-class and few-shot linear top-1, and pretraining's last
  ``anchors_without_positive``.

Runs go in this order: the 2-view pretraining, its linear stage and its fine-tuning for every
seed, then the other views seed by seed. One intra-op thread per run (``--threads``); ``--jobs 2``
fills the 2 cores.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from fashion_mnist_tables import (  # noqa: E402
    AUGS,
    BATCH,
    BATCH_SLUGS,
    BATCHES,
    EPOCHS,
    FRACTIONS,
    LABEL_ROWS,
    LINEAR_EPOCHS,
    LINEAR_LR,
    LONG_TAIL,
    LONG_TAIL_EPOCHS,
    SIZE,
    SLUGS,
    TABLES,
    TEMP,
    VIEWS,
    batch_table,
    finetune_table,
    labels_table,
    long_tail_table,
    methods_table,
    views_table,
)


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


def linear_args(seed, ckpt, extra=(), epochs=LINEAR_EPOCHS):
    return common(seed, stem=False) + [
        '--batch_size', BATCH, '--learning_rate', LINEAR_LR, '--cosine', '--aug', 'none',
        '--epochs', epochs, '--ckpt', ckpt, *extra,
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


def ce_args(seed, lr, extra=(), epochs=EPOCHS):
    """main_ce.py on the protocol: un-augmented images (docs/results.md, the CPU protocol)."""
    return common(seed) + [
        '--batch_size', BATCH, '--learning_rate', lr, '--cosine', '--aug', 'none',
        '--epochs', epochs, '--save_freq', epochs, *extra,
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


def labels_job(sweep, aug, rates, fraction, row, seed):
    """(pretraining, linear) of one row of the labels table, for one fraction and seed."""
    # runs on F of the images: 2 / F epochs, as many images as 2 epochs of all; main_ce.py and
    # main_linear.py score the test split after the last epoch only (--eval_freq)
    more = round(EPOCHS / fraction)
    once = ['--eval_freq', more]
    linear_more = ['--labelled_fraction', fraction, '--save_freq', more] + once
    slug, lr = aug_slug(*aug), rates['SupCon']

    def linear(name, pre, options=linear_more):  # main_linear.py's options after --ckpt
        args = linear_args(seed, pre.checkpoint, options, epochs=more)
        return pre, sweep.run(f'{name}_linear', 'main_linear.py', args)

    if row == 'cross-entropy, labelled images':
        # main_ce.py has no --labelled_fraction: it trains on a class-balanced subset of as many
        # images, and its linear stage on that subset (the checkpoint's), so that this row too
        # learns from F of the labels, not from two different sets of them
        subset = ['--train_subset', round(fraction * 60000)]
        name = f'ce_F{fraction}_s{seed}'
        pre = sweep.run(name, 'main_ce.py', ce_args(seed, rates['cross-entropy'], subset + once,
                                                    more))  # fmt: skip
        return linear(name, pre, ['--save_freq', more] + once)
    if row == 'SimCLR':  # its pretraining reads no labels: the methods table's
        pre = sweep.run(f'simclr_{slug}_s{seed}', 'main_supcon.py', pretrain_args(
            seed, rates['SimCLR'], aug_args(*aug), method='SimCLR'))  # fmt: skip
        return linear(f'simclr_{slug}_F{fraction}_s{seed}', pre)
    extra = aug_args(*aug) + ['--labelled_fraction', fraction]
    if row == 'SupCon, labelled images only':
        name = f'labonly_{slug}_F{fraction}_s{seed}'
        pre = sweep.run(name, 'main_supcon.py', pretrain_args(
            seed, lr, extra + ['--labelled_only'], epochs=more))  # fmt: skip
        return linear(name, pre)
    name = f'partial_{slug}_F{fraction}_s{seed}'
    return linear(name, sweep.run(name, 'main_supcon.py', pretrain_args(seed, lr, extra)))


def long_tail_job(sweep, lr, aug, config, seed):
    extra = aug_args(*aug) + ['--imbalance_ratio', 100] + LONG_TAIL[config]
    slug = {'random batches': 'random', 'balanced batches': 'balanced', '--moco': 'moco'}[config]
    name = f'lt_{slug}_{aug_slug(*aug)}_s{seed}'
    pre = sweep.run(name, 'main_supcon.py', pretrain_args(seed, lr, extra, epochs=LONG_TAIL_EPOCHS))
    linear = linear_args(seed, pre.checkpoint, epochs=LONG_TAIL_EPOCHS)
    return pre, sweep.run(f'{name}_linear', 'main_linear.py', linear)


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
    if lr is not None and {'batch', 'methods', 'labels', 'long_tail'} & set(args.tables):
        try:
            aug, scores = choose_aug(sweep, lr)
        except harness.NotRun:
            pass
        rows = [[name, f'{score:.2f}'] for name, score in scores.items()]
        title = f'Contrastive augmentation (seed 0, validation split, lr {lr}; chosen: {aug})'
        sections.append((title, harness.table(['augmentation', 'linear top-1, validation'], rows)))
    if aug is not None:
        jobs = [(c, s) for s in args.seeds for c in BATCHES]
        runs = mapped(sweep, lambda c, s: batch_job(sweep, lr, AUGS[aug], c, s), jobs)
        sections.append((f'Batch size ({aug}, test split)', batch_table(args, runs)))
    if aug is not None and {'methods', 'labels', 'long_tail'} & set(args.tables):
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
    if len(rates) == 2 and 'methods' in args.tables:
        done = mapped(sweep, lambda s: methods_job(sweep, lr, aug, rates, s), args.seeds)
        sections.append(('Methods (test split)', methods_table(args, done)))
    rates = {'SupCon': lr, **{kind: rate for kind, (rate, _) in rates.items()}}
    if len(rates) == 3 and 'labels' in args.tables:
        jobs = [(f, r, s) for s in args.seeds for f in FRACTIONS for r in LABEL_ROWS]
        done = mapped(sweep, lambda f, r, s: labels_job(sweep, aug, rates, f, r, s), jobs)
        sections.append(('Few labels (test split)', labels_table(args, done)))
    if 'long_tail' in args.tables:
        jobs = [(c, s) for s in args.seeds for c in LONG_TAIL]
        done = mapped(sweep, lambda c, s: long_tail_job(sweep, lr, aug, c, s), jobs)
        sections.append(('Long tail, --imbalance_ratio 100 (test split)',
                         long_tail_table(args, done)))  # fmt: skip
    return sections


def mapped(sweep, job, jobs):
    """{item: job(*item)} of the items whose runs finished."""
    try:
        done = sweep.map(job, jobs)
    except harness.NotRun:
        done = [None] * len(jobs)
    return {item: result for item, result in zip(jobs, done) if result is not None}


def build():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--tables', nargs='+', default=list(TABLES), choices=TABLES)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--supcon_lrs', type=float, nargs='+', default=[0.03, 0.1, 0.3])
    return harness.add_arguments(parser, out='save/bench/fashion_mnist', jobs=2)


if __name__ == '__main__':
    harness.main(build, run_sweep)
