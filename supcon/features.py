"""Frozen features of a trained encoder: extraction, a weighted kNN classifier, a kNN monitor.

The kNN accuracy is the cheap label-free-training probe of InstDisc and MoCo:
no classifier is trained, so it can run every few epochs of pretraining.
Rebuilding an encoder from a checkpoint is ``networks/from_checkpoint.py``'s job.
"""

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from supcon import data
from supcon.augment import test_transform
from supcon.distributed import all_gather_rows, is_distributed
from supcon.errors import UserError
from supcon.runtime import Runtime, autocast, is_main_process, main_process_first, to_device
from supcon.sampling import build_loader

# --------------------------------------------------------------------------- extraction


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
    Returns ``(features [N, D] float32, labels [N] int64)`` on the CPU.
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
            labels.append(torch.as_tensor(target, dtype=torch.int64))
            if show and ((i + 1) % tick == 0 or i + 1 == total):
                print(f'  {desc}: {i + 1}/{total} batches', flush=True)
    feats = torch.cat(feats) if feats else torch.zeros(0, 0)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)

    # the data-set index of each row, when the sampler can say (data.SeededSampler)
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
        # an empty share still has to send rows of the right width
        width = torch.tensor([feats.shape[1] if feats.numel() else -1], device=device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if feats.shape[0] == 0:
            feats = torch.zeros(0, int(width))
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


# --------------------------------------------------------------------------- kNN


def knn_votes(
    train_features,
    train_labels,
    test_features,
    num_classes,
    k=200,
    temperature=0.07,
    chunk_size=None,
):
    """Each test row's summed vote per class [N, num_classes] of the weighted kNN (InstDisc,
    Wu et al., 2018, as the MoCo monitor uses it).

    Cosine similarity to the k nearest training features (k capped at their
    number), each neighbour voting exp(similarity / temperature) for its class.
    Test rows go in chunks so the similarity matrix never exceeds about 16M entries.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float().to(train.device), dim=1)
    train_labels = train_labels.to(train.device, torch.int64)
    k = max(1, min(int(k), train.shape[0]))
    if chunk_size is None:
        chunk_size = max(1, min(1024, (1 << 24) // max(1, train.shape[0])))
    votes = []
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.t()
        weights, neighbours = sim.topk(k, dim=1)
        chunk = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        chunk.scatter_add_(1, train_labels[neighbours], (weights / temperature).exp())
        votes.append(chunk)
    if not votes:
        return torch.zeros(0, num_classes, device=train.device)
    return torch.cat(votes)


def knn_predict(
    train_features,
    train_labels,
    test_features,
    num_classes,
    k=200,
    temperature=0.07,
    chunk_size=None,
):
    """The class with the largest summed vote of ``knn_votes``, per test row (on the CPU)."""
    votes = knn_votes(
        train_features, train_labels, test_features, num_classes, k, temperature, chunk_size
    )
    return votes.argmax(dim=1).cpu()


def knn_accuracy(
    train_features, train_labels, test_features, test_labels, num_classes, k=200, temperature=0.07
):
    """Top-1 accuracy in percent of ``knn_predict`` on the test features."""
    pred = knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    if pred.numel() == 0:
        return 0.0
    return 100.0 * (pred == test_labels.cpu()).double().mean().item()


class KNNMonitor:
    """kNN top-1 of the test split against the un-augmented training split (--knn_every).

    With ``--val_split`` the held-out training images take the test split's place (and
    the memory bank is the rest of the training images), so the test split stays unread.
    Both loaders are built once; every call re-extracts both sets with the
    current encoder, since the memory bank changes as the encoder trains.
    """

    def __init__(self, opt, rt, k=200, temperature=0.07):
        if opt.dataset == 'path' and opt.test_folder is None and not opt.val_split:
            raise UserError(
                '--knn_every needs --test_folder with --dataset path (the kNN'
                ' accuracy is measured on the test images); add --test_folder'
                ' or drop --knn_every'
            )
        self.rt, self.k, self.temperature = rt, k, temperature
        mean, std = data.resolve_mean_std(opt.dataset, opt.mean, opt.std)
        transform = test_transform(opt.size, mean, std)
        splits = dict(
            data_folder=opt.data_folder,
            test_folder=opt.test_folder,
            val_split=opt.val_split,
            # the memory bank is the run's own (long-tailed) training split; 'test' ignores these
            imbalance_ratio=getattr(opt, 'imbalance_ratio', 1.0),
            imbalance_seed=rt.seed,
        )
        self.held_out = 'held-out' if splits['val_split'] else 'test'
        with main_process_first():
            train_set = data.build_dataset(opt.dataset, 'train', transform, **splits)
            test_set = data.build_dataset(opt.dataset, 'test', transform, **splits)
        # the labels are class indices: they mean the same only if both splits have the
        # same classes (main_ce.py and main_linear.py check the same)
        data.check_same_classes(train_set, test_set)
        # training reads the training images in its first epoch; the test images are first
        # read at epoch --knn_every, so a broken one is found now rather than then
        data.check_images(test_set, max(1, rt.num_workers))
        self.num_classes = len(train_set.classes)
        self.train_loader, self.test_loader = [
            build_loader(
                dataset,
                rt.local_batch_size_val,
                shuffle=False,
                pad=False,
                **rt.loader_options(),
            )[0]
            for dataset in (train_set, test_set)
        ]

    def __call__(self, encoder, epoch):
        start = time.time()
        with eval_mode(encoder):
            train_x, train_y = extract_features(
                encoder, self.train_loader, self.rt, desc=f'knn epoch {epoch}: train split'
            )
            test_x, test_y = extract_features(
                encoder,
                self.test_loader,
                self.rt,
                desc=f'knn epoch {epoch}: {self.held_out} split',
            )
        device = self.rt.device
        acc = knn_accuracy(
            train_x.to(device),
            train_y,
            test_x.to(device),
            test_y,
            self.num_classes,
            self.k,
            self.temperature,
        )
        if is_main_process():
            print(f'knn_acc epoch {epoch}: {acc:.2f}', flush=True)
            print(
                f'  (kNN over {len(test_y)} {self.held_out} and {len(train_y)} train images took'
                f' {time.time() - start:.1f} s)',
                flush=True,
            )
        return acc
