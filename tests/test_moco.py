"""moco.py: EMA key encoder, label queue against a list model, and shuffle-BN / queue sync on 2 gloo
ranks."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supcon.objectives.moco import (
    KeyEncoder,
    LabelQueue,
    gather_no_grad,
    shuffle_across_ranks,
    unshuffle_across_ranks,
)


def small_model(seed=0):
    """A tiny MLP with BatchNorm, deterministic for a given seed."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def train_query_one_step(query, seed=1):
    """One SGD step on the query model with a made-up loss; returns the optimizer's batch."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=generator)
    optimizer = torch.optim.SGD(query.parameters(), lr=0.5)
    query(x).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return x


def snapshot(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# --------------------------------------------------------------------------------------------- key
# encoder
@pytest.mark.parametrize('momentum', [0.9, 0.0, 1.0])
def test_ema_update_is_the_plain_formula(momentum):
    query = small_model()
    key = KeyEncoder(query)
    key_before = {n: p.clone() for n, p in key.model.named_parameters()}
    train_query_one_step(query)
    # the optimizer step on the query did not touch the key encoder
    for name, param in key.model.named_parameters():
        assert torch.equal(param, key_before[name])
        assert param.grad is None and not param.requires_grad

    key.update(query, momentum)
    for name, param in query.named_parameters():
        expected = momentum * key_before[name] + (1 - momentum) * param.detach()
        got = dict(key.model.named_parameters())[name]
        if momentum == 0.0:
            assert torch.equal(got, param)
        elif momentum == 1.0:
            assert torch.equal(got, key_before[name])
        else:
            assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
            assert not torch.equal(got, key_before[name])


def test_keys_carry_no_gradient_and_loss_reaches_only_the_query():
    query = small_model()
    key = KeyEncoder(query)
    x = torch.randn(5, 4)
    keys = key.encode(x, shuffle_seed=3)
    assert not keys.requires_grad
    (query(x) * keys).sum().backward()
    assert all(p.grad is not None for p in query.parameters())
    assert all(p.grad is None for p in key.parameters())


def test_batchnorm_buffers_are_the_key_encoders_own():
    query = small_model()
    key = KeyEncoder(query).train()
    bn_key, bn_query = key.model[1], query[1]
    train_query_one_step(query)  # the query's running stats move
    key_stats = bn_key.running_mean.clone()
    key.update(query, 0.0)
    assert torch.equal(bn_key.running_mean, key_stats)  # not copied by update
    assert not torch.equal(bn_key.running_mean, bn_query.running_mean)
    query_stats = bn_query.running_mean.clone()
    key(torch.randn(6, 4))  # a train-mode key forward updates its own statistics only
    assert not torch.equal(bn_key.running_mean, key_stats)
    assert torch.equal(bn_query.running_mean, query_stats)


def test_update_rejects_a_wrapped_or_different_model():
    query = small_model()
    key = KeyEncoder(query)
    with pytest.raises(ValueError, match='does not match'):
        key.update(nn.Sequential(query), 0.9)  # names gain a prefix, as under DDP's `module.`


def test_key_encoder_state_dict_round_trip():
    query = small_model()
    key = KeyEncoder(query)
    train_query_one_step(query)
    key.update(query, 0.5)
    key(torch.randn(6, 4))
    restored = KeyEncoder(small_model(seed=7))
    restored.load_state_dict(key.state_dict())
    for name, value in key.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert not any(p.requires_grad for p in restored.parameters())


def test_supcon_resnet_key_encoder_gives_unit_keys():
    from networks.resnet_big import SupConResNet

    torch.manual_seed(0)
    query = SupConResNet(name='resnet18', feat_dim=16)
    key = KeyEncoder(query)
    images = torch.randn(2, 3, 8, 8)
    keys = key.encode(images, shuffle_seed=0)
    assert keys.shape == (2, 16) and not keys.requires_grad
    assert torch.allclose(keys.norm(dim=1), torch.ones(2), atol=1e-5)
    key.update(query, 0.99)


def test_single_process_helpers_are_no_ops():
    x = torch.randn(5, 3)
    rng = torch.get_rng_state()
    shuffled, index = shuffle_across_ranks(x, 123)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(shuffled, x)
    assert torch.equal(unshuffle_across_ranks(shuffled * 2, index), x * 2)
    assert torch.equal(gather_no_grad(x), x)


# ------------------------------------------------------------------------------------------ queue
class ListQueue:
    """The queue's specification: K slots written one row at a time, the pointer moving by one."""

    def __init__(self, size):
        self.slots, self.ptr = [None] * size, 0

    def enqueue(self, rows):
        for row in rows:
            self.slots[self.ptr] = row
            self.ptr = (self.ptr + 1) % len(self.slots)

    def contents(self):
        return [row for row in self.slots if row is not None]


