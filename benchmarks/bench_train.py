"""Images per second of real main_supcon.py training steps, per precision / memory-format / compile
setting.

    python benchmarks/bench_train.py [--configs fp32 amp ...] [--device cpu] [--model resnet18]
                                     [--size 32] [--batch_size 128] [--steps 8] [--warmup 2]
                                     [--num_workers N]
    python benchmarks/bench_train.py --epoch_time    # one full epoch, fp32 vs --amp
    python benchmarks/bench_train.py --rounds 3      # each configuration 3 times, interleaved
    python benchmarks/bench_train.py --device cuda --model resnet50

Every configuration runs in a fresh subprocess that builds its run exactly as main_supcon.main()
does (parse_option, setup_runtime, Bookkeeper, set_loader, set_model, set_optimizer, make_scaler,
Bookkeeper.restore) and then calls main_supcon.train() itself, over the real loader cut to
warmup + steps full batches. Timing comes from that loader wrapper: a step runs from the moment
train() asks for its batch to the moment it asks for the next one, so it includes the wait for
data, the forward, the loss, the SGD step and train()'s one host sync
per step (which makes CUDA timings honest without extra synchronisation).

Counting: a step of --batch_size B feeds the network 2 * B images (two views each). "img/s" counts
those 2 * B images per step; "samples/s" counts the B data-set images (the reference's "batch"). The
step time is the median over the timed steps; the warm-up steps (cuDNN autotuning, oneDNN primitive
creation, torch.compile) are excluded and their total time is reported on its own. "data %" is the
reference's DT over BT: time waiting for the loader over total step time, summed over the timed
steps.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# name: main_supcon.py flags. --amp means bfloat16 on CPU and on GPUs that support it (see
# runtime.configure_precision) and turns channels_last on unless --no-channels_last is given.
CONFIGS = {
    'fp32': [],
    'fp32+cl': ['--channels_last'],
    'amp': ['--amp'],
    'amp+cl': ['--amp', '--channels_last'],
    'amp-no-cl': ['--amp', '--no-channels_last'],
    'amp-bf16': ['--amp', '--amp_dtype', 'bfloat16'],
    'amp-fp16': ['--amp', '--amp_dtype', 'float16'],  # CUDA only: float16 with a gradient scaler
    'compile': ['--compile'],
    'amp+compile': ['--amp', '--compile'],
    'amp-fp16+compile': ['--amp', '--amp_dtype', 'float16', '--compile'],
    'amp-onednn-wgrad': ['--amp', '--cpu_bf16_wgrad', 'onednn'],  # the default since torch 2.14
    'amp-matmul-wgrad': ['--amp', '--cpu_bf16_wgrad', 'matmul'],
    'fp32+gpu_aug': ['--gpu_aug'],  # augmentation as batched tensor ops on the device (kornia)
    'amp+gpu_aug': ['--amp', '--gpu_aug'],
    'amp+probe': ['--amp', '--online_probe'],  # the linear probe's step (bench_probe.py: its share)
    'amp+ce': ['--amp', '--ce_weight', '0.5'],
    # more views per image (docs/views.md): compare their step times (img/s counts two views)
    'amp+views4': ['--amp', '--n_views', '4'],
    'amp+small4x6': ['--amp', '--small_views', '4', '--small_size', '6'],
}
DEFAULT_CONFIGS = {
    'cpu': ['fp32', 'amp', 'amp-matmul-wgrad', 'amp-no-cl', 'fp32+cl', 'compile', 'amp+compile'],
    'cuda': ['fp32', 'fp32+cl', 'amp', 'amp-no-cl', 'amp-fp16', 'compile', 'amp+compile'],
}


# --------------------------------------------------------------------------- one configuration
# (worker)


class TimedBatches:
    """The loader's first `limit` full batches (across epochs if needed), with when each was asked
    for and got.

    train() sees an ordinary iterable of (images, labels). asked[i] is when it asked for batch i,
    got[i] when it received it; asked[limit] is when it asked past the last one, i.e. when the last
    step had finished.
    """

    def __init__(self, loader, sampler, limit, batch_size):
        self.loader, self.sampler, self.limit, self.batch_size = loader, sampler, limit, batch_size
        self.epoch = 1
        self.asked, self.got = [], []

    def __len__(self):
        return self.limit

    @property
    def dataset(self):  # train() reads the classes (positives per anchor) from its loader's data
        return self.loader.dataset

    def _batches(self):
        while True:
            self.sampler.set_epoch(self.epoch)
            for images, labels in self.loader:
                # the short last batch of an epoch would time a different shape (and recompile under
                # --compile)
                if labels.shape[0] == self.batch_size:
                    yield images, labels
            self.epoch += 1

    def __iter__(self):
        batches = self._batches()
        for _ in range(self.limit):
            self.asked.append(time.perf_counter())
            batch = next(batches)
            self.got.append(time.perf_counter())
            yield batch
        self.asked.append(time.perf_counter())


def build_run(argv):
    """Everything main_supcon.main() builds before its epoch loop, in the same order; returns
    (opt, rt, book, train_loader, train_sampler, model, step, optimizer, loop)."""
    import main_supcon
    import util
    from supcon import capabilities
    from supcon.objectives.positives import TAGS
    from supcon.system import runtime
    from supcon.training import bookkeeping, loop, optim

    opt = main_supcon.parse_option(argv)
    rt = runtime.setup_runtime(opt)
    # the meters main_supcon.main() gives its Bookkeeper: the loss and the positives per anchor
    meters = {name: util.AverageMeter() for name in ('loss',) + TAGS}
    book = bookkeeping.Bookkeeper(opt, rt, meters=meters, fixed=capabilities.FIXED)
    train_loader, train_sampler, device_augment = main_supcon.set_loader(opt, rt)
    model, criterion = main_supcon.set_model(opt, rt)
    step = main_supcon.set_step(
        opt, rt, model, criterion, train_loader.dataset, meters, device_augment
    )
    optimizer = optim.build_optimizer(opt, model, extra=step.trained_by_the_run_optimizer())
    book.restore(model, optimizer, step.scaler, **step.state_modules())
    epochs = loop.EpochLoop(opt, rt, book, optimizer, step.scaler)
    return opt, rt, book, train_loader, train_sampler, model, step, optimizer, epochs


def script_argv(args, config):
    argv = [
        '--dataset',
        args.dataset,
        '--model',
        args.model,
        '--size',
        str(args.size),
        *(['--patch_size', str(args.patch_size)] if args.model.startswith('vit') else []),
        '--batch_size',
        str(args.batch_size),
        '--num_workers',
        str(args.num_workers),
        '--device',
        args.device,
        '--epochs',
        '1',
        '--print_freq',
        '1000000',
        '--seed',
        '0',
        '--trial',
        'bench',
    ]
    if args.data_folder:
        argv += ['--data_folder', args.data_folder]
    return argv + CONFIGS[config]


def describe(opt, rt):
    return {
        'amp_dtype': str(rt.amp_dtype).removeprefix('torch.') if rt.amp_dtype else 'float32',
        'channels_last': rt.channels_last,
        'compile': rt.compile,
        'num_workers': rt.num_workers,
        'device': str(rt.device),
        'conv_wgrad': opt.cpu_bf16_wgrad,
    }


def peak_memory(rt):
    import torch

    return torch.cuda.max_memory_allocated(rt.device) / 2**30 if rt.device.type == 'cuda' else None


def measure_steps(args, config):
    """Warm-up + timed steps of main_supcon.train(); per-step times in seconds."""
    import main_supcon

    opt, rt, book, loader, sampler, model, step, optimizer, loop = build_run(
        script_argv(args, config)
    )
    book.begin_epoch(1, sampler)
    batches = TimedBatches(loader, sampler, args.warmup + args.steps, rt.local_batch_size)
    loss = main_supcon.train(batches, model, step, optimizer, 1, loop)
    steps = [b - a for a, b in zip(batches.asked, batches.asked[1:])]
    data = [g - a for a, g in zip(batches.asked, batches.got)]
    timed, timed_data = steps[args.warmup :], data[args.warmup :]
    return dict(
        describe(opt, rt),
        kind='steps',
        loss=loss,
        batch_size=opt.batch_size,
        steps_per_epoch=len(loader),
        warmup_s=sum(steps[: args.warmup]),
        step_s=statistics.median(timed),
        data_share=sum(timed_data) / sum(timed),
        peak_gib=peak_memory(rt),
    )


def measure_epoch(args, config):
    """One whole main_supcon epoch (every batch, the short last one included) after a short
    warm-up."""
    import main_supcon

    opt, rt, book, loader, sampler, model, step, optimizer, loop = build_run(
        script_argv(args, config)
    )
    book.begin_epoch(1, sampler)
    warm = TimedBatches(loader, sampler, args.warmup, rt.local_batch_size)
    main_supcon.train(warm, model, step, optimizer, 1, loop)
    book.begin_epoch(2, sampler)
    start = time.perf_counter()
    loss = main_supcon.train(loader, model, step, optimizer, 2, loop)
    epoch_s = time.perf_counter() - start
    return dict(
        describe(opt, rt),
        kind='epoch',
        loss=loss,
        batch_size=opt.batch_size,
        steps_per_epoch=len(loader),
        warmup_s=sum(b - a for a, b in zip(warm.asked, warm.asked[1:])),
        epoch_s=epoch_s,
        images=len(loader.dataset),
        peak_gib=peak_memory(rt),
    )


# --------------------------------------------------------------------------- driver


def run_config_in_subprocess(args, config, model):
    """(result dict or None, error text); a fresh process so no config inherits another's caches or
    compiles."""
    command = [sys.executable, os.path.abspath(__file__), '--worker', config, '--model', model]
    for name in (
        'device',
        'size',
        'batch_size',
        'steps',
        'warmup',
        'num_workers',
        'dataset',
        'patch_size',
    ):
        command += [f'--{name}', str(getattr(args, name))]
    if args.data_folder:
        command += ['--data_folder', args.data_folder]
    if args.threads:
        command += ['--threads', str(args.threads)]
    if args.epoch_time:
        command.append('--epoch_time')
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired:
        return None, f'timed out after {args.timeout} s'
    lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
    if done.returncode != 0 or not lines:
        tail = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        return None, tail[-1] if tail else f'exit code {done.returncode}'
    return json.loads(lines[-1]), ''


def print_header(args):
    import torch

    device = args.device
    if device.startswith('cuda') and torch.cuda.is_available():
        device = f'{device} ({torch.cuda.get_device_name()})'
    print(
        f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}, '
        f'{", ".join(args.models)}, '
        f'--dataset {args.dataset} --size {args.size} --batch_size {args.batch_size} '
        f'(= {2 * args.batch_size} images through the network per step),'
        f' --num_workers {args.num_workers} '
        f'(capped at the CPUs)',
        flush=True,
    )


def collect(args, key):
    """Run every configuration args.rounds times, interleaved; returns ({config: median run},
    {config: error}).

    Interleaving (fp32, amp, ..., fp32, amp, ...) spreads the slow drifts of a shared machine over
    all configurations; the median run (by `key`) of each is reported, with all its values under
    'rounds'.
    """
    runs, errors = {label: [] for label, _, _ in args.entries}, {}
    for round_index in range(args.rounds):
        for label, model, config in args.entries:
            if label in errors:
                continue
            result, error = run_config_in_subprocess(args, config, model)
            if result is None:
                errors[label] = error
                continue
            runs[label].append(dict(result, model=model))
            print(
                f'round {round_index + 1}/{args.rounds} {label}: {key} {result[key]:.3f}',
                flush=True,
            )
    medians = {}
    for config, results in runs.items():
        if results:
            ordered = sorted(results, key=lambda r: r[key])
            medians[config] = dict(
                ordered[(len(ordered) - 1) // 2], rounds=[r[key] for r in results]
            )
    return medians, errors


def spread(result):
    """(max - min) / median of a configuration's rounds, in percent; '-' for a single round."""
    values = result['rounds']
    return (
        f'{100 * (max(values) - min(values)) / sorted(values)[(len(values) - 1) // 2]:.0f}%'
        if len(values) > 1
        else '-'
    )


