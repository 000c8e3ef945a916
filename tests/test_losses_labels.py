"""SupConLoss with unlabelled samples (-1) and multi-hot labels, against a per-anchor loop written
here in float64 (values and gradients), with keys, a queue, chunks, hybrid and 2 gloo ranks."""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import LabelSetPairs, LeanSupConFunction, PositivePairs, SupConLoss
from supcon.objectives import contrastive


def loop_loss(
    features,
    labels=None,
    keys=None,
    queue=None,
    queue_labels=None,
    hybrid=False,
    multilabel='jaccard',
    temperature=0.1,
    contrast_mode='all',
    base_temperature=0.07,
):
    """The formula of docs/labels.md, one anchor and one contrast row at a time.

    Every row gets a weight (0: a negative) or is left out; labels are read as Python values (a
    number, -1 unlabelled) or, when 2-dim, as the set of the row's classes. Torch scalars, so that
    autograd gives the features' gradient; keys and queue are constants.
    """
    bsz, n_views = features.shape[:2]
    z = features.reshape(bsz, n_views, -1)
    batch = z if keys is None else keys.detach().reshape(bsz, n_views, -1)
    multi_hot = labels is not None and labels.dim() == 2

    def label_of(table, index):
        if labels is None:
            return None
        if multi_hot:
            return frozenset(c for c in range(table.shape[1]) if table[index, c].item() == 1)
        return table[index].item()

    rows = []  # (identity, vector, sample or None, label)
    for view in range(n_views):
        for sample in range(bsz):
            rows.append(
                (('batch', view, sample), batch[sample, view], sample, label_of(labels, sample))
            )
    for k in range(0 if queue is None else queue.shape[0]):
        rows.append((('queue', k), queue[k].detach(), None, label_of(queue_labels, k)))

    def weight_and_left_out(anchor_label, same_sample, row_label):
        if labels is None:
            return float(same_sample), False
        if multi_hot:
            if same_sample:
                return 1.0, False
            shared, either = anchor_label & row_label, anchor_label | row_label
            if multilabel == 'any':
                return float(len(shared) > 0), False
            return (len(shared) / len(either) if either else 0.0), False
        unlabelled = anchor_label == -1
        if hybrid:
            same_class = not unlabelled and row_label == anchor_label
            return float(same_sample), same_class and not same_sample
        if unlabelled:
            return float(same_sample), False
        return float(row_label == anchor_label), False

    per_anchor = []
    for view in range(n_views if contrast_mode == 'all' else 1):
        for sample in range(bsz):
            query, anchor_label = z[sample, view], label_of(labels, sample)
            logits, weights = [], []
            for identity, vector, row_sample, row_label in rows:
                if identity == ('batch', view, sample):
                    continue
                weight, left_out = weight_and_left_out(
                    anchor_label, row_sample == sample, row_label
                )
                if left_out:
                    continue
                logits.append(query @ vector / temperature)
                weights.append(weight)
            total_weight = math.fsum(weights)
            if total_weight < 1e-6:
                per_anchor.append(query.sum() * 0.0)
                continue
            log_denominator = torch.logsumexp(torch.stack(logits), 0)
            weighted = sum(w * (logit - log_denominator) for w, logit in zip(weights, logits) if w)
            per_anchor.append(-(temperature / base_temperature) * weighted / total_weight)
    return torch.stack(per_anchor).mean()


def value_and_grad(loss_fn, features):
    features = features.detach().clone().requires_grad_()
    loss = loss_fn(features)
    (grad,) = torch.autograd.grad(loss, features)
    return loss.detach(), grad


def assert_value_and_grad_close(got, expected, rel=1e-9):
    """Value and gradient equal up to rel (the gradient relative to its largest entry)."""
    assert got[0].item() == pytest.approx(expected[0].item(), rel=rel, abs=1e-12)
    error = (got[1] - expected[1]).abs().max().item()
    assert error <= rel * expected[1].abs().max().item() + 1e-13, (got[1], expected[1])


