"""SupConLoss against two independent statements of the formula, its gradients, autocast and 2-rank
gloo;
hybrid, keys and a labelled queue against a per-anchor loop."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from losses import (
    LeanSupConFunction,
    PositivePairs,
    SameClassExclusion,
    SupConLoss,
    auto_chunk_size,  # noqa: E402
    gather_with_grad,
)
from supcon.objectives import contrastive  # noqa: E402


def loop_supcon_loss(
    features, labels=None, mask=None, temperature=0.07, contrast_mode='all', base_temperature=0.07
):
    """The paper's per-anchor sum in float64 Python arithmetic, one anchor and one pair at a
    time."""
    bsz, n_views = features.shape[:2]
    z = features.detach().double().reshape(bsz, n_views, -1)
    rows = [(view, sample) for view in range(n_views) for sample in range(bsz)]

    def positive_weight(anchor_sample, other_sample):
        if mask is not None:
            return float(mask[anchor_sample, other_sample])
        if labels is not None:
            return float(labels[anchor_sample] == labels[other_sample])
        return float(anchor_sample == other_sample)

    anchors = rows if contrast_mode == 'all' else [(0, sample) for sample in range(bsz)]
    per_anchor = []
    for anchor in anchors:
        others = [row for row in rows if row != anchor]
        logits = [
            float(z[anchor[1], anchor[0]] @ z[row[1], row[0]]) / temperature for row in others
        ]
        log_denominator = math.log(math.fsum(math.exp(logit) for logit in logits))
        weights = [positive_weight(anchor[1], row[1]) for row in others]
        positive_total = math.fsum(weights)
        if positive_total < 1e-6:
            positive_total = 1.0
        mean_log_prob = (
            math.fsum(w * (logit - log_denominator) for w, logit in zip(weights, logits))
            / positive_total
        )
        per_anchor.append(-(temperature / base_temperature) * mean_log_prob)
    return math.fsum(per_anchor) / len(per_anchor)


def reference_supcon_loss(
    features, labels=None, mask=None, temperature=0.07, contrast_mode='all', base_temperature=0.07
):
    """The vectorised formula of the original repository (after its Dec 2023 fix), N x N matrices
    and all."""
    bsz, n_views = features.shape[:2]
    features = features.reshape(bsz, n_views, -1)
    if mask is None and labels is None:
        mask = torch.eye(bsz, dtype=features.dtype, device=features.device)
    elif labels is not None:
        labels = labels.reshape(-1, 1)
        mask = (labels == labels.t()).to(features.dtype)
    else:
        mask = mask.to(features.dtype)
    contrast = torch.cat(torch.unbind(features, 1))
    anchor, anchor_views = (features[:, 0], 1) if contrast_mode == 'one' else (contrast, n_views)
    logits = anchor @ contrast.t() / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    mask = mask.repeat(anchor_views, n_views)
    not_self = torch.ones_like(mask).scatter(
        1, torch.arange(bsz * anchor_views, device=mask.device)[:, None], 0
    )
    mask = mask * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True))
    positive_total = mask.sum(1)
    positive_total = torch.where(
        positive_total < 1e-6, torch.ones_like(positive_total), positive_total
    )
    return (-(temperature / base_temperature) * (mask * log_prob).sum(1) / positive_total).mean()


def normalized_features(*shape, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(*shape, generator=generator, dtype=dtype)
    flat = F.normalize(features.reshape(shape[0], shape[1], -1), dim=-1)
    return flat.reshape(shape)


def positives(kind, bsz, seed=0):
    """(labels, mask) for a named way of choosing positives."""
    generator = torch.Generator().manual_seed(seed)
    if kind == 'labels':
        return torch.randint(0, 3, (bsz,), generator=generator), None
    if kind == 'labels-with-singletons':
        # the last two samples have a label of their own: with one view they have no positive at all
        return torch.tensor([0, 0, 1, 1] + [7 + i for i in range(bsz - 4)]), None
    if kind == 'mask-symmetric':
        labels = torch.randint(0, 2, (bsz,), generator=generator)
        return None, (labels[:, None] == labels[None, :]).double()
    if kind == 'mask-asymmetric-weighted':
        mask = torch.rand(bsz, bsz, generator=generator, dtype=torch.float64)
        mask[1] = 0.0  # an anchor sample with no positive
        mask[mask < 0.3] = 0.0
        return None, mask
    if kind == 'simclr':
        return None, None
    raise AssertionError(kind)


POSITIVE_KINDS = [
    'labels',
    'labels-with-singletons',
    'mask-symmetric',
    'mask-asymmetric-weighted',
    'simclr',
]


def assert_close_relative(got, expected, rel=1e-5):
    """Equal up to rel relative to the largest entry of `expected`, so near-zero entries do not
    dominate."""
    got, expected = got.detach().double(), expected.detach().double()
    scale = max(expected.abs().max().item(), 1e-12)
    assert (got - expected).abs().max().item() <= rel * scale, (got, expected)


# ------------------------------------------------------------------------------------------ value
@pytest.mark.parametrize('temperature, base_temperature', [(0.07, 0.07), (0.5, 0.07), (0.1, 1.0)])
@pytest.mark.parametrize('kind', POSITIVE_KINDS)
@pytest.mark.parametrize('n_views', [1, 2, 3])
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
def test_value_matches_per_anchor_loop(contrast_mode, n_views, kind, temperature, base_temperature):
    bsz = 6
    features = normalized_features(bsz, n_views, 5)
    labels, mask = positives(kind, bsz)
    criterion = SupConLoss(temperature, contrast_mode, base_temperature)
    expected = loop_supcon_loss(
        features, labels, mask, temperature, contrast_mode, base_temperature
    )
    got = criterion(features, labels=labels, mask=mask)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_features_with_more_than_three_dims_are_flattened():
    features = normalized_features(5, 2, 3, 4)
    labels = torch.tensor([0, 1, 0, 1, 1])
    expected = loop_supcon_loss(features, labels, temperature=0.2)
    assert SupConLoss(0.2)(features, labels).item() == pytest.approx(expected, rel=1e-5)
    assert SupConLoss(0.2, chunk_size=3)(features, labels).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_labels_may_be_any_comparable_values():
    features = normalized_features(6, 2, 4, seed=6)
    labels = torch.tensor([2.5, -3.0, 2.5, 100.0, -3.0, 7.0])
    expected = loop_supcon_loss(features, labels, temperature=0.3)
    assert SupConLoss(0.3)(features, labels).item() == pytest.approx(expected, rel=1e-5)


def test_no_positive_anywhere_gives_zero_not_nan():
    loss = SupConLoss()(
        normalized_features(4, 1, 6)
    )  # SimCLR with a single view: nobody has a positive
    assert loss.item() == 0.0


# ------------------------------------------------------------------------------------- value and
# gradient
@pytest.mark.parametrize('chunk_size', [None, 1, 4, 7])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('kind', POSITIVE_KINDS)
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
def test_value_and_gradient_match_vectorised_reference(contrast_mode, kind, dtype, chunk_size):
    bsz, n_views = 6, 2
    features = normalized_features(bsz, n_views, 16, dtype=dtype, seed=3).requires_grad_()
    labels, mask = positives(kind, bsz, seed=3)
    mask = None if mask is None else mask.to(dtype)

    expected = reference_supcon_loss(features, labels, mask, 0.1, contrast_mode, 0.07)
    (expected_grad,) = torch.autograd.grad(expected, features)
    got = SupConLoss(0.1, contrast_mode, 0.07, chunk_size)(features, labels=labels, mask=mask)
    (got_grad,) = torch.autograd.grad(got, features)

    assert got.dtype == dtype
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert_close_relative(got_grad, expected_grad)


def test_gradient_matches_reference_on_a_larger_float32_batch():
    features = normalized_features(128, 2, 32, dtype=torch.float32, seed=5).requires_grad_()
    labels = torch.randint(0, 4, (128,), generator=torch.Generator().manual_seed(5))
    (expected_grad,) = torch.autograd.grad(reference_supcon_loss(features, labels), features)
    for chunk_size in (None, 64):
        (got_grad,) = torch.autograd.grad(
            SupConLoss(chunk_size=chunk_size)(features, labels), features
        )
        assert_close_relative(got_grad, expected_grad)


@pytest.mark.parametrize('chunk_size', [None, 2])
@pytest.mark.parametrize('weighted', [False, True])
def test_gradcheck_lean_function(weighted, chunk_size):
    generator = torch.Generator().manual_seed(0)
    # anchors are 3 of the 6 contrast rows (contrast_mode='one' on 3 samples x 2 views),
    # unnormalised on purpose
    anchor = torch.randn(3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    contrast = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    sample = torch.tensor([0, 1, 2])
    contrast_sample = sample.repeat(2)
    if weighted:
        weight = torch.rand(3, 3, generator=generator, dtype=torch.float64)
        pairs = PositivePairs(sample, contrast_sample, sample, weight=weight)
    else:
        group = torch.tensor([0, 1, 0])
        pairs = PositivePairs(group[sample], group[contrast_sample], sample, num_groups=2)

    def loss(anchor, contrast):
        return LeanSupConFunction.apply(anchor, contrast, pairs, 0.5, 0.7, chunk_size)

    assert torch.autograd.gradcheck(loss, (anchor, contrast))


def test_gradcheck_through_the_module():
    features = normalized_features(4, 2, 3, seed=2).requires_grad_()
    labels = torch.tensor([0, 1, 0, 0])
    assert torch.autograd.gradcheck(lambda f: SupConLoss(0.3, chunk_size=3)(f, labels), (features,))


# -------------------------------------------------------------------------------------- precision
def test_bf16_features_under_autocast_are_computed_in_float32():
    features32 = normalized_features(8, 2, 16, dtype=torch.float32, seed=4)
    labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(4))
    features16 = features32.bfloat16().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = SupConLoss()(features16, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert features16.grad.dtype == torch.bfloat16
    exact_on_rounded = SupConLoss()(features16.detach().float(), labels)
    assert loss.item() == pytest.approx(exact_on_rounded.item(), rel=1e-5)
    assert loss.item() == pytest.approx(SupConLoss()(features32, labels).item(), rel=2e-2)


# ----------------------------------------------------------------------------------------- errors
def test_labels_and_mask_together_raise():
    with pytest.raises(ValueError, match='not both'):
        SupConLoss()(normalized_features(4, 2, 3), labels=torch.arange(4), mask=torch.eye(4))


def test_unknown_contrast_mode_raises():
    with pytest.raises(ValueError, match='contrast_mode'):
        SupConLoss(contrast_mode='some')


def test_two_dim_features_raise():
    with pytest.raises(ValueError, match='at least 3 dims'):
        SupConLoss()(F.normalize(torch.randn(4, 8), dim=1))


def test_wrong_label_count_raises():
    with pytest.raises(ValueError, match='3 labels for a batch of 4'):
        SupConLoss()(normalized_features(4, 2, 3), labels=torch.tensor([0, 1, 0]))


def test_wrong_mask_shape_raises():
    with pytest.raises(ValueError, match='mask must be'):
        SupConLoss()(normalized_features(4, 2, 3), mask=torch.eye(3))


# ------------------------------------------------------------------------- hybrid, keys and a queue
def loop_extended_loss(
    features,
    labels=None,
    keys=None,
    queue=None,
    queue_labels=None,
    hybrid=False,
    temperature=0.07,
    contrast_mode='all',
    base_temperature=0.07,
):
    """Per-anchor loop over an explicit list of contrast rows, each sorted into positive, negative
    or left out.

    Works on torch scalars so that autograd gives the features' gradient; keys and queue are
    constants.
    """
    bsz, n_views = features.shape[:2]
    z = features.reshape(bsz, n_views, -1)
    batch = z if keys is None else keys.detach().reshape(bsz, n_views, -1)
    label_of = (lambda i: None) if labels is None else (lambda i: labels[i].item())
    rows = []  # (identity, vector, sample or None, label or None)
    for view in range(n_views):
        for sample in range(bsz):
            rows.append((('batch', view, sample), batch[sample, view], sample, label_of(sample)))
    for k in range(0 if queue is None else queue.shape[0]):
        label = None if labels is None else queue_labels[k].item()
        rows.append((('queue', k), queue[k].detach(), None, label))

    per_anchor = []
    for view in range(n_views if contrast_mode == 'all' else 1):
        for sample in range(bsz):
            query = z[sample, view]
            denominator, positive_logits = [], []
            for identity, vector, row_sample, row_label in rows:
                if identity == ('batch', view, sample):
                    continue  # the anchor's own feature, or its own key of the same view
                same_sample = row_sample == sample
                same_class = labels is not None and row_label == label_of(sample)
                if hybrid:
                    if same_class and not same_sample:
                        continue  # left out of the denominator
                    positive = same_sample
                elif labels is not None:
                    positive = same_class
                else:
                    positive = same_sample
                logit = query @ vector / temperature
                denominator.append(logit)
                if positive:
                    positive_logits.append(logit)
            if not positive_logits:
                per_anchor.append(query.sum() * 0.0)
                continue
            log_denominator = torch.logsumexp(torch.stack(denominator), 0)
            mean_log_prob = sum(logit - log_denominator for logit in positive_logits) / len(
                positive_logits
            )
            per_anchor.append(-(temperature / base_temperature) * mean_log_prob)
    return torch.stack(per_anchor).mean()


def hybrid_labels(kind, bsz, seed=0):
    if kind == 'random':
        return torch.randint(0, 3, (bsz,), generator=torch.Generator().manual_seed(seed))
    if kind == 'one-class':  # every other sample is left out: only the anchor's own views remain
        return torch.zeros(bsz, dtype=torch.long)
    if kind == 'distinct':  # nothing is left out: hybrid is SimCLR
        return torch.arange(bsz)
    if kind == 'pairs-and-singletons':
        return torch.tensor([0, 0, 1, 1] + [7 + i for i in range(bsz - 4)])
    raise AssertionError(kind)


def value_and_grad(loss_fn, features):
    features = features.detach().clone().requires_grad_()
    loss = loss_fn(features)
    (grad,) = torch.autograd.grad(loss, features)
    return loss.detach(), grad


def assert_value_and_grad_close(got, expected, rel=1e-9):
    """Value and gradient equal up to rel (the gradient relative to its largest entry), or both
    ~0."""
    assert got[0].item() == pytest.approx(expected[0].item(), rel=rel, abs=1e-12)
    error = (got[1] - expected[1]).abs().max().item()
    assert error <= rel * expected[1].abs().max().item() + 1e-13, (got[1], expected[1])


@pytest.mark.parametrize('kind', ['random', 'one-class', 'distinct', 'pairs-and-singletons'])
@pytest.mark.parametrize('n_views', [1, 2, 3])
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
def test_hybrid_value_and_gradient_match_per_anchor_loop(contrast_mode, n_views, kind):
    bsz = 6
    features = normalized_features(bsz, n_views, 5, seed=7)
    labels = hybrid_labels(kind, bsz, seed=7)
    expected = value_and_grad(
        lambda f: loop_extended_loss(
            f,
            labels,
            hybrid=True,
            temperature=0.2,
            contrast_mode=contrast_mode,
            base_temperature=0.07,
        ),
        features,
    )
    for chunk_size in (None, 1, 4):
        criterion = SupConLoss(0.2, contrast_mode, 0.07, chunk_size, hybrid=True)
        got = value_and_grad(lambda f: criterion(f, labels), features)
        assert_value_and_grad_close(got, expected)
    if n_views == 1:  # no anchor has a positive (the fork returns NaN here)
        assert got[0].item() == 0.0


def test_hybrid_with_distinct_labels_is_simclr_and_differs_from_supcon_otherwise():
    features = normalized_features(6, 2, 5, seed=8)
    simclr = SupConLoss(0.3)(features)
    assert SupConLoss(0.3, hybrid=True)(features, torch.arange(6)).item() == pytest.approx(
        simclr.item(), rel=1e-12
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    hybrid = SupConLoss(0.3, hybrid=True)(features, labels).item()
    assert hybrid != pytest.approx(simclr.item(), rel=1e-3)
    assert hybrid != pytest.approx(SupConLoss(0.3)(features, labels).item(), rel=1e-3)


def test_hybrid_errors():
    features = normalized_features(4, 2, 3)
    with pytest.raises(ValueError, match='hybrid=True needs labels'):
        SupConLoss(hybrid=True)(features)
    with pytest.raises(ValueError, match='hybrid=True takes labels, not a mask'):
        SupConLoss(hybrid=True)(features, mask=torch.eye(4))
    with pytest.raises(ValueError, match='queue_labels are needed with hybrid=True'):
        SupConLoss(hybrid=True)(
            features, torch.arange(4), queue=F.normalize(torch.randn(5, 3), dim=1)
        )


QUEUE_LABELS = torch.tensor(
    [0, 3, 1, 4, 0, 2, 3]
)  # 3 and 4: labels that no batch sample has (batch: 0..2)


def extended_case(n_views=2, bsz=5, seed=9):
    generator = torch.Generator().manual_seed(seed)
    features = F.normalize(
        torch.randn(bsz, n_views, 4, generator=generator, dtype=torch.float64), dim=-1
    )
    keys = F.normalize(
        torch.randn(bsz, n_views, 4, generator=generator, dtype=torch.float64), dim=-1
    )
    queue = F.normalize(
        torch.randn(len(QUEUE_LABELS), 4, generator=generator, dtype=torch.float64), dim=-1
    )
    labels = torch.tensor([0, 1, 0, 2, 1] + [0] * (bsz - 5))
    return features, labels, keys, queue


@pytest.mark.parametrize('use_queue', [False, True], ids=['no-queue', 'queue'])
@pytest.mark.parametrize('use_keys', [False, True], ids=['no-keys', 'keys'])
@pytest.mark.parametrize('kind', ['supcon', 'simclr', 'hybrid'])
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
def test_keys_and_queue_value_and_gradient_match_per_anchor_loop(
    contrast_mode, kind, use_keys, use_queue
):
    features, labels, keys, queue = extended_case()
    labels = None if kind == 'simclr' else labels
    extras = dict(
        keys=keys if use_keys else None,
        queue=queue if use_queue else None,
        queue_labels=QUEUE_LABELS if use_queue and labels is not None else None,
    )
    hybrid = kind == 'hybrid'
    expected = value_and_grad(
        lambda f: loop_extended_loss(
            f,
            labels,
            hybrid=hybrid,
            temperature=0.15,
            contrast_mode=contrast_mode,
            base_temperature=0.1,
            **extras,
        ),
        features,
    )
    for chunk_size in (None, 3):
        criterion = SupConLoss(0.15, contrast_mode, 0.1, chunk_size, hybrid=hybrid)
        got = value_and_grad(lambda f: criterion(f, labels, **extras), features)
        assert_value_and_grad_close(got, expected)


def test_keys_and_queue_get_no_gradient_and_features_only_through_the_anchors():
    features, labels, keys, queue = extended_case()
    features, keys, queue = (t.clone().requires_grad_() for t in (features, keys, queue))
    loss = SupConLoss(0.2)(features, labels, keys=keys, queue=queue, queue_labels=QUEUE_LABELS)
    grads = torch.autograd.grad(loss, [features, keys, queue], allow_unused=True)
    assert grads[1] is None and grads[2] is None
    # keys equal to the features: same value as without keys, but the gradient only flows through
    # the anchors
    same = SupConLoss(0.2)(features, labels, keys=features)
    assert same.item() == pytest.approx(SupConLoss(0.2)(features, labels).item(), rel=1e-12)
    (grad_anchors_only,) = torch.autograd.grad(same, features)
    expected = value_and_grad(
        lambda f: loop_extended_loss(f, labels, keys=f, temperature=0.2), features
    )
    assert_close_relative(grad_anchors_only, expected[1], rel=1e-9)


def test_simclr_ignores_queue_labels():
    features, _, keys, queue = extended_case()
    with_labels = SupConLoss(0.2)(features, keys=keys, queue=queue, queue_labels=QUEUE_LABELS)
    without = SupConLoss(0.2)(features, keys=keys, queue=queue)
    assert torch.equal(with_labels, without)


@pytest.mark.parametrize('kind', ['supcon', 'simclr', 'hybrid'])
def test_no_extra_rows_is_the_plain_loss(kind):
    features, labels, _, _ = extended_case()
    labels = None if kind == 'simclr' else labels
    criterion = SupConLoss(0.2, hybrid=kind == 'hybrid')
    plain = value_and_grad(lambda f: criterion(f, labels), features)
    explicit_none = value_and_grad(
        lambda f: criterion(f, labels, keys=None, queue=None, queue_labels=None), features
    )
    assert torch.equal(plain[0], explicit_none[0]) and torch.equal(plain[1], explicit_none[1])
    empty_queue = features.new_zeros(0, 4)
    empty_labels = None if labels is None else labels.new_zeros(0)
    with_empty_queue = value_and_grad(
        lambda f: criterion(f, labels, queue=empty_queue, queue_labels=empty_labels), features
    )
    assert_value_and_grad_close(with_empty_queue, plain, rel=1e-12)
    if kind == 'supcon':
        reference = value_and_grad(
            lambda f: reference_supcon_loss(f, labels, temperature=0.2), features
        )
        assert_value_and_grad_close(plain, reference)


def test_auto_chunk_size():
    mib = 2**20
    assert auto_chunk_size(2048, 2048, 4) is None  # 16 MiB of logits fit in the default 256 MiB
    # a 1024-sample batch against 65536 queue rows: 1024 x 66560 x 4 bytes = 260 MiB, just over the
    # budget
    assert auto_chunk_size(1024, 1024 + 65536, 4) == 256 * mib // (66560 * 4) == 1008
    assert auto_chunk_size(1024, 1024 + 65536, 4, memory_budget=64 * mib) == 252
    assert auto_chunk_size(10, 100, 8, memory_budget=1) == 1
    assert auto_chunk_size(10, 100, 8, memory_budget=8000) is None


@pytest.mark.parametrize('kind', ['supcon', 'hybrid'])
def test_automatic_chunking_under_a_tiny_budget_gives_the_same_value_and_gradient(
    monkeypatch, kind
):
    features, labels, keys, queue = extended_case()
    extras = dict(keys=keys, queue=queue, queue_labels=QUEUE_LABELS)
    hybrid = kind == 'hybrid'
    whole = value_and_grad(lambda f: SupConLoss(0.2, hybrid=hybrid)(f, labels, **extras), features)

    block_sizes = []
    row_blocks = contrastive._row_blocks

    def recording_row_blocks(n_rows, chunk_size):
        block_sizes.append(chunk_size)
        return row_blocks(n_rows, chunk_size)

    monkeypatch.setattr(contrastive, '_row_blocks', recording_row_blocks)
    # 10 anchors x (10 keys + 7 queue rows) x 8 bytes; a budget of 3 rows' worth makes blocks of 3
    # anchors
    criterion = SupConLoss(0.2, hybrid=hybrid, memory_budget=3 * 17 * 8 + 5)
    chunked = value_and_grad(lambda f: criterion(f, labels, **extras), features)
    assert block_sizes == [3, 3]  # forward and backward
    assert_value_and_grad_close(chunked, whole, rel=1e-12)


@pytest.mark.parametrize('chunk_size', [None, 2])
@pytest.mark.parametrize('hybrid', [False, True])
def test_gradcheck_lean_function_with_queue_and_exclusion(hybrid, chunk_size):
    generator = torch.Generator().manual_seed(1)
    # contrast_mode='all' on 3 samples x 2 views, plus 3 queue rows; unnormalised on purpose
    anchor = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    contrast = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    sample = torch.tensor([0, 1, 2]).repeat(2)
    label_group = torch.tensor([0, 1, 0, 0, 2, 1])  # samples 0..2, then the queue rows
    contrast_class = torch.cat([label_group[sample], label_group[3:]])
    self_column = torch.arange(6)
    if hybrid:
        contrast_sample = torch.cat([sample, torch.full((3,), 3)])
        pairs = PositivePairs(sample, contrast_sample, self_column, num_groups=4)
        excluded = SameClassExclusion(label_group[sample], contrast_class, pairs)
    else:
        pairs = PositivePairs(label_group[sample], contrast_class, self_column, num_groups=6)
        excluded = None

    def loss(anchor, contrast):
        return LeanSupConFunction.apply(
            anchor, contrast, pairs, 0.5, 0.7, chunk_size, queue, excluded
        )

    assert torch.autograd.gradcheck(loss, (anchor, contrast))


def test_keys_and_queue_argument_errors():
    features, labels, keys, queue = extended_case()
    criterion = SupConLoss()
    with pytest.raises(ValueError, match='keys must have the shape of features'):
        criterion(features, labels, keys=keys[:, :1])
    with pytest.raises(ValueError, match='7 queue_labels for a queue of 6 rows'):
        criterion(features, labels, queue=queue[:6], queue_labels=QUEUE_LABELS)
    with pytest.raises(ValueError, match='queue_labels are needed with labels and a queue'):
        criterion(features, labels, queue=queue)
    with pytest.raises(ValueError, match=r'queue must be \[K, D\] with D = 4'):
        criterion(features, labels, queue=queue[:, :3], queue_labels=QUEUE_LABELS)
    with pytest.raises(ValueError, match='queue_labels given without a queue'):
        criterion(features, labels, queue_labels=QUEUE_LABELS)
    for extras in (dict(keys=keys), dict(queue=queue)):
        with pytest.raises(ValueError, match='cannot be used with keys or a queue'):
            criterion(features, mask=torch.eye(5), **extras)
    with pytest.raises(ValueError, match='memory_budget'):
        SupConLoss(memory_budget=0)


# ------------------------------------------------------------------------------------ distributed
WORLD_SIZE = 2
# case -> (uses labels, samples per rank, contrast_mode, extras): extras may ask for 'hybrid',
# 'keys', 'queue'
DISTRIBUTED_CASES = {
    'supcon': (True, [4, 4], 'all', ()),
    'simclr': (False, [4, 4], 'all', ()),
    'supcon-one': (True, [4, 4], 'one', ()),
    'supcon-unequal': (True, [3, 5], 'all', ()),
    'simclr-unequal': (False, [5, 3], 'all', ()),
    'hybrid': (True, [4, 4], 'all', ('hybrid',)),
    'hybrid-one-unequal': (True, [3, 5], 'one', ('hybrid',)),
    'supcon-keys-queue': (True, [4, 4], 'all', ('keys', 'queue')),
    'simclr-keys-queue-unequal': (False, [5, 3], 'all', ('keys', 'queue')),
    'hybrid-keys-queue': (True, [4, 4], 'all', ('hybrid', 'keys', 'queue')),
    'supcon-queue-without-keys': (True, [4, 4], 'all', ('queue',)),
}
DISTRIBUTED_TEMPERATURE = 0.5


def distributed_batch():
    generator = torch.Generator().manual_seed(11)
    features = F.normalize(torch.randn(8, 2, 6, generator=generator, dtype=torch.float64), dim=-1)
    return features, torch.randint(0, 3, (8,), generator=generator)


def distributed_extras():
    """keys of the whole batch, and a queue (the same on both ranks) with labels in and outside the
    batch's."""
    generator = torch.Generator().manual_seed(12)
    keys = F.normalize(torch.randn(8, 2, 6, generator=generator, dtype=torch.float64), dim=-1)
    queue = F.normalize(torch.randn(5, 6, generator=generator, dtype=torch.float64), dim=-1)
    return keys, queue, torch.tensor([0, 4, 2, 1, 4])


