"""What main_retrieval.py embeds and what it names its results after.

- ``left_out_note``: images without a label (an empty CSV cell: -1, or a multi-hot row of zeros)
  are left out of the queries and the gallery (``labelling.labelled_part``): nothing is
  relevant to an unlabelled query, and an unlabelled gallery image is relevant to no query.
- ``WholeBatchSampler``: under torchrun each rank embeds whole batches of ``--batch_size_val``
  consecutive images (rank r the batches r, r + W, ...), so every batch is one that a single
  process embeds, and the features are the single process's bit for bit (a network's arithmetic
  can depend on the batch it runs in: oneDNN picks kernels by batch size).
- ``measurement_name``: the default ``--out`` and TensorBoard folder name say what was measured
  (data set and its files, split, size, features, gallery), so measuring another data set or size
  never overwrites an earlier result.
"""

import math
import os

from torch.utils.data import Sampler

from networks.encoders import file_tag
from supcon.data.sampling import mix_seed


def left_out_note(queries: int, gallery: int | None) -> str | None:
    """The one note about unlabelled images left out (``gallery`` None: --gallery test)."""
    if not queries and not gallery:
        return None
    parts = [f'{queries} unlabelled quer{"y" if queries == 1 else "ies"}']
    if gallery is not None:
        parts.append(f'{gallery} unlabelled gallery image{"" if gallery == 1 else "s"}')
    return (
        f'left out {" and ".join(parts)}: an image without a label has no relevant image and is'
        f' relevant to none, so it cannot be scored'
    )


class WholeBatchSampler(Sampler):
    """(sample_seed, index) pairs in data-set order; this rank's share is the whole batches
    rank, rank + world_size, ... of ``batch_size`` consecutive items (the last may be short).

    Use it with a loader of ``batch_size`` per rank: each batch is then exactly a batch of one
    process's loader. ``rank_indices`` (and ``start``, always 0) tell ``extract_features`` where
    each row belongs. The seeds are ``SeededSampler``'s for an unshuffled epoch 0, so a
    transform that drew random numbers would draw the same ones.
    """

    start = 0

    def __init__(self, num_samples, batch_size, *, seed, rank=0, world_size=1):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f'bad batch_size / rank / world_size: {batch_size} {rank} {world_size}'
            )
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size

    def rank_indices(self):
        batches = range(self.rank, math.ceil(self.num_samples / self.batch_size), self.world_size)
        return [
            index
            for b in batches
            for index in range(
                b * self.batch_size, min((b + 1) * self.batch_size, self.num_samples)
            )
        ]

    def __iter__(self):
        for index in self.rank_indices():
            yield mix_seed('sample', self.seed, 0, index), index

    def __len__(self):
        return len(self.rank_indices())


def _where(path):
    """The last two parts of a data file's or folder's path, e.g. 'flowers-test' for
    /data/flowers/test/ or 'lists-test' for lists/test.csv."""
    parts = os.path.abspath(os.path.normpath(str(path))).split(os.sep)[-2:]
    return '-'.join(file_tag(part) for part in parts if part)


def measurement_name(opt):
    """What a run of main_retrieval.py measures, as a file-name part: the data set (and, for
    image folders and CSVs, the last two parts of the queries' folder or file), the queries'
    split, the image size, the features, and the non-default gallery and encoder; e.g.
    ``digits_test_size12_encoder`` or ``csv-lists-test_val0.1_size8_head_gallery_test``."""
    dataset = opt.dataset
    if dataset in ('path', 'csv', 'imagenet'):
        source = opt.data_folder if opt.val_split or opt.test_folder is None else opt.test_folder
        dataset = f'{dataset}-{_where(source)}'
    split = f'val{opt.val_split}' if opt.val_split else 'test'
    name = f'{dataset}_{split}_size{opt.size}_{opt.features}'
    if opt.gallery == 'test':
        name += '_gallery_test'
    if opt.key_encoder:
        name += '_key_encoder'
    return name