def bench_steps(args):
    print_header(args)
    print(
        f'median of {args.steps} steps after {args.warmup} warm-up steps,'
        f' median of {args.rounds} interleaved '
        f'round(s); img/s counts both views (2 x batch), samples/s the data-set images\n',
        flush=True,
    )
    results, errors = collect(args, 'step_s')
    print(
        '\n| config | precision | channels_last | compile | step ms | img/s | samples/s | vs fp32 |'
        ' data % '
        '| warm-up s | peak GiB | spread |'
    )
    print('|---|---|---|---|---|---|---|---|---|---|---|---|', flush=True)
    for config, model, _plain in args.entries:
        if config in errors:
            print(f'| {config} | {errors[config]} ||||||||||', flush=True)
            continue
        result = results[config]
        base_label = 'fp32' if len(args.models) == 1 else f'{model}/fp32'
        base = results.get(base_label)
        images_per_s = 2 * result['batch_size'] / result['step_s']
        speedup = (
            f'{images_per_s / (2 * base["batch_size"] / base["step_s"]):.2f}x' if base else '-'
        )
        peak = f"{result['peak_gib']:.2f}" if result['peak_gib'] is not None else '-'
        print(
            f"| {config} | {result['amp_dtype']} | {'on' if result['channels_last'] else 'off'} | "
            f"{'yes' if result['compile'] else 'no'} | {1000 * result['step_s']:.0f} | "
            f"{images_per_s:.0f} | "
            f"{images_per_s / 2:.0f} | {speedup} | {100 * result['data_share']:.1f} | "
            f"{result['warmup_s']:.1f} | {peak} | {spread(result)} |",
            flush=True,
        )
    return results