def distributed_case_arguments(case, rows=slice(None)):
    """(criterion, labels, forward keyword arguments) of a case, for the samples `rows` of the
    batch."""
    use_labels, _, contrast_mode, extras = DISTRIBUTED_CASES[case]
    _, labels = distributed_batch()
    keys, queue, queue_labels = distributed_extras()
    criterion = SupConLoss(DISTRIBUTED_TEMPERATURE, contrast_mode, hybrid='hybrid' in extras)
    kwargs = {}
    if 'keys' in extras:
        kwargs['keys'] = keys[rows]
    if 'queue' in extras:
        kwargs['queue'] = queue
        kwargs['queue_labels'] = queue_labels if use_labels else None
    return criterion, labels[rows] if use_labels else None, kwargs


def _on_rank(rank, world):
    features, _ = distributed_batch()
    results = {}
    for case, (_, sizes, _, _) in DISTRIBUTED_CASES.items():
        start = sum(sizes[:rank])
        stop = start + sizes[rank]
        local = features[start:stop].clone().requires_grad_()
        criterion, local_labels, kwargs = distributed_case_arguments(case, slice(start, stop))
        loss = criterion(local, local_labels, **kwargs)
        # Weighting by anchor count makes DDP's average over ranks the mean over all anchors;
        # with equal local batches the weight is 1, i.e. plain DDP.
        (loss * WORLD_SIZE * sizes[rank] / sum(sizes)).backward()
        results[case] = {'loss': loss.detach(), 'grad': local.grad}

    gathered = gather_with_grad(torch.full((rank + 1, 2), float(rank), requires_grad=True))
    results['gathered'] = gathered.detach()
    try:
        SupConLoss()(features[:2], mask=torch.eye(2))
    except ValueError as error:
        results['mask_error'] = str(error)
    return results


