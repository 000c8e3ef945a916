"""Peak memory and time per step of main_supcon.py with --grad_cache M, against without it.

    python benchmarks/bench_grad_cache.py [--batch_size 512] [--size 32] [--model resnet18]
        [--chunks 0 64 128] [--rounds 3] [--steps 2] [--warmup 1] [--threads N]
        [--device cpu] [--json FILE]
    python benchmarks/bench_grad_cache.py --largest --device cuda --model resnet50 --amp
        [--chunks 0 128] [--max_batch 32768] [--search_s 50]

Every configuration (--chunks: the --grad_cache values, 0 = off) runs in a fresh subprocess in
every round, so its peak resident memory (ru_maxrss: the process's high-water mark, all of it:
Python, torch, the model, the batch and the activations) is its own; the configurations run in
turn within a round, in an order that rotates from round to round, so a shared machine's drift
reaches all of them alike. A subprocess builds the run as main_supcon.main() does
(bench_train.build_run: --dataset digits resized to --size, no loader workers) and runs
main_supcon.train() over warm-up + timed steps; a step's time runs from receiving its batch to
asking for the next, so loading is left out, in wall-clock seconds and in the process's CPU
seconds (which other jobs on a shared machine disturb far less). The table gives the median
over rounds of each configuration's median step and of its peak, and each relative to the run
without --grad_cache.

``--largest`` (a GPU): for each --chunks value, the largest --batch_size whose step fits in the
device's memory (doubling from --start_batch, then halving the gap three times; at most
--max_batch, and the doubling stops after --search_s seconds) and the images per second of
main_supcon.py's step at it, on random images already on the device (no loader), in one
process that frees the memory after each out-of-memory error.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def rss_mib():
    """This process's peak resident memory so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_timed(batches):
    """``batches`` (a ``bench_train.TimedBatches``) also noting the process's CPU time of each
    step (``cpu``): on a shared machine it counts this process's work alone."""

    class CpuTimed(type(batches)):
        def __iter__(self):
            self.cpu = []
            for batch in super().__iter__():
                start = time.process_time()
                yield batch
                self.cpu.append(time.process_time() - start)

    batches.__class__ = CpuTimed
    return batches


def child(args):
    """One configuration in this process; prints its numbers as one JSON line."""
    import bench_train
    import torch

    import main_supcon

    torch.set_num_threads(args.threads)
    argv = ['--dataset', 'digits', '--model', args.model, '--size', str(args.size)]
    argv += ['--batch_size', str(args.batch_size), '--num_workers', '0', '--device', args.device]
    argv += ['--epochs', '1', '--print_freq', '1000000', '--seed', '0', '--trial', 'bench_gc']
    argv += ['--grad_cache', str(args.child)]
    os.chdir(tempfile.mkdtemp(prefix='bench_grad_cache_'))  # the run's ./save goes there
    opt, rt, book, loader, sampler, model, step, optimizer, loop = bench_train.build_run(argv)
    book.begin_epoch(1, sampler)
    batches = bench_train.TimedBatches(loader, sampler, args.warmup + args.steps, args.batch_size)
    batches = cpu_timed(batches)
    start_mib = rss_mib()
    main_supcon.train(batches, model, step, optimizer, 1, loop)
    steps = [asked - got for got, asked in zip(batches.got, batches.asked[1:])][args.warmup :]
    print(
        json.dumps(
            {
                'grad_cache': args.child,
                'step_s': statistics.median(steps),
                'steps_s': steps,
                'cpu_s': statistics.median(batches.cpu[args.warmup :]),
                'peak_mib': rss_mib(),
                'start_mib': start_mib,
            }
        ),
        flush=True,
    )


