"""Retrieval on partly labelled and multi-label data (supcon/evaluation/retrieval.py,
main_retrieval.py):
unlabelled images left out and counted, a shared label as relevance, checked against a plain
numpy loop (multi-label) and pytorch-metric-learning's AccuracyCalculator (single-label); the
default result file named for what was measured. Once all of these ended in a traceback
(``torch.bincount`` given -1 or multi-hot rows)."""

import json

import numpy as np
import pytest
import torch
from helpers import save_our_checkpoint
from inprocess import call
from test_csv_dataset import write_csv, write_png
from test_retrieval import SCRIPT_METRICS, assert_agree, exact_tied_embeddings, peer, plain_order

from supcon.evaluation import retrieval
from supcon.evaluation.retrieval import retrieval_metrics

RUN = ['--size', '8', '--num_workers', '0', '--device', 'cpu', '--batch_size_val', '5']
NORM = ['--mean', '(0.5,0.5,0.5)', '--std', '(0.25,0.25,0.25)']


def plain_multilabel_metrics(query, query_labels, gallery=None, gallery_labels=None):
    """The definitions of docs/retrieval.md, one query at a time: relevant = shares a label;
    queries with no relevant gallery item (those without a label among them) left out."""
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
    order, _ = plain_order(query, gallery, leave_one_out)
    q_labels = np.asarray(query_labels, bool)
    g_labels = np.asarray(gallery_labels, bool)
    sums = dict.fromkeys(SCRIPT_METRICS, 0.0)
    scored = 0
    for i, ranking in enumerate(order):
        relevant = [bool((q_labels[i] & g_labels[j]).any()) for j in ranking]
        r = sum(relevant)
        if r == 0:
            continue
        scored += 1
        hits = relevant[:r]
        sums['precision_at_1'] += relevant[0]
        sums['r_precision'] += sum(hits) / r
        sums['mean_average_precision_at_r'] += (
            sum(hits[n] * sum(hits[: n + 1]) / (n + 1) for n in range(r)) / r
        )
        for cut in (1, 5, 10):
            sums[f'recall_at_{cut}'] += any(relevant[:cut])
    return {name: value / scored for name, value in sums.items()}, scored


@pytest.mark.parametrize('leave_one_out', [False, True])
@pytest.mark.parametrize('tied', [False, True])
def test_multi_hot_metrics_match_a_plain_loop(leave_one_out, tied, monkeypatch):
    """Shared labels as relevance, unlabelled rows (all zeros) relevant to no one and never
    scored, ties to the lowest gallery index; label overlaps taken 7 rows at a time."""
    monkeypatch.setattr(retrieval, 'BLOCK_ENTRIES', 7 * 60)  # overlaps of 7 x 60 gallery rows
    rng = np.random.default_rng(3)
    make = (lambda n, s: exact_tied_embeddings(n, s)) if tied else (
        lambda n, s: np.random.default_rng(s).normal(size=(n, 16)).astype(np.float32)
    )  # fmt: skip
    query, gallery = make(40, 1), make(60, 2)
    query_labels = (rng.random((40, 6)) < 0.25).astype(np.uint8)
    gallery_labels = (rng.random((60, 6)) < 0.25).astype(np.uint8)
    query_labels[::9] = 0  # unlabelled queries
    gallery_labels[::5] = 0  # unlabelled gallery images
    if leave_one_out:
        gallery = gallery_labels = None
    tensors = [None if a is None else torch.as_tensor(a) for a in (gallery, gallery_labels)]
    ours = retrieval_metrics(
        torch.as_tensor(query), torch.as_tensor(query_labels), *tensors, block_size=8
    )
    theirs, scored = plain_multilabel_metrics(query, query_labels, gallery, gallery_labels)
    assert ours['num_scored_queries'] == scored and 0 < scored < 40
    for name in SCRIPT_METRICS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-9), name


def test_unlabelled_single_labels_are_never_relevant_and_never_scored():
    """-1 in the gallery is a distractor of no class; a query of -1 is not scored: the same
    numbers as AccuracyCalculator given the labelled rows alone plus a class of its own for
    each unlabelled gallery image (so they still take places in the ranking)."""
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(30, 8)), rng.normal(size=(50, 8))
    query_labels, gallery_labels = rng.integers(0, 4, 30), rng.integers(0, 4, 50)
    query_labels[::7], gallery_labels[::6] = -1, -1
    ours = retrieval_metrics(*map(torch.as_tensor, (query, query_labels, gallery, gallery_labels)))
    distinct = gallery_labels.copy()
    distinct[distinct < 0] = 100 + np.arange((distinct < 0).sum())  # classes with no query
    keep = query_labels >= 0
    assert_agree(ours, peer(query[keep], query_labels[keep], gallery, distinct))
    assert ours['num_scored_queries'] == keep.sum()


# --------------------------------------------------------------------------- the script


@pytest.fixture(scope='module')
def csvs(tmp_path_factory):
    """Twenty images, a partly labelled single-label training CSV, a multi-label one (with
    unlabelled rows), and their test CSVs; a random-weights checkpoint."""
    root = tmp_path_factory.mktemp('lists')
    for i in range(30):
        write_png(root / 'img' / f'{i}.png', i)
    partly = [[f'img/{i}.png', '' if i % 4 == 0 else 'abc'[i % 3]] for i in range(20)]
    write_csv(root / 'partly.csv', partly)
    write_csv(root / 'test.csv', [[f'img/{i}.png', 'abc'[i % 3]] for i in range(20, 30)])
    multi = ['a', 'b', 'a;b', 'c', '', 'b;c', 'a;c', 'c', 'a', '']
    write_csv(root / 'multi.csv', [[f'img/{i}.png', multi[i % 10]] for i in range(20)])
    mtest = ['a', 'b;c', 'c', 'a;b', 'b']
    write_csv(root / 'mtest.csv', [[f'img/{i}.png', mtest[i % 5]] for i in range(20, 30)])
    save_our_checkpoint(root / 'run' / 'last.pth')
    return root


