"""Class-balanced batches (``--sampler balanced --m_per_class M``) for every training script.

Every global batch holds ``batch_size / M`` different classes with M images each, so that each
anchor of SupCon has at least M - 1 other images of its class in the batch whatever the class
frequencies are. Classes are taken in turn from successive seeded permutations (each class comes
up equally often, a rare one as often as a common one); each class's images are taken in turn
from seeded permutations of that class, so a class with fewer images than it is asked for repeats
them rather than dropping out. The epoch has as many steps as ``--sampler random`` gives it.

Images without a label (-1: a CSV row left empty, or outside a --labelled_fraction) belong to no
class: they are spread evenly over the epoch's batches, each seen once an epoch (a few again, see
``BalancedSampler``), and the rest of every batch is balanced over the labelled classes. Multi-hot
labels are refused: a batch of M images "of a class" needs one class per image.

Like ``sampling.SeededSampler`` it yields ``(sample_seed, index)`` pairs determined by (seed,
epoch) only, resumes mid-epoch with ``set_start`` and shards over torchrun ranks: rank r takes
the r-th equal part of each global batch, so the batch the ranks hold together is the balanced
one, the same as one process would hold.
"""

import math
from collections import deque

import torch
from torch.utils.data import Sampler

from supcon.data.sampling import ResumablePosition, mix_seed
from supcon.errors import UserError

SAMPLERS = ('random', 'balanced')
DEFAULT_M_PER_CLASS = 4


def add_arguments(parser):
    """--sampler and --m_per_class (main_supcon.py, main_ce.py, main_linear.py)."""
    group = parser.add_argument_group('sampling (not in the reference)')
    group.add_argument(
        '--sampler',
        type=str,
        default='random',
        choices=SAMPLERS,
        help='random: a seeded shuffle (the reference\'s order); balanced: every batch holds'
        ' batch_size / m_per_class classes with m_per_class images each (docs/long-tail.md)',
    )
    group.add_argument(
        '--m_per_class',
        type=int,
        default=None,
        help=f'--sampler balanced: images of each class in a batch'
        f' ({DEFAULT_M_PER_CLASS} when not given)',
    )
    return group


#: Options a resume may not change.
FIXED = ('sampler', 'm_per_class')


def run_name(opt, script):
    return (
        [f'balanced_m{opt.m_per_class}'] if getattr(opt, 'sampler', 'random') == 'balanced' else []
    )


def check_options(opt, script):
    """Fill --m_per_class and refuse values that cannot give balanced batches (one line each)."""
    if opt.sampler != 'balanced':
        if opt.m_per_class is not None:
            raise UserError(
                '--m_per_class only acts with --sampler balanced; add --sampler balanced or'
                ' drop --m_per_class'
            )
        return
    if opt.m_per_class is None:
        opt.m_per_class = DEFAULT_M_PER_CLASS
    m = opt.m_per_class
    if m < 1:
        raise UserError(f'--m_per_class must be 1 or more images per class, got {m}')
    if opt.batch_size % m:
        raise UserError(
            f'--sampler balanced: --batch_size {opt.batch_size} is not a whole number of'
            f' classes of --m_per_class {m} images; pick a --batch_size that {m} divides'
            f' (e.g. {max(m, opt.batch_size // m * m)}) or another --m_per_class'
        )