def step_rate(args, batch, chunk):
    """Images per second of main_supcon.py's step at ``batch`` (--grad_cache ``chunk``) on
    random images on the device, or None when it runs out of device memory."""
    import gc
    import types

    import torch

    import main_supcon
    from supcon.objectives.positives import TAGS
    from supcon.objectives.step import TrainingStep
    from supcon.system import runtime
    from supcon.training.optim import build_optimizer
    from util import AverageMeter

    argv = ['--model', args.model, '--size', str(args.size), '--batch_size', str(batch)]
    argv += ['--device', args.device, '--seed', '0', '--grad_cache', str(chunk)]
    argv += ['--amp'] if args.amp else []
    opt = main_supcon.parse_option(argv)
    rt = runtime.setup_runtime(opt)
    classes = argparse.Namespace(classes=[str(c) for c in range(10)], targets=[0])
    meters = {tag: AverageMeter() for tag in TAGS}
    try:
        model, criterion = main_supcon.set_model(opt, rt)
        step = TrainingStep(opt, rt, model, criterion, classes, meters)
        optimizer = build_optimizer(opt, model)
        shape = (batch, 3, args.size, args.size)
        views = [torch.randn(shape, device=rt.device) for _ in range(2)]
        labels = torch.randint(0, 10, (batch,), device=rt.device)

        def synchronize():  # wait for the device's queue
            if rt.device.type == 'cuda':
                torch.cuda.synchronize(rt.device)

        model.train()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                synchronize()
                start = time.perf_counter()
            loop = types.SimpleNamespace(epoch=1, step=i, steps=100, log_views=lambda *a, **k: 0)
            batch_ = step.views(views, labels, loop)
            out = step.forward(model, batch_)
            loss = step.loss(out, batch_)
            optimizer.zero_grad(set_to_none=True)
            step.backward(loss, out)
            step.optimizer_step(optimizer, batch_)
        synchronize()
        return batch * args.steps / (time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        model = step = optimizer = views = labels = out = loss = batch_ = None
        gc.collect()
        if rt.device.type == 'cuda':
            torch.cuda.empty_cache()


def report(chunk, batch, rate):
    done = 'out of memory' if rate is None else f'{rate:.0f} images/s'
    print(f'--grad_cache {chunk} --batch_size {batch}: {done}', flush=True)


def largest(args):
    """The largest batch that fits for each --chunks value, and its images per second."""
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for chunk in args.chunks:
        unit = max(chunk, 64)  # batches stay multiples of the chunk
        batch, fits, fails, start = max(args.start_batch // unit, 1) * unit, None, None, time.time()
        while batch <= args.max_batch:
            rate = step_rate(args, batch, chunk)
            report(chunk, batch, rate)
            if rate is None:
                fails = batch
                break
            fits = (batch, rate)
            if time.time() - start > args.search_s:
                break
            batch *= 2
        for _ in range(3 if fits and fails else 0):  # halve the gap between fits and fails
            middle = (fits[0] + fails) // 2 // unit * unit
            if middle in (fits[0], fails):
                break
            rate = step_rate(args, middle, chunk)
            report(chunk, middle, rate)
            if rate is None:
                fails = middle
            else:
                fits = (middle, rate)
        if fits is None:
            rows.append(f'| {chunk or "off"} | none fits | - |')
            continue
        bound = f' (the doubling stopped at {fits[0]})' if fails is None else ''
        rows.append(f'| {chunk or "off"} | {fits[0]}{bound} | {fits[1]:.0f} |')
    print(f'\n{args.model}, --size {args.size}{" --amp" if args.amp else ""}, {args.device}\n')
    print('| --grad_cache | largest --batch_size | images / s |\n|---|---|---|')
    print('\n'.join(rows))


def run_child(args, chunk):
    command = [sys.executable, os.path.abspath(__file__), '--child', str(chunk)]
    for name in ('batch_size', 'size', 'model', 'steps', 'warmup', 'threads', 'device'):
        command += [f'--{name}', str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        sys.exit(f'--grad_cache {chunk} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results, chunks):
    plain = results.get(0)
    lines = [
        '| --grad_cache | peak RSS MiB | x off | above the built run MiB | s / step | x off'
        ' | CPU s / step | x off |',
        '|---|---|---|---|---|---|---|---|',
    ]

    def times(r, key):
        return f'{r[key] / plain[key]:.2f}' if plain else '-'

    for chunk in chunks:
        r = results[chunk]
        lines.append(
            f'| {chunk or "off"} | {r["peak_mib"]:.0f} | {times(r, "peak_mib")} |'
            f' {r["peak_mib"] - r["start_mib"]:.0f} | {r["step_s"]:.2f} | {times(r, "step_s")} |'
            f' {r["cpu_s"]:.2f} | {times(r, "cpu_s")} |'
        )
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--batch_size', type=int, default=512)
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--model', default='resnet18')
    parser.add_argument(
        '--chunks', type=int, nargs='+', default=[0, 64, 128], help='--grad_cache values; 0: off'
    )
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=2, help='timed steps per run')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps first')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--timeout', type=int, default=3600, help='seconds per run')
    parser.add_argument('--json', default=None, help='also write the numbers here')
    parser.add_argument('--largest', action='store_true', help='the largest batch that fits')
    parser.add_argument('--amp', action='store_true', help='--largest: mixed precision')
    parser.add_argument('--start_batch', type=int, default=256, help='--largest: first try')
    parser.add_argument('--max_batch', type=int, default=32768, help='--largest: last try')
    parser.add_argument(
        '--search_s', type=float, default=50, help='--largest: seconds of doubling per value'
    )
    parser.add_argument('--child', type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args)
    if args.largest:
        return largest(args)

    rounds = {chunk: [] for chunk in args.chunks}
    for r in range(args.rounds):
        shift = r % len(args.chunks)
        for chunk in args.chunks[shift:] + args.chunks[:shift]:
            start = time.time()
            result = run_child(args, chunk)
            rounds[chunk].append(result)
            print(
                f'round {r + 1}/{args.rounds} --grad_cache {chunk}: {result["step_s"]:.2f} s/step,'
                f' peak {result["peak_mib"]:.0f} MiB ({time.time() - start:.0f} s)',
                flush=True,
            )
        # the table so far after every round: a long run stopped early still has one
        results = {
            chunk: {
                key: statistics.median(run[key] for run in runs)
                for key in ('step_s', 'cpu_s', 'peak_mib', 'start_mib')
            }
            for chunk, runs in rounds.items()
        }
        print(
            f'\n{args.model}, --batch_size {args.batch_size} --size {args.size}, {args.device},'
            f' {args.threads} threads; medians of {r + 1} rounds x {args.steps} steps\n',
            flush=True,
        )
        print(table(results, args.chunks) + '\n', flush=True)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump({'args': vars(args), 'results': results, 'rounds': rounds}, f, indent=1)


if __name__ == '__main__':
    main()