def assert_value_and_grad_equal(got, expected):
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def normalized(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


BSZ = 7
# labelled samples in classes 0..2, unlabelled ones among them; sample 5 is the only one of class 2
PARTIAL_LABELS = {
    'mixed': torch.tensor([0, -1, 0, 1, -1, 2, 1]),
    'all-unlabelled': torch.full((BSZ,), -1),
    'one-labelled': torch.tensor([-1, -1, 3, -1, -1, -1, -1]),
    'float': torch.tensor([0.5, -1.0, 0.5, -1.0, 7.0, 7.0, -1.0]),
}
# multi-hot over 4 classes: overlaps of every size, two all-zero (unlabelled) rows, two equal rows
MULTI_HOT = torch.tensor(
    [
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [1, 0, 1, 0],
        [0, 1, 1, 1],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 1],
    ]
)
QUEUE_PARTIAL = torch.tensor([0, -1, 4, 1, -1, 2])  # 4: a class no batch sample has
QUEUE_MULTI_HOT = torch.tensor(
    [[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 0]]
)


def extras(kind, labels_kind, seed, n_views=2):
    """keys and/or queue (with labels of the same kind as the batch's), as forward keywords."""
    out = {}
    if 'keys' in kind:
        out['keys'] = normalized(BSZ, n_views, 5, seed=seed + 100)
    if 'queue' in kind:
        out['queue'] = normalized(len(QUEUE_PARTIAL), 5, seed=seed + 200)
        if labels_kind == 'partial':
            out['queue_labels'] = QUEUE_PARTIAL
        elif labels_kind == 'multi-hot':
            out['queue_labels'] = QUEUE_MULTI_HOT
    return out


# ----------------------------------------------------------------------------- -1: unlabelled
@pytest.mark.parametrize('chunk_size', [None, 1, 3])
@pytest.mark.parametrize('n_views', [1, 2, 3])
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
@pytest.mark.parametrize('labels_name', list(PARTIAL_LABELS))
def test_unlabelled_samples_match_per_anchor_loop(labels_name, contrast_mode, n_views, chunk_size):
    features = normalized(BSZ, n_views, 5, seed=1)
    labels = PARTIAL_LABELS[labels_name]
    expected = value_and_grad(
        lambda f: loop_loss(f, labels, temperature=0.2, contrast_mode=contrast_mode), features
    )
    criterion = SupConLoss(0.2, contrast_mode, 0.07, chunk_size)
    assert_value_and_grad_close(value_and_grad(lambda f: criterion(f, labels), features), expected)


@pytest.mark.parametrize('kind', ['none', 'keys', 'queue', 'keys-queue'])
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
def test_all_unlabelled_is_simclr_exactly(contrast_mode, kind):
    features = normalized(BSZ, 2, 5, seed=2)
    labelled_extras = extras(kind, 'partial', seed=2)
    if 'queue_labels' in labelled_extras:
        labelled_extras['queue_labels'] = torch.full_like(QUEUE_PARTIAL, -1)
    simclr_extras = {k: v for k, v in labelled_extras.items() if k != 'queue_labels'}
    for chunk_size in (None, 3):
        criterion = SupConLoss(0.2, contrast_mode, chunk_size=chunk_size)
        unlabelled = value_and_grad(
            lambda f: criterion(f, PARTIAL_LABELS['all-unlabelled'], **labelled_extras), features
        )
        simclr = value_and_grad(lambda f: criterion(f, **simclr_extras), features)
        assert_value_and_grad_equal(unlabelled, simclr)
    loop = value_and_grad(
        lambda f: loop_loss(f, temperature=0.2, contrast_mode=contrast_mode, **simclr_extras),
        features,
    )
    assert_value_and_grad_close(simclr, loop)