def bench_epoch(args):
    print_header(args)
    print(
        f'one full epoch each ({args.warmup} warm-up steps first, not counted),'
        f' median of {args.rounds} '
        f'interleaved round(s)\n',
        flush=True,
    )
    results, errors = collect(args, 'epoch_s')
    print('\n| config | precision | channels_last | steps | epoch s | img/s | loss | spread |')
    print('|---|---|---|---|---|---|---|---|', flush=True)
    for config, _, _ in args.entries:
        if config in errors:
            print(f'| {config} | {errors[config]} |||||||', flush=True)
            continue
        result = results[config]
        print(
            f"| {config} | {result['amp_dtype']} | {'on' if result['channels_last'] else 'off'} | "
            f"{result['steps_per_epoch']} | {result['epoch_s']:.1f} | "
            f"{2 * result['images'] / result['epoch_s']:.0f} | {result['loss']:.3f} | "
            f"{spread(result)} |",
            flush=True,
        )
    if 'fp32' in results and 'amp' in results:
        print(
            '\nepoch time fp32 / --amp = '
            f"{results['fp32']['epoch_s'] / results['amp']['epoch_s']:.2f}",
            flush=True,
        )
    return results


def parse_option(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--device', type=str, default='cpu', help='cpu, cuda or cuda:N')
    parser.add_argument(
        '--model', type=str, default='resnet18', help='resnet18 on CPU; resnet50 for a GPU'
    )
    parser.add_argument(
        '--models',
        nargs='+',
        default=None,
        help='several models side by side (every config for each, interleaved); rows are'
        ' labelled model/config, e.g. --models resnet18 vit_tiny_patch16_224 convnext_atto',
    )
    parser.add_argument('--patch_size', type=int, default=4, help='--patch_size for vit* models')
    parser.add_argument(
        '--dataset', type=str, default='digits', help='digits runs offline (1437 images)'
    )
    parser.add_argument(
        '--data_folder', type=str, default=None, help='passed to main_supcon.py when given'
    )
    parser.add_argument('--size', type=int, default=32, help='crop size')
    parser.add_argument(
        '--batch_size', type=int, default=128, help='samples per step; the network sees twice'
    )
    parser.add_argument('--steps', type=int, default=8, help='timed steps per configuration')
    parser.add_argument(
        '--warmup', type=int, default=2, help='untimed steps first (compile, autotuning)'
    )
    parser.add_argument(
        '--configs',
        nargs='+',
        default=None,
        choices=sorted(CONFIGS),
        help='default: ' + '; '.join(f'{d}: {" ".join(c)}' for d, c in DEFAULT_CONFIGS.items()),
    )
    parser.add_argument(
        '--num_workers',
        type=int,
        default=os.cpu_count() or 1,
        help='loader workers (default: all CPUs), as main_supcon.py --num_workers',
    )
    parser.add_argument(
        '--skip_compile', action='store_true', help='leave out the --compile configurations'
    )
    parser.add_argument(
        '--epoch_time',
        action='store_true',
        help='time one full epoch of fp32 and of --amp instead and print their ratio',
    )
    parser.add_argument(
        '--threads', type=int, default=None, help='torch intra-op threads; default: torch\'s own'
    )
    parser.add_argument(
        '--rounds',
        type=int,
        default=1,
        help='run the configurations this many times, interleaved, and report medians',
    )
    parser.add_argument(
        '--timeout', type=int, default=1200, help='seconds allowed per configuration'
    )
    parser.add_argument(
        '--json', type=str, default=None, help='also write the results to this file'
    )
    parser.add_argument('--worker', choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error('--steps and --rounds must be at least 1 and --warmup at least 0')
    if args.data_folder:
        args.data_folder = os.path.abspath(args.data_folder)
    if args.configs is None:
        args.configs = (
            ['fp32', 'amp']
            if args.epoch_time
            else DEFAULT_CONFIGS['cuda' if args.device.startswith('cuda') else 'cpu']
        )
    if args.skip_compile:
        args.configs = [c for c in args.configs if 'compile' not in c]
    args.models = args.models or [args.model]
    # (row label, model, config): plain config names when there is one model
    args.entries = [
        (config if len(args.models) == 1 else f'{model}/{config}', model, config)
        for model in args.models
        for config in args.configs
    ]
    return args


def main():
    args = parse_option()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        measure = measure_epoch if args.epoch_time else measure_steps
        print(json.dumps(measure(args, args.worker)))
        return
    if args.epoch_time:
        results = bench_epoch(args)
    else:
        results = bench_steps(args)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(
                {
                    'args': {k: v for k, v in vars(args).items() if k != 'worker'},
                    'results': results,
                },
                f,
                indent=1,
            )


if __name__ == '__main__':
    main()
