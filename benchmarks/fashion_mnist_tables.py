"""The configurations and the tables of benchmarks/fashion_mnist.py (which runs them)."""

import harness

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
    for scale in (0.2, 0.5, 0.8, 1.0)
}
BATCHES = {  # name: (batch, main_supcon.py's extra arguments)
    'batch 32': (32, []),
    'batch 32, --moco': (32, ['--moco']),
    'batch 128': (128, []),
    'batch 512, --grad_cache 128': (512, ['--grad_cache', 128]),
}
BATCH_SLUGS = dict(zip(BATCHES, ['b32', 'b32moco', 'b128', 'b512gc']))
TABLES = ('views', 'finetune', 'batch', 'methods', 'labels', 'long_tail')
FRACTIONS = (0.01, 0.1)
LABEL_ROWS = ('SupCon, partial labels', 'SupCon, labelled images only', 'SimCLR',
              'cross-entropy, labelled images')  # fmt: skip
LONG_TAIL = {  # name: main_supcon.py's extra arguments, with --imbalance_ratio 100
    'random batches': [],
    'balanced batches': ['--sampler', 'balanced', '--m_per_class', 16],
    '--moco': ['--moco'],
}
LONG_TAIL_EPOCHS = 8  # 14,886 images x 8 = 119k, as 2 epochs of the 60,000
FEW = 'many / medium / few-shot accuracy'
THIRDS = 'thirds by training count (many / medium / few)'


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


def labels_table(args, done):
    """``done``: {(fraction, row, seed): (pretraining, linear)}."""
    rows = []
    for fraction in FRACTIONS:
        for row in LABEL_ROWS:
            finals = [done[(fraction, row, s)][1]['final accuracy'] for s in args.seeds
                      if (fraction, row, s) in done]  # fmt: skip
            rows.append([fraction, row, harness.each(finals), f'**{harness.mean_std(finals)}**'])
    return harness.table(['labelled fraction', 'pretraining', 'per seed', 'linear top-1'], rows)


def long_tail_table(args, done):
    """``done``: {(config, seed): (pretraining, linear)}. The standard few-shot group (fewer than 20
    training images) is empty at ratio 100, whose rarest class keeps 60: the runs then print the
    thirds of the classes by training count, and the table reports the rarest third beside it."""
    header = ['batches', 'overall', 'mean per-class', 'rarest third of the classes',
              'few-shot (< 20 images)', 'anchors_without_positive',
              'per seed overall / per-class / rarest third']  # fmt: skip
    rows = []
    for config in LONG_TAIL:
        runs = [done[(config, s)] for s in args.seeds if (config, s) in done]
        overall = [linear['final accuracy'] for _, linear in runs]
        per_class = [linear['mean per-class accuracy'] for _, linear in runs]
        few = [linear[FEW][2] for _, linear in runs]
        rare = [linear.values.get(THIRDS, (None,) * 3)[2] for _, linear in runs]
        lonely = [pre.epochs[max(pre.epochs)]['anchors_without_positive'] for pre, _ in runs]
        each = ', '.join(harness.each(v) for v in zip(overall, per_class, rare))
        rows.append([config, harness.mean_std(overall), harness.mean_std(per_class),
                     harness.mean_std(rare), harness.mean_std(few), harness.mean_std(lonely, 3),
                     each])  # fmt: skip
    return harness.table(header, rows)


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
