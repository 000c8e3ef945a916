"""Seeded sampling: data order and augmentation fixed by (seed, epoch), resumable mid-epoch,
sharded over torchrun ranks.

Every item is loaded with torch's RNG seeded from (seed, epoch, index), so its
augmentation is the same in any worker, on any rank and after a resume.
"""

import hashlib
import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from supcon.errors import UserError


def mix_seed(*parts) -> int:
    """A 63-bit integer determined only by `parts` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & ((1 << 63) - 1)


class ResumablePosition:
    """``set_epoch`` / ``set_start`` of the project's training samplers: the epoch seeds their
    order, ``start`` is the batch a resumed epoch begins at."""

    epoch = 0
    start = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def set_start(self, k):
        if k < 0:
            raise ValueError(f'start must be >= 0, got {k}')
        self.start = int(k)


class SeededSampler(ResumablePosition, Sampler):
    """Yields (sample_seed, index) for this rank; order and seeds depend on (seed, epoch) only.

    Like DistributedSampler, each rank takes every world_size-th index of one
    shared permutation, padded (pad=True) by repeating its head so all ranks get
    the same number of items. Use pad=False for evaluation: every sample is then
    seen exactly once across ranks, and ranks may differ by one item.
    `set_start(k)` skips this rank's first k items until it is set back to 0.
    """

    def __init__(self, num_samples, *, shuffle, seed, rank=0, world_size=1, pad=True):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f'need 0 <= rank < world_size, got rank={rank}, world_size={world_size}'
            )
        if num_samples < 0:
            raise ValueError(f'num_samples must be >= 0, got {num_samples}')
        self.num_samples = int(num_samples)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def _rank_share_size(self):
        if self.pad:
            return math.ceil(self.num_samples / self.world_size)
        return len(range(self.rank, self.num_samples, self.world_size))

    def rank_indices(self):
        """This rank's indices for the current epoch, before skipping `start`."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(mix_seed('order', self.seed, self.epoch))
            indices = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            indices = list(range(self.num_samples))
        if self.pad and indices:
            padding = math.ceil(self.num_samples / self.world_size) * self.world_size - len(indices)
            repeats = math.ceil(padding / len(indices))
            indices += (indices * repeats)[:padding]
        return indices[self.rank :: self.world_size]

    def __iter__(self):
        for index in self.rank_indices()[self.start :]:
            yield mix_seed('sample', self.seed, self.epoch, index), index

    def __len__(self):
        return max(0, self._rank_share_size() - self.start)


class SeededDataset(Dataset):
    """Loads item `index` with torch's RNG seeded by `sample_seed`, so its augmentation is
    the same in any worker, on any rank and after a resume; the caller's RNG is untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    @property
    def classes(self):
        return self.dataset.classes

    @property
    def targets(self):
        return self.dataset.targets

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        sample_seed, index = key
        # torchvision's v1 transforms draw from the default CPU generator.
        # Seeding only that one (not torch.manual_seed) leaves CUDA RNGs alone.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            return self.dataset[index]


def build_loader(
    dataset,
    batch_size,
    *,
    shuffle,
    seed,
    rank=0,
    world_size=1,
    num_workers=0,
    pin_memory=False,
    pad=True,
    sampler=None,
):
    """(DataLoader, SeededSampler) over `dataset`; `batch_size` is per rank.

    Call sampler.set_epoch(epoch) before each epoch, and sampler.set_start(k)
    to resume after this rank's first k items. `sampler` replaces the SeededSampler with
    another one yielding (sample_seed, index) pairs (``balanced.BalancedSampler``).
    """
    if batch_size < 1:
        raise UserError(f'--batch_size must be at least 1, got {batch_size}')
    total_batch = batch_size * world_size
    if shuffle and total_batch > len(dataset):
        if world_size == 1:
            what = f'--batch_size {batch_size}'
        else:
            what = f'the batch ({batch_size} per rank x {world_size} ranks = {total_batch})'
        # a part of a data set says where it came from (data.SplitSubset: --val_split)
        size = f'{len(dataset)} images{getattr(dataset, "size_note", "")}'
        raise UserError(f'{what} is larger than the data set ({size}); lower --batch_size')
    if sampler is None:
        sampler = SeededSampler(
            len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, pad=pad
        )
    # The loader draws its workers' base seed from this generator rather than
    # from torch's global RNG, so iterating leaves the caller's RNG as it was.
    generator = torch.Generator()
    generator.manual_seed(mix_seed('loader', seed, rank))
    loader = DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers else None,
        generator=generator,
    )
    return loader, sampler