def random_batch(n, dim, generator):
    features = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    return features, torch.randint(0, 1000, (n,), generator=generator)


def assert_queue_matches(queue, model):
    features, labels = queue.contents()
    expected = model.contents()
    assert len(queue) == len(expected) == len(features) == len(labels)
    assert int(queue.ptr) == model.ptr
    for (feature, label), (expected_feature, expected_label) in zip(
        zip(features, labels), expected
    ):
        assert torch.equal(feature, expected_feature) and int(label) == expected_label


def test_queue_matches_a_list_model_over_random_batches():
    size, dim = 7, 3
    generator = torch.Generator().manual_seed(0)
    sizes = random.Random(0)
    queue, model = LabelQueue(size, dim), ListQueue(size)
    empty_features, empty_labels = queue.contents()
    assert empty_features.shape == (0, dim) and empty_labels.shape == (0,)
    for step in range(60):
        n = (
            sizes.choice([1, 2, 3, 5, 6, 7, 8, 15, 20]) if step else 2
        )  # starts below K: partial fill
        features, labels = random_batch(n, dim, generator)
        queue.enqueue(features, labels)
        model.enqueue(list(zip(features, labels.tolist())))
        assert_queue_matches(queue, model)
        if step == 0:
            assert len(queue) == 2 and queue.contents()[0].shape == (2, dim)


def test_queue_stores_detached_float32_and_returns_copies():
    queue = LabelQueue(4, 2)
    features = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    queue.enqueue(features, torch.tensor([1, 2, 3], dtype=torch.int32))
    stored, labels = queue.contents()
    assert (
        stored.dtype == torch.float32 and not stored.requires_grad and labels.dtype == torch.int64
    )
    stored.zero_()
    assert torch.equal(queue.contents()[0], features.detach().float())


def test_queue_state_dict_round_trip():
    generator = torch.Generator().manual_seed(1)
    queue = LabelQueue(5, 4)
    for n in (3, 4):
        queue.enqueue(*random_batch(n, 4, generator))
    state = queue.state_dict()
    assert set(state) == {'features', 'labels', 'ptr', 'count'}
    restored = LabelQueue(5, 4)
    restored.load_state_dict(state)
    for name, value in queue.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value)
    batch = random_batch(2, 4, generator)
    queue.enqueue(*batch)
    restored.enqueue(*batch)
    for mine, theirs in zip(queue.contents(), restored.contents()):
        assert torch.equal(mine, theirs)


