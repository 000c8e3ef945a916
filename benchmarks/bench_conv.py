"""Weight gradient of a bfloat16 3x3 convolution on the CPU: oneDNN's kernel vs the matrix
product of networks/cpu_bf16_conv.py.

    python benchmarks/bench_conv.py [--batch 256] [--repeats 3] [--threads N]

For each ResNet-18 layer shape (channels in = out, square maps, stride 1, padding 1, channels-last
bfloat16 tensors) it times ``aten.convolution_backward`` asked for the weight gradient only, and
``networks.cpu_bf16_conv.weight_grad_by_matmul``, and says which one ``--cpu_bf16_wgrad matmul``
(``MatmulWeightGradConv2d``) uses for that shape. Times are the minimum over the repeats, in ms.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from networks.cpu_bf16_conv import wants_matmul_weight_grad, weight_grad_by_matmul  # noqa: E402

SHAPES = [
    (64, 32),
    (64, 16),
    (64, 8),
    (128, 16),
    (128, 8),
    (128, 4),
    (256, 16),
    (256, 8),
    (256, 4),
    (512, 8),
    (512, 7),
    (512, 4),
    (512, 2),
]


def best_of(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--batch', type=int, default=256, help='images (both views of batch 128)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch},'
        f' bfloat16, '
        f'channels_last, 3x3 stride 1 padding 1\n'
    )
    print('| channels | map | oneDNN ms | matmul ms | oneDNN / matmul | matmul swap uses |')
    print('|---|---|---|---|---|---|', flush=True)
    for channels, size in SHAPES:

        def tensor(*shape):
            return (
                torch.randn(*shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
            )

        x, grad_out = (
            tensor(args.batch, channels, size, size),
            tensor(args.batch, channels, size, size),
        )
        weight = tensor(channels, channels, 3, 3)
        onednn = best_of(
            lambda: torch.ops.aten.convolution_backward(
                grad_out,
                x,
                weight,
                None,
                [1, 1],
                [1, 1],
                [1, 1],
                False,
                [0, 0],
                1,
                [False, True, False],
            ),
            args.repeats,
        )
        matmul = best_of(
            lambda: weight_grad_by_matmul(x, grad_out, (3, 3), (1, 1), (1, 1)), args.repeats
        )
        uses = 'matmul' if wants_matmul_weight_grad(size * size, channels) else 'oneDNN'
        print(
            f'| {channels} | {size}x{size} | {onednn:.1f} | {matmul:.1f} |'
            f' {onednn / matmul:.2f} | {uses} |',
            flush=True,
        )


if __name__ == '__main__':
    main()
