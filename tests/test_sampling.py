"""Tests for sampling.py: seeded, resumable, sharded loading."""

import numpy as np
import pytest
import torch
from test_cifar import MEAN, STD, assert_one_line

from supcon.data.augment import supcon_transform
from supcon.data.datasets import ArrayImageDataset
from supcon.data.sampling import SeededDataset, SeededSampler, build_loader
from util import TwoCropTransform, UserError

# -------------------------------------------------------------------- Seeded sampling and loading
# --------------------------------------------------------------------------


def random_images(n, seed=3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return ArrayImageDataset(
        images, [i % 3 for i in range(n)], ['a', 'b', 'c'], supcon_transform(16, MEAN, STD)
    )


def test_sampler_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        sampler = SeededSampler(50, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert sorted(i for _, i in order(0, 1)) == list(range(50))
    assert [i for _, i in SeededSampler(5, shuffle=False, seed=0)] == [0, 1, 2, 3, 4]
    seeds = [s for s, _ in order(0, 1)]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**63 for s in seeds)


def test_seeded_dataset_repeats_augmentation_and_spares_global_rng():
    dataset = SeededDataset(random_images(4))
    assert dataset.classes == ['a', 'b', 'c'] and dataset.targets == [0, 1, 2, 0]
    sampler = SeededSampler(4, shuffle=True, seed=7)
    state = torch.get_rng_state()
    first = [dataset[key] for key in sampler]
    second = [dataset[key] for key in sampler]
    assert torch.equal(torch.get_rng_state(), state)
    for (views_a, label_a), (views_b, label_b) in zip(first, second):
        assert label_a == label_b and all(torch.equal(a, b) for a, b in zip(views_a, views_b))
    sampler.set_epoch(1)
    key = next(k for k in sampler if k[1] == next(iter(SeededSampler(4, shuffle=True, seed=7)))[1])
    assert not torch.equal(dataset[key][0][0], first[0][0][0])  # new epoch, new augmentation


def shares(num_samples, world_size, pad, epoch=3):
    result = []
    for rank in range(world_size):
        sampler = SeededSampler(
            num_samples, shuffle=True, seed=5, rank=rank, world_size=world_size, pad=pad
        )
        sampler.set_epoch(epoch)
        indices = [i for _, i in sampler]
        assert len(indices) == len(sampler)
        result.append(indices)
    return result


def test_two_ranks_with_padding_split_everything_evenly():
    rank0, rank1 = shares(7, 2, pad=True)
    assert len(rank0) == len(rank1) == 4
    assert set(rank0) | set(rank1) == set(range(7))
    assert len(rank0) + len(rank1) - len(set(rank0 + rank1)) == 1  # one padded repeat


def test_ranks_without_padding_see_each_index_once():
    parts = shares(7, 3, pad=False)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert sorted(sum(parts, [])) == list(range(7))


def test_set_start_yields_the_tail():
    sampler = SeededSampler(11, shuffle=True, seed=2, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_start(4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    sampler.set_start(0)
    assert list(sampler) == full


def batches_of(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    return [(torch.cat(views), labels) for views, labels in loader]


def test_loader_batches_match_with_and_without_workers_and_after_resume():
    dataset = random_images(10)
    serial_loader, serial_sampler = build_loader(dataset, 4, shuffle=True, seed=11)
    state = torch.get_rng_state()
    serial = batches_of(serial_loader, serial_sampler, epoch=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert [len(labels) for _, labels in serial] == [4, 4, 2]

    worker_loader, worker_sampler = build_loader(dataset, 4, shuffle=True, seed=11, num_workers=2)
    parallel = batches_of(worker_loader, worker_sampler, epoch=2)
    for (images_a, labels_a), (images_b, labels_b) in zip(serial, parallel, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)

    serial_sampler.set_start(4)  # resume after the first batch
    resumed = batches_of(serial_loader, serial_sampler, epoch=2)
    for (images_a, labels_a), (images_b, labels_b) in zip(serial[1:], resumed, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_batch_larger_than_data_set_is_user_error():
    dataset = random_images(6)
    with pytest.raises(UserError) as info:
        build_loader(dataset, 7, shuffle=True, seed=0)
    assert_one_line(info, '--batch_size 7', '6 images', 'lower --batch_size')
    with pytest.raises(UserError) as info:
        build_loader(dataset, 4, shuffle=True, seed=0, world_size=2)
    assert_one_line(info, '4 per rank x 2 ranks', '6 images')
    loader, _ = build_loader(dataset, 7, shuffle=False, seed=0, pad=False)  # evaluation is fine
    assert len(loader) == 1


def test_two_crop_transform_returns_two_views():
    pair = TwoCropTransform(lambda x: x + 1)(1)
    assert pair == [2, 2]