def test_queue_rejects_bad_shapes():
    queue = LabelQueue(4, 3)
    with pytest.raises(ValueError, match=r'\[n, 3\]'):
        queue.enqueue(torch.randn(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match='labels'):
        queue.enqueue(torch.randn(2, 3), torch.zeros(3))


# ------------------------------------------------------------------------------------ distributed
WORLD_SIZE = 2
LOCAL = 4  # rows per rank
QUEUE_SIZE = 5  # smaller than one gathered batch (8 rows), so every enqueue wraps
ENQUEUES = 3
SEED = 123


def distributed_data():
    """The global batches (all ranks' rows in rank order) that the workers slice their local rows
    from."""
    generator = torch.Generator().manual_seed(5)
    batches = [random_batch(WORLD_SIZE * LOCAL, 3, generator) for _ in range(ENQUEUES)]
    images = torch.randn(WORLD_SIZE * LOCAL, 4, generator=generator)
    return batches, images


def _on_rank(rank, world):
    batches, images = distributed_data()
    local = slice(rank * LOCAL, (rank + 1) * LOCAL)
    results = {}
    queue = LabelQueue(QUEUE_SIZE, 3)
    for features, labels in batches:
        queue.enqueue(features[local], labels[local])
    results['queue'] = queue.state_dict()
    results['gathered'] = gather_no_grad(images[local])

    rng = torch.get_rng_state()
    shuffled, index = shuffle_across_ranks(images[local], SEED)
    results['rng_untouched'] = torch.equal(torch.get_rng_state(), rng)
    results['shuffled'], results['index'] = shuffled, index
    results['unshuffled'] = unshuffle_across_ranks(shuffled * 2 + 1, index)
    results['shuffled_again'] = shuffle_across_ranks(images[local], SEED)[0]
    results['shuffled_other_seed'] = shuffle_across_ranks(images[local], SEED + 1)[0]

    key = KeyEncoder(small_model()).train()
    results['keys'] = key.encode(images[local], shuffle_seed=SEED)
    return results


@pytest.fixture(scope='module')
def distributed_results(gloo_ranks):
    return gloo_ranks(_on_rank, world=WORLD_SIZE)


def test_ranks_hold_the_queue_of_one_process_fed_the_concatenated_batches(distributed_results):
    batches, _ = distributed_data()
    single = LabelQueue(QUEUE_SIZE, 3)
    for features, labels in batches:
        single.enqueue(features, labels)
    for result in distributed_results:
        for name, value in single.state_dict().items():
            assert torch.equal(result['queue'][name], value), name


def test_gather_concatenates_in_rank_order(distributed_results):
    _, images = distributed_data()
    for result in distributed_results:
        assert torch.equal(result['gathered'], images)


def test_shuffle_is_a_seeded_permutation_and_unshuffle_inverts_it(distributed_results):
    _, images = distributed_data()
    shuffled = torch.cat([result['shuffled'] for result in distributed_results])
    permutation = torch.argsort(distributed_results[0]['index'])
    assert torch.equal(shuffled, images[permutation])
    assert torch.equal(torch.sort(permutation).values, torch.arange(len(images)))
    assert not torch.equal(permutation, torch.arange(len(images)))
    # drawn from a generator seeded with SEED, not from the global RNG
    assert torch.equal(
        permutation, torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))
    )
    for rank, result in enumerate(distributed_results):
        assert result['rng_untouched']
        assert torch.equal(result['index'], distributed_results[0]['index'])
        assert torch.equal(result['unshuffled'], images[rank * LOCAL : (rank + 1) * LOCAL] * 2 + 1)
        assert torch.equal(result['shuffled_again'], result['shuffled'])
    other = torch.cat([result['shuffled_other_seed'] for result in distributed_results])
    assert not torch.equal(other, shuffled)


def test_encode_normalises_each_key_with_the_sub_batch_it_was_shuffled_into(distributed_results):
    _, images = distributed_data()
    permutation = torch.argsort(distributed_results[0]['index'])
    model = small_model().train()
    with torch.no_grad():
        keys_shuffled = torch.cat(
            [model(images[chunk]) for chunk in permutation.view(WORLD_SIZE, -1)]
        )
    expected = keys_shuffled[torch.argsort(permutation)]
    got = torch.cat([result['keys'] for result in distributed_results])
    assert torch.allclose(got, expected, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(
            got, model(images), atol=1e-4
        )  # shuffling did change the BN batches
