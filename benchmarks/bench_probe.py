"""What --online_probe costs: its share of a main_supcon.py step, and the evaluation's of an epoch.

    python benchmarks/bench_probe.py [--size 12] [--batch_size 128] [--steps 30] [--warmup 3]
                                     [--fp32] [--threads 1] [--device cpu]

One process builds the run as main_supcon.main() does with --online_probe (bench_train.build_run;
digits, ResNet-18, --amp unless --fp32: demo_digits.sh's settings) and runs main_supcon.train() over
warm-up + timed steps. Inside every step the probe's two calls are timed (``heads(encoded,
labels)``: its forward on the detached features; ``heads.step``: its backward, the gradient
averaging and its SGD step); their share is the median of (probe time / step time) over the timed
steps, both measured in the same step, so a shared machine's drift cancels. Then one end-of-epoch
evaluation (``heads.evaluate``: the evaluation split's features extracted and scored) against an
epoch of training at the median step time.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402


def timed(function, spent):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=12)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--fp32', action='store_true', help='float32 instead of --amp')
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--json', default=None, help='also write the numbers here')
    args = parser.parse_args()

    import torch

    import main_supcon
    from supcon.system import runtime

    torch.set_num_threads(args.threads)
    argv = ['--dataset', 'digits', '--model', 'resnet18', '--size', str(args.size)]
    argv += ['--batch_size', str(args.batch_size), '--num_workers', '1', '--device', args.device]
    argv += ['--epochs', '1', '--print_freq', '1000000', '--seed', '0', '--trial', 'bench_probe']
    argv += ['--online_probe'] + ([] if args.fp32 else ['--amp'])
    opt, rt, book, loader, sampler, model, step, optimizer, loop = bench_train.build_run(argv)
    heads = step.heads
    forward_s, step_s = [], []
    heads.forward = timed(heads.forward, forward_s)
    heads.step = timed(heads.step, step_s)
    book.begin_epoch(1, sampler)
    batches = bench_train.TimedBatches(loader, sampler, args.warmup + args.steps, args.batch_size)
    main_supcon.train(batches, model, step, optimizer, 1, loop)
    steps = [b - a for a, b in zip(batches.asked, batches.asked[1:])][args.warmup :]
    probe = [f + s for f, s in zip(forward_s, step_s)][args.warmup :]
    shares = [p / s for p, s in zip(probe, steps)]

    encoder = runtime.unwrap(model).encoder
    heads.evaluate(encoder, 1)  # warm-up: the loader's worker starts
    start = time.perf_counter()
    heads.evaluate(encoder, 1)
    evaluate_s = time.perf_counter() - start
    epoch_s = statistics.median(steps) * len(loader)
    result = {
        'step_s': statistics.median(steps),
        'probe_s': statistics.median(probe),
        'probe_share': statistics.median(shares),
        'probe_share_max': max(shares),
        'evaluate_s': evaluate_s,
        'epoch_s': epoch_s,
        'evaluate_share': evaluate_s / epoch_s,
        'steps': args.steps,
        'evaluation_images': len(heads.evaluation.loader.dataset),
        'precision': 'fp32' if args.fp32 else 'amp',
        'threads': args.threads,
    }
    print(
        f'step {1000 * result["step_s"]:.1f} ms (median of {args.steps}), probe'
        f' {1000 * result["probe_s"]:.2f} ms: {100 * result["probe_share"]:.2f}% of a step'
        f' (largest {100 * result["probe_share_max"]:.2f}%)'
    )
    print(
        f'evaluation of {result["evaluation_images"]} images {evaluate_s:.2f} s:'
        f' {100 * result["evaluate_share"]:.1f}% of an epoch of {len(loader)} steps'
        f' ({epoch_s:.1f} s at the median step)'
    )
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
