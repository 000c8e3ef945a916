"""Frozen features of a trained encoder, in data-set order, every sample counted once under
torchrun: what the kNN monitor, the online probe's evaluation, retrieval and t-SNE read.
Rebuilding an encoder from a checkpoint is ``networks/from_checkpoint.py``'s job.
"""

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from supcon.system.distributed import all_gather_rows, is_distributed
from supcon.system.runtime import Runtime, autocast, is_main_process, to_device


@contextlib.contextmanager
def eval_mode(*modules):
    """Eval mode inside the block; each module's own train/eval mode is restored after."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _gather_rows(tensor, device):
    """Every rank's rows (ranks may hold different numbers), in rank order, on the CPU."""
    return all_gather_rows(tensor.to(device)).cpu()


def extract_features(
    encoder: nn.Module,
    loader,
    rt: Runtime,
    head=None,
    desc: str = 'features',
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every sample of ``loader``, on every rank, in data-set order.

    Under torchrun each rank extracts its own share (a ``pad=False`` loader) and
    the shares are gathered, so each sample is counted exactly once. ``head``
    maps encoder features to L2-normalised projections (``--features head``).
    Returns ``(features [N, D] float32, labels [N] int64)`` on the CPU (labels [N, C] uint8
    for multi-hot targets).
    """
    feats, labels = [], []
    total = len(loader)
    tick = max(1, total // 10)
    show = progress and is_main_process()
    with eval_mode(encoder, head), torch.no_grad():
        for i, (images, target) in enumerate(loader):
            images = to_device(images, rt)
            with autocast(rt):
                out = encoder(images)
                if head is not None:
                    out = head(out)
            out = out.float()
            if head is not None:
                out = F.normalize(out, dim=1)
            feats.append(out.cpu())
            target = torch.as_tensor(target)
            # multi-hot rows (--dataset csv) stay 0/1 bytes; class indices are int64
            labels.append(target.to(torch.uint8 if target.ndim == 2 else torch.int64))
            if show and ((i + 1) % tick == 0 or i + 1 == total):
                print(f'  {desc}: {i + 1}/{total} batches', flush=True)
    feats = torch.cat(feats) if feats else torch.zeros(0, 0)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)

    # the data-set index of each row, when the sampler can say (datasets.SeededSampler)
    sampler = getattr(loader, 'sampler', None)
    index = None
    if hasattr(sampler, 'rank_indices'):
        index = torch.as_tensor(sampler.rank_indices()[sampler.start :], dtype=torch.int64)
        if index.shape[0] != labels.shape[0]:
            index = None  # not this loader's order after all: keep rank order

    if is_distributed():
        device = rt.device if dist.get_backend() == 'nccl' else torch.device('cpu')
        # every rank must take part in the same collectives: use the indices only if all can
        usable = torch.tensor([int(index is not None)], device=device)
        dist.all_reduce(usable, op=dist.ReduceOp.MIN)
        if not usable.item():
            index = None
        # an empty share still has to send rows of the right width (features, and labels:
        # -1 for class indices, C for multi-hot rows)
        label_width = labels.shape[1] if labels.ndim == 2 else -1
        width = torch.tensor([feats.shape[1] if feats.numel() else -1, label_width], device=device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if feats.shape[0] == 0:
            feats = torch.zeros(0, int(width[0]))
            if width[1] >= 0:
                labels = torch.zeros(0, int(width[1]), dtype=torch.uint8)
        feats = _gather_rows(feats, device)
        labels = _gather_rows(labels, device)
        if index is not None:
            index = _gather_rows(index, device)
    if index is not None:
        # data-set order; a padded loader's repeated samples are kept once
        index, order = index.sort(stable=True)
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        feats, labels = feats[order[first]], labels[order[first]]
    return feats, labels