@pytest.mark.parametrize('kind', ['keys', 'queue', 'keys-queue'])
@pytest.mark.parametrize('hybrid', [False, True], ids=['supcon', 'hybrid'])
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
def test_unlabelled_with_keys_and_queue_match_per_anchor_loop(contrast_mode, hybrid, kind):
    features = normalized(BSZ, 2, 5, seed=3)
    labels = PARTIAL_LABELS['mixed']
    more = extras(kind, 'partial', seed=3)
    expected = value_and_grad(
        lambda f: loop_loss(
            f, labels, hybrid=hybrid, temperature=0.15, contrast_mode=contrast_mode, **more
        ),
        features,
    )
    for chunk_size in (None, 1, 3):
        criterion = SupConLoss(0.15, contrast_mode, 0.07, chunk_size, hybrid=hybrid)
        got = value_and_grad(lambda f: criterion(f, labels, **more), features)
        assert_value_and_grad_close(got, expected)


@pytest.mark.parametrize('n_views', [1, 2, 3])
@pytest.mark.parametrize('labels_name', ['mixed', 'all-unlabelled', 'one-labelled'])
def test_hybrid_with_unlabelled_samples_matches_per_anchor_loop(labels_name, n_views):
    features = normalized(BSZ, n_views, 5, seed=4)
    labels = PARTIAL_LABELS[labels_name]
    expected = value_and_grad(
        lambda f: loop_loss(f, labels, hybrid=True, temperature=0.3), features
    )
    for chunk_size in (None, 1, 3):
        criterion = SupConLoss(0.3, chunk_size=chunk_size, hybrid=True)
        assert_value_and_grad_close(
            value_and_grad(lambda f: criterion(f, labels), features), expected
        )


def test_only_minus_one_is_unlabelled():
    """-2 and uint8 255 (which torch finds == -1) are classes; -1 in float or int is not."""
    features = normalized(6, 2, 5, seed=17)
    criterion = SupConLoss(0.2)
    as_class = criterion(features, torch.tensor([0, 0, 5, 5, 1, 1]))
    assert torch.equal(criterion(features, torch.tensor([0, 0, -2, -2, 1, 1])), as_class)
    uint8 = torch.tensor([0, 0, 255, 255, 1, 1], dtype=torch.uint8)
    assert torch.equal(criterion(features, uint8), as_class)
    unlabelled = loop_loss(features, torch.tensor([0, 0, -1, -1, 1, 1]), temperature=0.2)
    for labels in (torch.tensor([0, 0, -1, -1, 1, 1]), torch.tensor([0.0, 0, -1, -1, 1, 1])):
        assert criterion(features, labels).item() == pytest.approx(unlabelled.item(), rel=1e-12)
    assert unlabelled.item() != pytest.approx(as_class.item(), rel=1e-3)


def test_labels_without_unlabelled_give_todays_loss_bit_for_bit():
    """The label path as it was before -1 existed: PositivePairs over torch.unique's groups."""
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        features = F.normalize(torch.randn(9, 2, 6, generator=generator, dtype=dtype), dim=-1)
        labels = torch.tensor([3, 0, 3, -2, 5, 0, 0, -2, 9])  # -2: an ordinary class
        for chunk_size in (None, 4):
            got = value_and_grad(
                lambda f: SupConLoss(0.1, chunk_size=chunk_size)(f, labels), features
            )

            def before(f):
                group = torch.unique(labels, return_inverse=True)[1]
                sample = torch.arange(9).repeat(2)
                pairs = PositivePairs(group[sample], group[sample], torch.arange(18), num_groups=9)
                contrast = torch.cat(torch.unbind(f, 1))
                return LeanSupConFunction.apply(contrast, contrast, pairs, 0.1, 0.07, chunk_size)

            assert_value_and_grad_equal(got, value_and_grad(before, features))


# ------------------------------------------------------------------------------------ multi-hot
@pytest.mark.parametrize('chunk_size', [None, 1, 3])
@pytest.mark.parametrize('n_views', [1, 2, 3])
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
@pytest.mark.parametrize('multilabel', ['jaccard', 'any'])
def test_multi_hot_matches_per_anchor_loop(multilabel, contrast_mode, n_views, chunk_size):
    features = normalized(BSZ, n_views, 5, seed=6)
    expected = value_and_grad(
        lambda f: loop_loss(
            f, MULTI_HOT, multilabel=multilabel, temperature=0.2, contrast_mode=contrast_mode
        ),
        features,
    )
    criterion = SupConLoss(0.2, contrast_mode, 0.07, chunk_size, multilabel=multilabel)
    got = value_and_grad(lambda f: criterion(f, MULTI_HOT), features)
    assert_value_and_grad_close(got, expected)
    # bool and float rows are the same labels
    for same in (MULTI_HOT.bool(), MULTI_HOT.double()):
        assert_value_and_grad_equal(value_and_grad(lambda f: criterion(f, same), features), got)


