"""Fashion-MNIST's GPU protocol: SupCon + linear on all 60,000 images at 28x28, ResNet-18, as many
epochs as fit in a time budget (benchmarks/gpu.sh runs it; about 8 minutes by default).

    python benchmarks/fashion_mnist_gpu.py [--budget_s 480] [--data_folder DIR] [--device cuda]

1. Calibration: one pretraining epoch on a 10,240-image subset (the first epoch of a run carries
   cuDNN's and the loader's warm-up, so this is a slight overestimate of an epoch's time).
2. Pretraining: main_supcon.py (ResNet-18, CIFAR stem, 28x28, ``--amp``, batch 512, lr 0.25 (the
   reference's 0.5 at batch 1024, scaled linearly), temp 0.1, cosine with warm-up, ``--gpu_aug``
   when kornia is there) for E epochs, E chosen so that the pretraining takes about 80 % of what
   the budget has left after the calibration.
3. The linear stage: main_linear.py ``--aug none``, batch 512, lr 0.2 (the reference's 0.1 at
   batch 256, scaled linearly), cosine, as many epochs as fit in the rest (1 to 20).

It prints ``images/s`` of the pretraining (training images x epochs / the epoch times' sum) and
the linear stage's ``final accuracy`` on the test split, and writes both to ``--out``/result.json.
Runs work in ``--out`` (their ./save/ is there). Nothing is tuned on the test split; this is a
throughput-and-sanity figure for a lent GPU, not a table entry.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH_LINE = re.compile(r'^epoch (\d+), total time ([0-9.]+)', re.M)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--budget_s', type=float, default=480, help='the whole protocol, seconds')
    p.add_argument('--device', default='cuda')
    p.add_argument('--data_folder', default=None, help='the IDX files (default: the package)')
    p.add_argument('--out', default='/tmp/fashion_mnist_gpu')
    p.add_argument('--batch_size', type=int, default=512)
    p.add_argument('--num_workers', type=int, default=8)
    p.add_argument('--train_subset', type=int, default=None, help='(rehearsal only) fewer images')
    p.add_argument('--calibration_images', type=int, default=10240)
    p.add_argument('--max_epochs', type=int, default=200)
    return p.parse_args(argv)


def has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def run(args, script, extra, log):
    common = ['--dataset', 'fashion_mnist', '--model', 'resnet18', '--size', '28', '--amp',
              '--device', args.device, '--num_workers', str(args.num_workers), '--seed', '0',
              '--batch_size', str(args.batch_size), '--print_freq', '50']  # fmt: skip
    if args.data_folder:
        common += ['--data_folder', args.data_folder]
    command = [sys.executable, os.path.join(REPO, script)] + common + [str(a) for a in extra]
    print('$', ' '.join(command[1:]), flush=True)
    start = time.time()
    with open(log, 'w') as f:
        code = subprocess.run(command, cwd=args.out, stdout=f, stderr=subprocess.STDOUT).returncode
    text = open(log).read()
    if code != 0:
        print(text[-3000:])
        sys.exit(f'error: {script} exited {code} (log: {log})')
    return text, time.time() - start


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    aug = ['--gpu_aug'] if args.device.startswith('cuda') and has('kornia') else []
    pretrain = ['--method', 'SupCon', '--learning_rate', 0.25, '--temp', 0.1, '--cosine', '--warm']
    pretrain += aug
    images = args.train_subset or 60000
    calibration = min(args.calibration_images, images)
    text, _ = run(args, 'main_supcon.py', pretrain + ['--epochs', 1, '--train_subset', calibration,
                                                       '--trial', 'calibration'],
                  os.path.join(args.out, 'calibration.log'))  # fmt: skip
    per_image = float(EPOCH_LINE.findall(text)[-1][1]) / calibration
    left = args.budget_s - (time.time() - start)
    epochs = max(1, min(args.max_epochs, math.floor(0.8 * left / (per_image * images))))
    print(f'calibration: {1 / per_image:.0f} images/s; {left:.0f} s left: {epochs} epochs')
    subset = ['--train_subset', args.train_subset] if args.train_subset else []
    text, seconds = run(args, 'main_supcon.py', pretrain + ['--epochs', epochs, '--save_freq',
                                                             epochs, '--trial', 'gpu'] + subset,
                        os.path.join(args.out, 'pretrain.log'))  # fmt: skip
    times = [float(t) for _, t in EPOCH_LINE.findall(text)]
    rate = images * len(times) / sum(times)
    ckpt = re.findall(r'^saved (\S+last\.pth)\s*$', text, re.M)[-1]
    left = args.budget_s - (time.time() - start)
    linear_epochs = max(1, math.floor(0.8 * left / (per_image * images / 3)))
    linear_epochs = min(linear_epochs, 20)
    text, _ = run(args, 'main_linear.py', ['--ckpt', os.path.join(args.out, ckpt), '--aug', 'none',
                                           '--learning_rate', 0.2, '--cosine', '--epochs',
                                           linear_epochs] + subset,
                  os.path.join(args.out, 'linear.log'))  # fmt: skip
    final = float(re.findall(r'^final accuracy: ([0-9.]+)', text, re.M)[-1])
    result = {'pretrain_epochs': len(times), 'pretrain_images_per_s': round(rate, 1),
              'pretrain_s': round(seconds, 1), 'linear_epochs': linear_epochs,
              'final_accuracy': final, 'total_s': round(time.time() - start, 1)}  # fmt: skip
    json.dump(result, open(os.path.join(args.out, 'result.json'), 'w'), indent=1)
    print(f'images/s: {rate:.0f} (pretraining, {len(times)} epochs)')
    print(f'final accuracy: {final:.2f} (linear, {linear_epochs} epochs, test split)')
    print(json.dumps(result))


if __name__ == '__main__':
    main()
