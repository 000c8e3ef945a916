"""Peak memory and time per step of main_supcon.py with --grad_cache M, against without it.

    python benchmarks/bench_grad_cache.py [--batch_size 512] [--size 32] [--model resnet18]
        [--chunks 0 64 128] [--rounds 3] [--steps 2] [--warmup 1] [--threads N]
        [--device cpu] [--json FILE]

Every configuration (--chunks: the --grad_cache values, 0 = off) runs in a fresh subprocess in
every round, so its peak resident memory (ru_maxrss: the process's high-water mark, all of it:
Python, torch, the model, the batch and the activations) is its own; the configurations run in
turn within a round, in an order that rotates from round to round, so a shared machine's drift
reaches all of them alike. A subprocess builds the run as main_supcon.main() does
(bench_train.build_run: --dataset digits resized to --size, no loader workers) and runs
main_supcon.train() over warm-up + timed steps; a step's time runs from receiving its batch to
asking for the next, so loading is left out. The table gives the median over rounds of each
configuration's median step and of its peak, and both relative to the run without
--grad_cache.
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
    start_mib = rss_mib()
    main_supcon.train(batches, model, step, optimizer, 1, loop)
    steps = [asked - got for got, asked in zip(batches.got, batches.asked[1:])][args.warmup :]
    print(
        json.dumps(
            {
                'grad_cache': args.child,
                'step_s': statistics.median(steps),
                'steps_s': steps,
                'peak_mib': rss_mib(),
                'start_mib': start_mib,
            }
        ),
        flush=True,
    )


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
        '| --grad_cache | peak RSS MiB | x off | above the built run MiB | s / step | x off |',
        '|---|---|---|---|---|---|',
    ]
    for chunk in chunks:
        r = results[chunk]
        peak_x = f'{r["peak_mib"] / plain["peak_mib"]:.2f}' if plain else '-'
        step_x = f'{r["step_s"] / plain["step_s"]:.2f}' if plain else '-'
        lines.append(
            f'| {chunk or "off"} | {r["peak_mib"]:.0f} | {peak_x} |'
            f' {r["peak_mib"] - r["start_mib"]:.0f} | {r["step_s"]:.2f} | {step_x} |'
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
    parser.add_argument('--child', type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args)

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
    results = {
        chunk: {
            key: statistics.median(run[key] for run in runs)
            for key in ('step_s', 'peak_mib', 'start_mib')
        }
        for chunk, runs in rounds.items()
    }
    print(
        f'\n{args.model}, --batch_size {args.batch_size} --size {args.size}, {args.device},'
        f' {args.threads} threads; medians of {args.rounds} rounds x {args.steps} steps\n'
    )
    print(table(results, args.chunks))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'results': results, 'rounds': rounds}, f, indent=1)


if __name__ == '__main__':
    main()