@pytest.fixture(scope='module')
def distributed_results(gloo_ranks):
    return gloo_ranks(_on_rank, world=WORLD_SIZE)


@pytest.mark.parametrize('case', list(DISTRIBUTED_CASES))
def test_two_ranks_match_single_process(distributed_results, case):
    use_labels, sizes, contrast_mode, extras = DISTRIBUTED_CASES[case]
    features, labels = distributed_batch()
    features.requires_grad_()
    if extras:
        criterion, labels, kwargs = distributed_case_arguments(case)
        expected = loop_extended_loss(
            features,
            labels,
            hybrid=criterion.hybrid,
            temperature=DISTRIBUTED_TEMPERATURE,
            contrast_mode=contrast_mode,
            **kwargs,
        )
    else:
        expected = reference_supcon_loss(
            features,
            labels if use_labels else None,
            temperature=DISTRIBUTED_TEMPERATURE,
            contrast_mode=contrast_mode,
        )
    (expected_grad,) = torch.autograd.grad(expected, features)

    rank_losses = torch.stack([result[case]['loss'] for result in distributed_results])
    anchor_share = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    assert (rank_losses * anchor_share).sum().item() == pytest.approx(expected.item(), rel=1e-6)
    # DDP averages the ranks' gradients; gather_with_grad has already summed the cross-rank
    # contributions.
    ddp_grad = torch.cat([result[case]['grad'] for result in distributed_results]) / WORLD_SIZE
    assert ((ddp_grad - expected_grad).norm() / expected_grad.norm()).item() < 1e-6