def retrieve(csvs, train, test, tmp_path, *extra):
    args = ['--ckpt', csvs / 'run' / 'last.pth', '--dataset', 'csv', '--data_csv', csvs / train]
    args += ['--test_csv', csvs / test, *NORM, *RUN, '--save_embeddings', tmp_path / 'e.npz']
    args += ['--out', tmp_path / 'r.json', *extra]
    result = call('main_retrieval', args, tmp_path)
    assert result.code == 0, result.out[-2000:] + result.err
    assert 'Traceback' not in result.err
    record = json.loads((tmp_path / 'r.json').read_text())
    return result, record, np.load(tmp_path / 'e.npz', allow_pickle=False)


def test_a_partly_labelled_csv_leaves_its_unlabelled_gallery_images_out(csvs, tmp_path):
    result, record, saved = retrieve(csvs, 'partly.csv', 'test.csv', tmp_path)
    assert result.out.count('note: left out') == 1
    assert 'note: left out 0 unlabelled queries and 5 unlabelled gallery images' in result.out
    assert record['unlabelled_gallery_left_out'] == 5 and record['num_gallery'] == 15
    assert record['unlabelled_queries_left_out'] == 0 and record['relevant'] == 'same class'
    labelled = [f'{i}.png' for i in range(20) if i % 4]
    assert [p.rsplit('/', 1)[1] for p in saved['gallery_paths']] == labelled
    assert (saved['gallery_labels'] >= 0).all() and 'knn_acc' in record
    assert_agree(
        record,
        peer(
            saved['query_features'],
            saved['query_labels'],
            saved['gallery_features'],
            saved['gallery_labels'],
        ),
    )


def test_held_out_unlabelled_queries_are_left_out_and_counted(csvs, tmp_path):
    """--val_split holds out part of the partly labelled training CSV (unlabelled rows too),
    searched among themselves (--gallery test)."""
    result, record, saved = retrieve(
        csvs, 'partly.csv', 'test.csv', tmp_path, '--val_split', '0.5', '--gallery', 'test'
    )
    left_out = record['unlabelled_queries_left_out']
    assert left_out > 0 and f'note: left out {left_out} unlabelled quer' in result.out
    assert record['num_queries'] == 10 - left_out and (saved['query_labels'] >= 0).all()
    assert_agree(record, peer(saved['query_features'], saved['query_labels']))


@pytest.mark.parametrize('gallery', ['train', 'test'])
def test_a_multi_label_csv_counts_a_shared_label_as_relevant(csvs, tmp_path, gallery):
    result, record, saved = retrieve(csvs, 'multi.csv', 'mtest.csv', tmp_path, '--gallery', gallery)
    assert record['relevant'] == 'shares a label' and 'knn_acc' not in record
    assert saved['query_labels'].dtype == np.uint8 and saved['query_labels'].shape == (10, 3)
    if gallery == 'train':
        assert 'note: no knn_acc on multi-label data' in result.out
        assert 'note: left out 0 unlabelled queries and 4 unlabelled gallery images' in result.out
        assert record['num_gallery'] == 16 and saved['gallery_labels'].any(axis=1).all()
        theirs, scored = plain_multilabel_metrics(
            saved['query_features'],
            saved['query_labels'],
            saved['gallery_features'],
            saved['gallery_labels'],
        )
    else:
        assert 'note: left out' not in result.out  # every test row has a label
        theirs, scored = plain_multilabel_metrics(saved['query_features'], saved['query_labels'])
    assert record['num_scored_queries'] == scored == 10
    for name in SCRIPT_METRICS:
        assert record[name] == pytest.approx(theirs[name], abs=1e-6), name


@pytest.mark.slow
def test_the_default_result_file_is_named_for_what_was_measured(csvs, tmp_path):
    """Another data set or size writes another file (once both were retrieval_last.json)."""
    common = ['--ckpt', csvs / 'run' / 'last.pth', *NORM, '--num_workers', '0', '--device', 'cpu']
    runs = [
        ['--dataset', 'csv', '--data_csv', csvs / 'partly.csv', '--test_csv', csvs / 'test.csv'],
        ['--dataset', 'csv', '--data_csv', csvs / 'multi.csv', '--test_csv', csvs / 'mtest.csv'],
        ['--dataset', 'digits', '--size', '8', '--gallery', 'test'],
        ['--dataset', 'digits', '--size', '12', '--gallery', 'test'],
    ]
    for args in runs:
        if '--size' not in args:
            args = args + ['--size', '8']
        result = call('main_retrieval', common + args, tmp_path)
        assert result.code == 0, result.err
    written = sorted(p.name for p in (csvs / 'run').glob('retrieval_*.json'))
    where = csvs.name
    assert written == [
        f'retrieval_last_csv-{where}-mtest_test_size8_encoder.json',
        f'retrieval_last_csv-{where}-test_test_size8_encoder.json',
        'retrieval_last_digits_test_size12_encoder_gallery_test.json',
        'retrieval_last_digits_test_size8_encoder_gallery_test.json',
    ]
    sizes = {json.loads((csvs / 'run' / name).read_text())['size'] for name in written}
    assert sizes == {8, 12}
    # TensorBoard's folders likewise (the checkpoints of one run share one per measurement)
    folders = {p.name for p in (csvs / 'run' / 'retrieval_tensorboard').iterdir()}
    assert {name[len('retrieval_last_') : -len('.json')] for name in written} <= folders