def test_jaccard_and_any_differ_and_the_default_is_jaccard():
    features = normalized(BSZ, 2, 5, seed=7)
    jaccard = SupConLoss(0.2, multilabel='jaccard')(features, MULTI_HOT)
    assert torch.equal(SupConLoss(0.2)(features, MULTI_HOT), jaccard)
    assert SupConLoss(0.2, multilabel='any')(features, MULTI_HOT).item() != pytest.approx(
        jaccard.item(), rel=1e-3
    )


@pytest.mark.parametrize('kind', ['keys', 'queue', 'keys-queue'])
@pytest.mark.parametrize('contrast_mode', ['all', 'one'])
@pytest.mark.parametrize('multilabel', ['jaccard', 'any'])
def test_multi_hot_with_keys_and_queue_match_per_anchor_loop(multilabel, contrast_mode, kind):
    features = normalized(BSZ, 2, 5, seed=8)
    more = extras(kind, 'multi-hot', seed=8)
    expected = value_and_grad(
        lambda f: loop_loss(
            f,
            MULTI_HOT,
            multilabel=multilabel,
            temperature=0.15,
            contrast_mode=contrast_mode,
            **more,
        ),
        features,
    )
    for chunk_size in (None, 1, 3):
        criterion = SupConLoss(0.15, contrast_mode, 0.07, chunk_size, multilabel=multilabel)
        got = value_and_grad(lambda f: criterion(f, MULTI_HOT, **more), features)
        assert_value_and_grad_close(got, expected)


@pytest.mark.parametrize('kind', ['none', 'keys-queue'])
@pytest.mark.parametrize('multilabel', ['jaccard', 'any'])
def test_one_hot_rows_give_the_single_label_loss(multilabel, kind):
    """One class per row, or none (an all-zero row is -1): both rules reduce to single labels."""
    features = normalized(BSZ, 2, 5, seed=9)
    labels = PARTIAL_LABELS['mixed']
    single_extras = extras(kind, 'partial', seed=9)
    multi_extras = dict(single_extras)
    one_hot = F.one_hot(labels.clamp(min=0), 5) * (labels >= 0)[:, None]
    if 'queue' in kind:
        multi_extras['queue_labels'] = (
            F.one_hot(QUEUE_PARTIAL.clamp(min=0), 5) * (QUEUE_PARTIAL >= 0)[:, None]
        )
    criterion = SupConLoss(0.2, chunk_size=3, multilabel=multilabel)
    single = value_and_grad(lambda f: criterion(f, labels, **single_extras), features)
    multi = value_and_grad(lambda f: criterion(f, one_hot, **multi_extras), features)
    assert_value_and_grad_close(multi, single, rel=1e-12)


def test_all_zero_multi_hot_is_simclr():
    features = normalized(BSZ, 3, 5, seed=10)
    zeros = torch.zeros(BSZ, 4)
    simclr = value_and_grad(lambda f: SupConLoss(0.2)(f), features)
    for multilabel in ('jaccard', 'any'):
        got = value_and_grad(lambda f: SupConLoss(0.2, multilabel=multilabel)(f, zeros), features)
        assert_value_and_grad_close(got, simclr, rel=1e-12)


