"""Trained checkpoints for the tests of main_predict.py, main_export.py and --finetune, made
once per test session by conftest.py's ``digits_checkpoints`` fixture:

- ``encoder``: a main_supcon.py-layout checkpoint of an untrained resnet18 that records
  digits at --size 8 (the weights need not be good, only the same wherever they are read);
- ``linear``: main_linear.py on it, one epoch on digits at --size 8 (a real run: its printed
  ``final accuracy`` is what main_predict.py must reproduce);
- ``ce``: a main_ce.py-layout checkpoint (encoder and ``fc``) that records digits.
"""

import re
import shutil
from pathlib import Path

import torch
from helpers import reference_options
from inprocess import call, save_folder

from networks.resnet_big import SupCEResNet, SupConResNet
from supcon import options
from supcon.system import checkpoint

DIGITS = ['--dataset', 'digits', '--size', '8', '--num_workers', '0', '--device', 'cpu']
DIGIT_CLASSES = [str(d) for d in range(10)]


def build_digits_checkpoints(root):
    """{'encoder', 'linear', 'ce': path, 'final': the linear run's printed accuracy} in root."""
    encoder = root / 'pretrain' / 'last.pth'
    encoder.parent.mkdir()
    torch.manual_seed(0)
    net = SupConResNet('resnet18')
    digits = options.plain_options(reference_options(model='resnet18', dataset='digits', size=8))
    checkpoint.save_checkpoint({'model': net.state_dict(), 'epoch': 1, 'opt': digits}, str(encoder))
    # a long-tailed training split: a third of the steps, the whole test split
    args = DIGITS + ['--ckpt', encoder, '--batch_size', '128', '--epochs', '1', '--seed', '0']
    args += ['--aug', 'none', '--imbalance_ratio', '30', '--print_freq', '100']
    result = call('main_linear', args, root)
    assert result.code == 0, result.err
    final = re.findall(r'^final accuracy: ([\d.]+)$', result.out, flags=re.M)
    assert len(final) == 1, result.out
    linear = save_folder('main_linear', args, root) / 'last.pth'

    torch.manual_seed(1)
    net = SupCEResNet('resnet18', num_classes=10)
    ce = root / 'ce' / 'last.pth'
    ce.parent.mkdir()
    checkpoint.save_checkpoint({'model': net.state_dict(), 'epoch': 1, 'opt': digits}, str(ce))
    return dict(root=root, encoder=encoder, linear=linear, ce=ce, final=final[0])


def copy_of(path: Path, folder: Path) -> Path:
    """A copy of a checkpoint under ``folder``, for tests that move or break files."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    shutil.copyfile(path, target)
    return target