class BalancedSampler(ResumablePosition, Sampler):
    """Yields (sample_seed, index) for this rank: its share of class-balanced global batches.

    ``targets`` are the data set's labels, ``batch_size`` the GLOBAL batch (a multiple of
    ``m_per_class`` and of ``world_size``). Each global batch is ``batch_size / m_per_class``
    distinct classes x ``m_per_class`` images, in a seeded random order so that no rank holds
    only some classes; rank r takes items [r * b, (r + 1) * b) of it, b = batch_size /
    world_size. An epoch has ceil(len(targets) / batch_size) batches, as the random sampler's.
    Every item gets its own sample seed (its epoch, step and place), so an image that comes up
    twice is augmented twice differently. ``set_start(k)`` skips this rank's first k items.

    Unlabelled items (target -1) are dealt out evenly: batch s of S gets u_s = floor((s + 1) U / S)
    - floor(s U / S) of the U, in a seeded order, so the epoch holds every one of them. The batch's
    other places hold (batch_size - u_s) // m_per_class labelled classes of m_per_class images; the
    few places left (fewer than m_per_class) take the next unlabelled images, from the next seeded
    order once all U have come, so a few unlabelled images are seen twice in an epoch. Without
    unlabelled items this is exactly the plain balanced batch.
    """

    def __init__(self, targets, batch_size, m_per_class, *, seed, rank=0, world_size=1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f'need 0 <= rank < world_size, got {rank}, {world_size}')
        if m_per_class < 1 or batch_size % m_per_class or batch_size % world_size:
            raise ValueError(
                f'batch_size {batch_size} must be a multiple of m_per_class {m_per_class}'
                f' and of world_size {world_size}'
            )
        by_class, self.unlabelled = {}, []
        for index, label in enumerate(targets):
            if getattr(label, 'ndim', 0):
                raise UserError(
                    '--sampler balanced fills a batch with --m_per_class images of each of its'
                    ' classes, which needs one label per image, but the training CSV has rows'
                    ' with several labels; drop --sampler balanced'
                )
            if int(label) < 0:  # no label: no class to balance
                self.unlabelled.append(index)
            else:
                by_class.setdefault(int(label), []).append(index)
        self.classes = sorted(by_class)
        self.members = [by_class[c] for c in self.classes]
        self.m_per_class = int(m_per_class)
        self.batch_size = int(batch_size)
        self.steps = math.ceil(len(targets) / batch_size)  # what the random sampler gives
        # unlabelled images in each batch (spread evenly), labelled classes in each batch
        total = len(self.unlabelled)
        self.unlabelled_per_batch = [
            (s + 1) * total // self.steps - s * total // self.steps for s in range(self.steps)
        ]
        self.classes_per_batch = [
            (batch_size - u) // m_per_class for u in self.unlabelled_per_batch
        ]
        most = max(self.classes_per_batch, default=0)
        if most > len(self.classes):
            labelled = batch_size - min(self.unlabelled_per_batch)
            part = (
                f'--batch_size {batch_size}'
                if labelled == batch_size
                else f'the {labelled} labelled images of a --batch_size {batch_size} batch (the'
                f' rest: unlabelled images)'
            )
            raise UserError(
                f'--sampler balanced: {part} / --m_per_class {m_per_class} = {most} classes per'
                f' batch, but the training data has {len(self.classes)};'
                f' {fewer_classes_advice(batch_size, len(self.classes), labelled)}'
            )
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.local_batch_size = batch_size // world_size
        self.epoch = 0
        self.start = 0

    def _permutation(self, n, *key):
        generator = torch.Generator()
        generator.manual_seed(mix_seed('balanced', self.seed, self.epoch, *key))
        return torch.randperm(n, generator=generator).tolist()

    def global_batches(self):
        """The epoch's global batches: lists of (sample_seed, index), before sharding."""
        class_stream, class_round = deque(), 0
        image_streams = [deque() for _ in self.classes]
        image_rounds = [0] * len(self.classes)
        unlabelled_stream, unlabelled_round = deque(), 0
        batches = []
        for step in range(self.steps):
            chosen, deferred = [], []
            while len(chosen) < self.classes_per_batch[step]:
                if not class_stream:
                    class_stream.extend(
                        self._permutation(len(self.classes), 'classes', class_round)
                    )
                    class_round += 1
                c = class_stream.popleft()
                # a class already in this batch waits at the front for the next batch
                (deferred if c in chosen else chosen).append(c)
            class_stream.extendleft(reversed(deferred))
            items = []
            for c in chosen:
                for _ in range(self.m_per_class):
                    if not image_streams[c]:
                        order = self._permutation(
                            len(self.members[c]), 'images', c, image_rounds[c]
                        )
                        image_streams[c].extend(self.members[c][i] for i in order)
                        image_rounds[c] += 1
                    items.append(image_streams[c].popleft())
            while len(items) < self.batch_size and self.unlabelled:
                if not unlabelled_stream:
                    order = self._permutation(len(self.unlabelled), 'unlabelled', unlabelled_round)
                    unlabelled_stream.extend(self.unlabelled[i] for i in order)
                    unlabelled_round += 1
                items.append(unlabelled_stream.popleft())
            # mixed, so that under torchrun each rank's share holds a random part of the classes
            order = self._permutation(len(items), 'places', step)
            batches.append(
                [
                    (mix_seed('balanced_sample', self.seed, self.epoch, step, p), items[i])
                    for p, i in enumerate(order)
                ]
            )
        return batches

    def rank_items(self):
        """This rank's (sample_seed, index) pairs for the epoch, before skipping ``start``."""
        share = slice(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        return [item for batch in self.global_batches() for item in batch[share]]

    def __iter__(self):
        yield from self.rank_items()[self.start :]

    def __len__(self):
        return max(0, self.steps * self.local_batch_size - self.start)


def fewer_classes_advice(batch_size, num_classes, labelled=None):
    """What to change when a batch would need more classes than the data has (``labelled``:
    the places of a batch that labelled images take, the whole batch when not given)."""
    labelled = batch_size if labelled is None else labelled
    divisors = [m for m in range(1, batch_size + 1) if batch_size % m == 0]
    enough = [m for m in divisors if labelled // m <= num_classes]
    if labelled == batch_size:
        why = f'the smallest that {batch_size} divides into at most {num_classes} classes'
    else:
        why = (
            f'the smallest divisor of {batch_size} that makes {labelled} images at most'
            f' {num_classes} classes'
        )
    return f'raise --m_per_class to {enough[0]} ({why}) or lower --batch_size'


def sampler_for(dataset, opt, rt):
    """The ``BalancedSampler`` of ``dataset`` under --sampler balanced, else None (the loader's
    own seeded shuffle)."""
    if getattr(opt, 'sampler', 'random') != 'balanced':
        return None
    return BalancedSampler(
        dataset.targets,
        opt.batch_size,
        opt.m_per_class,
        seed=rt.seed,
        rank=rt.rank,
        world_size=rt.world_size,
    )
