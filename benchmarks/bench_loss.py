"""Time and peak memory of one forward+backward of the SupCon loss: plain formula vs
losses.SupConLoss.

    python benchmarks/bench_loss.py [--sizes 512 2048 8192] [--device cpu cuda] [--repeats 5]
        [--labels single jaccard any] [--classes 20] [--methods plain lean lean-chunked]

N = bsz * 2 views, D = 128, 10 classes for single labels; multi-hot labels ('jaccard', 'any': the
SupConLoss multilabel rule) have --classes columns, each set with probability 0.15 (about 3 classes
a sample, 4% of rows all zero at 20 classes). The plain formula is single-label only. Prints a
markdown table whose ratios are against the first row of the same device and N. Every (device, N,
labels, method) case runs in a fresh subprocess so that one case's peak cannot hide behind an
earlier, larger one.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from losses import SupConLoss  # noqa: E402

METHODS = ('plain', 'lean', 'lean-chunked')
LABELS = ('single', 'jaccard', 'any')


def plain_supcon_loss(features, labels, temperature=0.1, base_temperature=0.07):
    """The loss as the original repository writes it (contrast_mode='all'): every N x N step
    materialised."""
    bsz, n_views = features.shape[:2]
    labels = labels.reshape(-1, 1)
    same_label = (labels == labels.t()).float()
    contrast = torch.cat(torch.unbind(features, 1))
    similarity = contrast @ contrast.t() / temperature
    logits = similarity - similarity.max(1, keepdim=True).values.detach()
    not_self = torch.ones_like(logits).scatter(
        1, torch.arange(bsz * n_views, device=features.device)[:, None], 0
    )
    positives = same_label.repeat(n_views, n_views) * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    positive_count = positives.sum(1)
    positive_count = torch.where(
        positive_count < 1e-6, torch.ones_like(positive_count), positive_count
    )
    mean_log_prob_pos = (positives * log_prob).sum(1) / positive_count
    return (-(temperature / base_temperature) * mean_log_prob_pos).mean()


def make_loss(method, chunk_size, labels='single'):
    if method == 'plain':
        return plain_supcon_loss
    return SupConLoss(
        temperature=0.1,
        chunk_size=chunk_size if method == 'lean-chunked' else None,
        multilabel='jaccard' if labels == 'single' else labels,
    )


def make_inputs(n, dim, device, seed=0, labels='single', classes=20):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n // 2, 2, dim, generator=generator), dim=-1)
    if labels == 'single':
        targets = torch.randint(0, 10, (n // 2,), generator=generator)
    else:
        targets = (torch.rand(n // 2, classes, generator=generator) < 0.15).float()
    return features.to(device).requires_grad_(), targets.to(device)


def forward_backward(loss_fn, features, labels):
    loss_fn(features, labels).backward()
    features.grad = None


def synchronize(device):
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def measure_one_case(method, n, dim, device, repeats, chunk_size, labels='single', classes=20):
    """Peak memory above the inputs, then median time; runs inside its own subprocess."""
    loss_fn = make_loss(method, chunk_size, labels)
    # A tiny run first, so thread pools, BLAS workspaces and the CUDA context are not counted as the
    # loss's.
    forward_backward(loss_fn, *make_inputs(64, dim, device, 1, labels, classes))
    features, labels = make_inputs(n, dim, device, 0, labels, classes)
    synchronize(device)

    if device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        forward_backward(loss_fn, features, labels)
        synchronize(device)
        peak_bytes = torch.cuda.max_memory_allocated() - baseline
    else:
        # ru_maxrss is this process's resident high-water mark (KiB on Linux). The baseline is taken
        # after the inputs exist and libraries are warm, so the increase is what the
        # forward+backward itself
        # needed at
        # its peak. Tensors this large are mmap'ed by the allocator and returned on free, so RSS
        # follows live tensors, and every N x N temporary is fully written, so none of it is counted
        # as untouched pages.
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        forward_backward(loss_fn, features, labels)
        peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) * 1024

    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        forward_backward(loss_fn, features, labels)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {'time_ms': 1000 * statistics.median(times), 'peak_mib': peak_bytes / 2**20}


def run_case_in_subprocess(method, n, args, device, labels):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        '--worker',
        method,
        '--labels',
        labels,
        '--classes',
        str(args.classes),
        '--sizes',
        str(n),
        '--device',
        device,
        '--repeats',
        str(args.repeats),
        '--dim',
        str(args.dim),
        '--chunk-size',
        str(args.chunk_size),
    ] + (['--threads', str(args.threads)] if args.threads else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def parse_option():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--sizes',
        type=int,
        nargs='+',
        default=[512, 2048, 8192],
        help='N = bsz * 2 views; the plain formula needs about 8 N x N floats',
    )
    parser.add_argument(
        '--device',
        nargs='+',
        default=['cpu'] + (['cuda'] if torch.cuda.is_available() else []),
        help='devices to run on; default: cpu, and cuda when present',
    )
    parser.add_argument(
        '--repeats', type=int, default=5, help='timed runs per case, after one warm-up run'
    )
    parser.add_argument('--dim', type=int, default=128, help='feature dimension D')
    parser.add_argument(
        '--chunk-size', type=int, default=512, help='anchor rows per block for lean-chunked'
    )
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='CPU threads for torch; default: torch\'s own choice (all cores)',
    )
    parser.add_argument(
        '--labels',
        nargs='+',
        choices=LABELS,
        default=['single'],
        help='single labels, or multi-hot ones under SupConLoss(multilabel=...)',
    )
    parser.add_argument('--classes', type=int, default=20, help='columns of the multi-hot labels')
    parser.add_argument(
        '--methods',
        nargs='+',
        choices=METHODS,
        default=list(METHODS),
        help='plain is skipped for multi-hot labels',
    )
    parser.add_argument('--worker', choices=METHODS, help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    args = parse_option()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(
            json.dumps(
                measure_one_case(
                    args.worker,
                    args.sizes[0],
                    args.dim,
                    args.device[0],
                    args.repeats,
                    args.chunk_size,
                    args.labels[0],
                    args.classes,
                )
            )
        )
        return

    print(
        f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads, D={args.dim}, '
        f'chunk_size={args.chunk_size}, median of {args.repeats} runs after a warm-up\n'
    )
    print('| device | N | labels | method | time ms | peak MiB | time vs first | peak vs first |')
    print('|---|---|---|---|---|---|---|---|')
    for device in args.device:
        for n in args.sizes:
            first = None
            for labels in args.labels:
                for method in args.methods:
                    if method == 'plain' and labels != 'single':
                        continue
                    result = run_case_in_subprocess(method, n, args, device, labels)
                    first = first or result
                    print(
                        f"| {device} | {n} | {labels} | {method} | {result['time_ms']:.1f} | "
                        f"{result['peak_mib']:.1f} | "
                        f"{result['time_ms'] / first['time_ms']:.2f} | "
                        f"{result['peak_mib'] / max(first['peak_mib'], 1e-9):.2f} |",
                        flush=True,
                    )


if __name__ == '__main__':
    main()