def test_gather_with_grad_handles_unequal_sizes(distributed_results):
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for result in distributed_results:
        assert torch.equal(result['gathered'], expected)


def test_mask_with_several_ranks_raises(distributed_results):
    for result in distributed_results:
        assert 'pass labels instead' in result.get('mask_error', '')


def test_large_norm_features_stay_finite_where_the_reference_gives_nan():
    """Not L2-normalised, norm 100: the reference's row maximum is the self-similarity, every
    other exp underflows to 0 and its loss is NaN; ours leaves the own column out first."""
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(6, 2, 8, dtype=torch.float64), dim=-1)
    features = (100 * features).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.isnan(reference_supcon_loss(features, labels))
    loss = SupConLoss()(features, labels)
    assert torch.isfinite(loss)
    # the same formula with a stable log-sum-exp over every row but the anchor's own
    z = torch.cat(torch.unbind(features.detach(), 1))
    logits = z @ z.t() / 0.07
    logits.fill_diagonal_(float('-inf'))
    log_prob = logits - torch.logsumexp(logits, 1, keepdim=True)
    same = (labels.repeat(2)[:, None] == labels.repeat(2)[None, :]).fill_diagonal_(False)
    expected = -(log_prob.masked_fill(~same, 0).sum(1) / same.sum(1)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    loss.backward()
    assert torch.isfinite(features.grad).all()