@pytest.mark.parametrize('chunk_size', [None, 2])
@pytest.mark.parametrize('multilabel', ['jaccard', 'any'])
def test_gradcheck_lean_function_with_label_sets(multilabel, chunk_size):
    generator = torch.Generator().manual_seed(11)
    # contrast_mode='all' on 3 samples x 2 views, plus 2 queue rows; unnormalised on purpose
    anchor = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    contrast = torch.randn(6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    rows = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.float64)
    sample = torch.tensor([0, 1, 2]).repeat(2)
    queue_rows = torch.tensor([[0, 1, 0], [1, 1, 1]], dtype=torch.float64)
    own_columns = torch.stack([sample, sample + 3], 1)
    pairs = LabelSetPairs(
        rows[sample],
        torch.cat([rows[sample], queue_rows]),
        own_columns,
        torch.arange(6),
        multilabel,
    )

    def loss(anchor, contrast):
        return LeanSupConFunction.apply(anchor, contrast, pairs, 0.5, 0.7, chunk_size, queue)

    assert torch.autograd.gradcheck(loss, (anchor, contrast))


def test_multi_hot_keeps_no_pair_matrix_for_backward():
    """Everything the autograd node holds is at most rows x max(D, C, views), never N x N."""
    n_samples, n_views, dim, n_classes = 32, 2, 4, 3
    features = normalized(n_samples, n_views, dim, seed=12).requires_grad_()
    labels = torch.randint(0, 2, (n_samples, n_classes), generator=torch.Generator().manual_seed(0))
    loss = SupConLoss(0.2)(features, labels)
    node = loss.grad_fn
    held = [t for t in node.saved_tensors if t is not None]
    held += [value for value in vars(node.pairs).values() if isinstance(value, torch.Tensor)]
    n_rows = n_samples * n_views
    assert held and max(t.numel() for t in held) <= n_rows * max(dim, n_classes, n_views)
    assert isinstance(node.pairs, LabelSetPairs)


def test_automatic_chunks_leave_room_for_the_weights(monkeypatch):
    features = normalized(BSZ, 2, 5, seed=13)
    whole = value_and_grad(lambda f: SupConLoss(0.2)(f, MULTI_HOT), features)
    block_sizes = []
    row_blocks = contrastive._row_blocks

    def recording_row_blocks(n_rows, chunk_size):
        block_sizes.append(chunk_size)
        return row_blocks(n_rows, chunk_size)

    monkeypatch.setattr(contrastive, '_row_blocks', recording_row_blocks)
    # 14 anchors x 14 rows x 8 bytes, twice (logits and weights): 4 rows' worth makes blocks of 4
    criterion = SupConLoss(0.2, memory_budget=4 * 14 * 8 * 2 + 5)
    chunked = value_and_grad(lambda f: criterion(f, MULTI_HOT), features)
    assert block_sizes == [4, 4]  # forward and backward
    assert_value_and_grad_close(chunked, whole, rel=1e-12)


# --------------------------------------------------------------------------------------- errors
def one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert '\n' not in str(error.value)


def test_bad_labels_raise_one_line():
    features = normalized(4, 2, 3, seed=14)
    criterion = SupConLoss()
    two = torch.tensor([[1, 0], [0, 2], [1, 1], [0, 0]])
    one_line_value_error(lambda: criterion(features, two), 'must hold only 0 and 1.*got 2')
    one_line_value_error(
        lambda: criterion(features, two.float() / 2), 'must hold only 0 and 1.*got 0.5'
    )
    one_line_value_error(
        lambda: criterion(features, torch.zeros(5, 3)), r'labels must be \[bsz\] = \[4\]'
    )
    one_line_value_error(
        lambda: criterion(features, torch.zeros(4, 3, 2)), r'got shape \(4, 3, 2\)'
    )
    one_line_value_error(lambda: SupConLoss(multilabel='all'), "multilabel must be one of")
    one_line_value_error(
        lambda: SupConLoss(hybrid=True)(features, torch.eye(4)), 'hybrid=True needs one label'
    )
    queue = normalized(3, 3, seed=15)
    one_line_value_error(
        lambda: criterion(features, torch.eye(4), queue=queue, queue_labels=torch.arange(3)),
        r'queue_labels must be multi-hot \[K, C\] = \[3, 4\]',
    )
    one_line_value_error(
        lambda: criterion(features, torch.eye(4), queue=queue, queue_labels=torch.eye(3, 4) * 3),
        'multi-hot queue_labels must hold only 0 and 1',
    )
    one_line_value_error(
        lambda: criterion(features, torch.arange(4), queue=queue, queue_labels=torch.eye(3)),
        '9 queue_labels for a queue of 3 rows',
    )
    # the reference's labels.view(-1, 1) layout stays one label per sample
    labels = torch.tensor([0, 1, 0, -1])
    assert torch.equal(criterion(features, labels[:, None]), criterion(features, labels))


# ----------------------------------------------------------------------------------- distributed
WORLD_SIZE = 2
# case -> (labels, samples per rank, contrast_mode, options): options may hold 'hybrid', 'any',
# 'keys', 'queue', 'chunk'
DISTRIBUTED_CASES = {
    'unlabelled': ('partial', [4, 3], 'all', ()),
    'unlabelled-hybrid-one': ('partial', [3, 4], 'one', ('hybrid',)),
    'unlabelled-keys-queue-chunked': ('partial', [4, 3], 'all', ('keys', 'queue', 'chunk')),
    'jaccard': ('multi-hot', [4, 3], 'all', ()),
    'any-one-chunked': ('multi-hot', [3, 4], 'one', ('any', 'chunk')),
    'jaccard-keys-queue': ('multi-hot', [4, 3], 'all', ('keys', 'queue')),
}


def distributed_case(case, rows=slice(None)):
    """(criterion, features, labels, forward keywords) of a case, for the samples `rows`."""
    labels_kind, _, contrast_mode, options = DISTRIBUTED_CASES[case]
    criterion = SupConLoss(
        0.5,
        contrast_mode,
        chunk_size=2 if 'chunk' in options else None,
        hybrid='hybrid' in options,
        multilabel='any' if 'any' in options else 'jaccard',
    )
    features = normalized(BSZ, 2, 5, seed=16)
    labels = PARTIAL_LABELS['mixed'] if labels_kind == 'partial' else MULTI_HOT
    more = extras('-'.join(options), labels_kind, seed=16)
    if 'keys' in more:
        more['keys'] = more['keys'][rows]
    return criterion, features[rows], labels[rows], more


def _on_rank(rank, world):
    results = {}
    for case, (_, sizes, _, _) in DISTRIBUTED_CASES.items():
        start = sum(sizes[:rank])
        rows = slice(start, start + sizes[rank])
        criterion, features, labels, more = distributed_case(case, rows)
        features = features.clone().requires_grad_()
        loss = criterion(features, labels, **more)
        # weighted by anchor count, DDP's average over ranks is the mean over all anchors
        (loss * world * sizes[rank] / sum(sizes)).backward()
        results[case] = {'loss': loss.detach(), 'grad': features.grad}
    return results


@pytest.fixture(scope='module')
def distributed_results(gloo_ranks):
    return gloo_ranks(_on_rank, world=WORLD_SIZE)


@pytest.mark.parametrize('case', list(DISTRIBUTED_CASES))
def test_two_ranks_equal_one_process(distributed_results, case):
    sizes = DISTRIBUTED_CASES[case][1]
    criterion, features, labels, more = distributed_case(case)
    one_process = value_and_grad(lambda f: criterion(f, labels, **more), features)
    loop = value_and_grad(
        lambda f: loop_loss(
            f,
            labels,
            hybrid=criterion.hybrid,
            multilabel=criterion.multilabel,
            temperature=0.5,
            contrast_mode=criterion.contrast_mode,
            **more,
        ),
        features,
    )
    assert_value_and_grad_close(one_process, loop)

    rank_losses = torch.stack([result[case]['loss'] for result in distributed_results])
    anchor_share = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    two_ranks_loss = (rank_losses * anchor_share).sum()
    # DDP averages the ranks' gradients; gather_with_grad has already summed the cross-rank parts
    two_ranks_grad = torch.cat([r[case]['grad'] for r in distributed_results]) / WORLD_SIZE
    assert_value_and_grad_close((two_ranks_loss, two_ranks_grad), one_process, rel=1e-12)
