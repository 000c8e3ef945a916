"""supcon/evaluation/retrieval.py and main_retrieval.py: the metrics against
pytorch-metric-learning's
AccuracyCalculator (ties, a class with one member, leave-one-out), the exact neighbour order,
bounded memory, the script on every kind of checkpoint, torchrun, the export, bad input."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import (
    REPO,
    free_port,
    read_scalars,
    reference_options,
    save_our_checkpoint,
    save_reference_checkpoint,
    script_env,
    write_image_folder,
)
from inprocess import assert_one_line_error, call
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from networks.encoders import build_encoder
from networks.resnet_big import SupCEResNet, SupConResNet
from supcon.data import augment, datasets
from supcon.evaluation import retrieval
from supcon.evaluation.retrieval import retrieval_metrics, sorted_neighbours
from supcon.objectives.moco import KeyEncoder, LabelQueue
from supcon.system import checkpoint

PEER_METRICS = ('precision_at_1', 'r_precision', 'mean_average_precision_at_r')
SCRIPT_METRICS = list(PEER_METRICS) + ['recall_at_1', 'recall_at_5', 'recall_at_10']

# --------------------------------------------------------------------------- independent formulas


def peer(query, query_labels, gallery=None, gallery_labels=None, knn_func=None):
    """AccuracyCalculator's numbers, k='max_bin_count' as its docs prescribe for MAP@R."""
    calc = AccuracyCalculator(
        include=PEER_METRICS,
        k='max_bin_count',
        device=torch.device('cpu'),
        knn_func=knn_func or CustomKNN(CosineSimilarity()),
    )
    return calc.get_accuracy(
        torch.as_tensor(query),
        torch.as_tensor(query_labels),
        None if gallery is None else torch.as_tensor(gallery),
        None if gallery_labels is None else torch.as_tensor(gallery_labels),
    )


def plain_order(query, gallery, leave_one_out, ties='lowest index'):
    """Every gallery index per query: similarity descending, then index (numpy, full matrix)."""
    q = np.asarray(query, np.float64)
    g = np.asarray(gallery, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = q @ g.T
    if leave_one_out:
        np.fill_diagonal(sim, -np.inf)
    index = np.arange(g.shape[0]) if ties == 'lowest index' else -np.arange(g.shape[0])
    order = np.stack([np.lexsort((index, -row)) for row in sim])
    return order[:, : g.shape[0] - int(leave_one_out)], sim


def knn_by(ties):
    """A knn_func for AccuracyCalculator that ranks with ``plain_order``."""

    def knn(query, k, reference, ref_includes_query=False):
        order, sim = plain_order(query.numpy(), reference.numpy(), ref_includes_query, ties)
        order = order[:, :k]
        return torch.from_numpy(np.take_along_axis(sim, order, 1)), torch.from_numpy(order)

    return knn


def plain_recall(query, query_labels, gallery, gallery_labels, cut):
    """Recall@K of the literature over the queries whose class is in the gallery."""
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
    order, _ = plain_order(query, gallery, leave_one_out)
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    counts = np.array([(gallery_labels == y).sum() - int(leave_one_out) for y in query_labels])
    hit = (gallery_labels[order[:, :cut]] == query_labels[:, None]).any(axis=1)
    return hit[counts > 0].mean()


def exact_tied_embeddings(n, seed, dim=8):
    """Rows with four entries of +-1: normalised, every product is a multiple of 1/4, exact in
    float32 whatever the summation order, so equal similarities are truly equal (ties)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    x[n // 2 :: 7] = x[1]  # exact duplicates, some of them in other classes
    return x


def assert_agree(ours, theirs):
    for name in PEER_METRICS:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


# --------------------------------------------------------------------------- the metrics


@pytest.fixture(scope='module')
def continuous():
    """Clustered random features: no exact ties; query class 6 absent from the gallery, and
    class 5 with a single member (alone in leave-one-out)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 16))
    q_labels = np.concatenate([rng.integers(0, 5, 150), [5], np.full(4, 6)])
    g_labels = np.concatenate([rng.integers(0, 6, 240), [7, 7]])
    q = (centres[q_labels] + 1.5 * rng.normal(size=(len(q_labels), 16))).astype(np.float32)
    g = (centres[g_labels] + 1.5 * rng.normal(size=(len(g_labels), 16))).astype(np.float32)
    return q, q_labels, g, g_labels


def test_metrics_match_accuracy_calculator_against_a_gallery(continuous):
    q, ql, g, gl = continuous
    ours = retrieval_metrics(torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(g), gl)
    assert_agree(ours, peer(q, ql, g, gl))
    # the queries of class 6 have no relevant item and count nowhere, as in AccuracyCalculator
    assert ours['num_scored_queries'] == len(ql) - 4 and ours['num_gallery'] == len(gl)
    assert 0.3 < ours['precision_at_1'] < 1  # neither trivial nor hopeless data
    for cut in (1, 5, 10):
        assert ours[f'recall_at_{cut}'] == pytest.approx(plain_recall(q, ql, g, gl, cut), abs=1e-12)
    assert ours['recall_at_1'] == ours['precision_at_1']


@pytest.mark.parametrize('score_entries', [1 << 18, 1000])
def test_metrics_match_accuracy_calculator_leave_one_out(continuous, score_entries, monkeypatch):
    monkeypatch.setattr(retrieval, 'SCORE_ENTRIES', score_entries)  # 1000: scored in parts
    q, ql, _, _ = continuous
    ours = retrieval_metrics(torch.from_numpy(q), ql, block_size=17)
    assert_agree(ours, peer(q, ql))  # reference=None: the queries searched among themselves
    # the one member of class 5 has nobody to find: it is left out
    assert ours['num_scored_queries'] == len(ql) - 1 and ours['leave_one_out']
    for cut in (1, 5, 10):
        assert ours[f'recall_at_{cut}'] == pytest.approx(plain_recall(q, ql, None, None, cut))


@pytest.mark.parametrize('leave_one_out', [False, True])
def test_metrics_with_ties_match_accuracy_calculator_ranking_by_index(leave_one_out):
    q = exact_tied_embeddings(120, seed=1)
    ql = np.random.default_rng(2).integers(0, 4, len(q))
    ql[5] = 9  # a class with one member
    g, gl = (None, None) if leave_one_out else (exact_tied_embeddings(90, seed=3), ql[:90] % 4)
    ours = retrieval_metrics(
        torch.from_numpy(q), ql, None if g is None else torch.from_numpy(g), gl, block_size=8
    )
    assert_agree(ours, peer(q, ql, g, gl, knn_func=knn_by('lowest index')))
    for cut in (1, 5, 10):
        assert ours[f'recall_at_{cut}'] == pytest.approx(plain_recall(q, ql, g, gl, cut))
    # the ties decide these numbers: ranking them the other way changes them
    other = peer(q, ql, g, gl, knn_func=knn_by('highest index'))
    assert max(abs(ours[m] - other[m]) for m in PEER_METRICS) > 1e-3


@pytest.mark.parametrize('leave_one_out', [False, True])
def test_neighbours_are_exact_and_ties_go_to_the_lowest_index(leave_one_out):
    q = torch.from_numpy(exact_tied_embeddings(60, seed=4))
    g = q if leave_one_out else torch.from_numpy(exact_tied_embeddings(50, seed=5))
    want, sim = plain_order(q.numpy(), g.numpy(), leave_one_out)
    qn, gn = F.normalize(q, dim=1), F.normalize(g, dim=1)
    k = 12
    # ties cross the k-th place in some rows: topk alone would pick among them at will
    kth = np.take_along_axis(sim, want[:, k - 1 : k + 1], 1)
    assert (kth[:, 0] == kth[:, 1]).sum() > 10
    for block in (1, 7, 64):
        blocks = list(sorted_neighbours(qn, gn, k, leave_one_out=leave_one_out, block_size=block))
        assert [start for start, _, _ in blocks] == list(range(0, 60, block))
        indices = torch.cat([i for _, i, _ in blocks]).numpy()
        values = torch.cat([v for _, _, v in blocks]).numpy()
        np.testing.assert_array_equal(indices, want[:, :k])
        np.testing.assert_array_equal(values, np.take_along_axis(sim, want[:, :k], 1))
    if leave_one_out:
        assert not (indices == np.arange(60)[:, None]).any()


@pytest.mark.parametrize('kind', ['continuous', 'ties'])
def test_grouped_selection_equals_a_full_sort(kind):
    """A gallery of 2003 against k of 1, 10, 60: the search takes its m largest from the groups
    with the largest maxima (2003 is no multiple of the group sizes 16, 7, 3: a tail too)."""
    rng = np.random.default_rng(6)
    if kind == 'ties':
        q, g = exact_tied_embeddings(40, seed=7), exact_tied_embeddings(2003, seed=8)
    else:
        q, g = rng.normal(size=(40, 32)), rng.normal(size=(2003, 32))
    qn = F.normalize(torch.as_tensor(q, dtype=torch.float32), dim=1)
    gn = F.normalize(torch.as_tensor(g, dtype=torch.float32), dim=1)
    sim = (qn @ gn.T).numpy()  # the products the search makes for its one block of 40
    want = np.stack([np.lexsort((np.arange(2003), -row)) for row in sim])
    for k in (1, 10, 60):
        ((_, indices, values),) = sorted_neighbours(qn, gn, k, block_size=40)
        np.testing.assert_array_equal(indices.numpy(), want[:, :k])
        np.testing.assert_array_equal(values.numpy(), np.take_along_axis(sim, want[:, :k], 1))


def test_every_gallery_item_can_be_asked_for():
    q, g = F.normalize(torch.randn(5, 4), dim=1), F.normalize(torch.randn(6, 4), dim=1)
    (_, indices, _), *_ = sorted_neighbours(q, g, 6)
    assert sorted(indices[0].tolist()) == list(range(6))
    (_, indices, _), *_ = sorted_neighbours(q, q, 4, leave_one_out=True)
    assert all(sorted(row) == sorted(set(range(5)) - {i}) for i, row in enumerate(indices.tolist()))
    with pytest.raises(ValueError):
        next(sorted_neighbours(q, q, 5, leave_one_out=True))


def test_non_finite_features_are_refused_in_one_line():
    x = torch.randn(6, 3)
    x[2, 0] = float('nan')
    with pytest.raises(Exception, match='NaN or infinite') as info:
        retrieval_metrics(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert '\n' not in str(info.value)


MEMORY_PROBE = """
import sys, torch
from supcon.evaluation.retrieval import retrieval_metrics
torch.set_num_threads(1)
n, dim, classes, block = 20000, 32, 200, 256
g = torch.Generator().manual_seed(0)
labels = torch.arange(n) % classes
centres = torch.randn(classes, dim, generator=g)[labels]
queries, gallery = (centres + torch.randn(n, dim, generator=g) for _ in range(2))
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # restart the peak (VmHWM) from the memory in use now
before = status('VmRSS')
result = retrieval_metrics(queries, labels, gallery, labels, block_size=block)
print(status('VmHWM') - before, result['precision_at_1'], result['neighbours_searched'])
"""


@pytest.mark.slow
def test_memory_of_a_20k_by_20k_search_stays_far_below_the_full_matrix():
    done = subprocess.run(
        [sys.executable, '-c', MEMORY_PROBE],
        cwd=REPO,
        # big buffers straight from mmap and back on free: RSS then follows the live tensors
        # (glibc's adaptive threshold would otherwise keep freed blocks resident)
        env=dict(script_env(), PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_='1048576'),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown, precision, k = done.stdout.split()
    full_matrix = 20000 * 20000 * 4  # float32 similarities: 1.6 GB
    assert int(k) == 100 and 0.1 < float(precision) < 1.0
    # one block is 256 x 20000 x 4 = 20 MB; allow for its temporaries, not for the matrix
    assert int(grown) < full_matrix / 20, f'peak grew by {int(grown) / 2**20:.0f} MiB'


# --------------------------------------------------------------------------- main_retrieval.py

MEAN_STD = ['--mean', '(0.5, 0.5, 0.5)', '--std', '(0.25, 0.25, 0.25)']
RUN = ['--size', '8', '--num_workers', '0', '--device', 'cpu', '--batch_size_val', '5']


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('retrieval_data')
    write_image_folder(root / 'train', {'ant': 6, 'bee': 5, 'cat': 7}, size=8, seed=0)
    write_image_folder(root / 'test', {'ant': 4, 'bee': 3, 'cat': 4}, size=8, seed=1)
    return root


def folder_args(root):
    return ['--dataset', 'path', '--data_folder', root / 'train', '--test_folder', root / 'test']


def features_of(network, root, split):
    """What an encoder should give for the split's images: the test transform, L2-normalised."""
    dataset = datasets.build_dataset(
        'path',
        split,
        augment.test_transform(8, (0.5,) * 3, (0.25,) * 3),
        data_folder=root / 'train',
        test_folder=root / 'test',
    )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return F.normalize(network.eval()(images), dim=1).numpy()


def checkpoint_of_kind(kind, path):
    """A checkpoint as each writer lays it out, and the network the script should rebuild."""
    torch.manual_seed(3)
    if kind in ('supcon', 'reference'):
        save = save_our_checkpoint if kind == 'supcon' else save_reference_checkpoint
        net = SupConResNet('resnet18')
        net.load_state_dict(save(path, model='resnet18', seed=4))
        return net.encoder
    if kind == 'ce':
        net = SupCEResNet('resnet18', num_classes=3)
        opt = checkpoint.plain_options(reference_options(model='resnet18'))
        checkpoint.save_checkpoint({'model': net.state_dict(), 'epoch': 7, 'opt': opt}, str(path))
        return net.encoder
    if kind == 'torchvision':  # the released ImageNet model: torchvision's layout, module.
        net = torchvision.models.resnet18()
        state = {f'module.encoder.{k}': v for k, v in net.state_dict().items()}
        torch.save({'model': state, 'epoch': 100}, path)
        net.fc = torch.nn.Identity()
        return net
    if kind == 'timm':
        net = SupConResNet('resnet10t', encoder=build_encoder('resnet10t', size=8))
        opt = {'model': 'resnet10t', 'size': 8, 'method': 'SupCon'}
        torch.save({'model': net.state_dict(), 'opt': opt, 'epoch': 1}, path)
        return net.encoder
    net = SupConResNet('resnet18')  # --moco: the query model plus the key encoder and queue
    moco = torch.nn.ModuleDict({'key_encoder': KeyEncoder(net), 'queue': LabelQueue(8, 128)})
    with torch.no_grad():
        for p in moco['key_encoder'].parameters():
            p.add_(0.05 * torch.randn_like(p))  # the moving average lags the query encoder
    opt = {'model': 'resnet18', 'method': 'SupCon', 'moco': True, 'size': 8}
    torch.save({'model': net.state_dict(), 'moco': moco.state_dict(), 'opt': opt, 'epoch': 2}, path)
    return moco['key_encoder'].model.encoder if kind == 'moco_key' else net.encoder


def printed_metrics(out):
    found = dict(re.findall(r'^(\w+): ([0-9.]+)$', out, flags=re.M))
    return {name: float(value) for name, value in found.items()}


@pytest.mark.parametrize(
    'kind', ['supcon', 'ce', 'reference', 'torchvision', 'timm', 'moco', 'moco_key']
)
def test_every_kind_of_checkpoint(kind, folders, tmp_path):
    path = tmp_path / 'run' / f'{kind}.pth'
    path.parent.mkdir()
    network = checkpoint_of_kind(kind, path)
    args = ['--ckpt', path, *folder_args(folders), *MEAN_STD, *RUN, '--save_embeddings', 'e.npz']
    result = call(
        'main_retrieval', args + (['--key_encoder'] if kind == 'moco_key' else []), tmp_path
    )
    assert result.code == 0, result.out[-2000:] + result.err
    printed = printed_metrics(result.out)
    assert list(printed) == SCRIPT_METRICS + ['knn_acc']

    # the embeddings are the checkpoint's network's (the key encoder's with --key_encoder)
    saved = np.load(tmp_path / 'e.npz', allow_pickle=False)
    np.testing.assert_allclose(
        saved['query_features'], features_of(network, folders, 'test'), atol=2e-5
    )
    np.testing.assert_allclose(
        saved['gallery_features'], features_of(network, folders, 'train'), atol=2e-5
    )

    # the JSON next to the checkpoint holds what was printed, and the peer agrees with it
    # named for what was measured: the test folder (its last two parts), size, features
    variant = '_key_encoder' if kind == 'moco_key' else ''
    measured = f'path-{folders.name}-test_test_size8_encoder{variant}'
    assert [p.name for p in path.parent.glob('*.json')] == [f'retrieval_{kind}_{measured}.json']
    record = json.loads((path.parent / f'retrieval_{kind}_{measured}.json').read_text())
    for name, value in printed.items():
        assert (
            f'{record[name]:.{2 if name == "knn_acc" else 4}f}'
            == f'{value:.{2 if name == "knn_acc" else 4}f}'
        )
    theirs = peer(
        saved['query_features'],
        saved['query_labels'],
        saved['gallery_features'],
        saved['gallery_labels'],
    )
    assert_agree(record, theirs)
    assert (
        record['num_queries'] == 11
        and record['num_gallery'] == 18
        and record['features'] == 'encoder'
    )


def test_export_keys_types_and_paths(folders, tmp_path):
    path = tmp_path / 'supcon.pth'
    save_our_checkpoint(path)
    out = tmp_path / 'deep' / 'er' / 'emb.npz'  # folders are made
    result = call(
        'main_retrieval',
        ['--ckpt', path, *folder_args(folders), *MEAN_STD, *RUN, '--save_embeddings', out],
        tmp_path,
    )
    assert result.code == 0, result.err
    saved = np.load(out, allow_pickle=False)
    assert sorted(saved.files) == sorted(
        [
            'query_features',
            'query_labels',
            'gallery_features',
            'gallery_labels',
            'class_names',
            'query_paths',
            'gallery_paths',
        ]
    )
    assert saved['query_features'].dtype == np.float32 and saved['gallery_labels'].dtype == np.int64
    assert saved['class_names'].dtype.kind == 'U' and saved['class_names'].tolist() == [
        'ant',
        'bee',
        'cat',
    ]
    np.testing.assert_allclose(np.linalg.norm(saved['query_features'], axis=1), 1, rtol=1e-5)
    # each row's path names its image, and its class folder is its label's
    paths = saved['gallery_paths'].tolist()
    assert paths == sorted(str(p) for p in (folders / 'train').rglob('*.png'))
    names = saved['class_names'][saved['gallery_labels']].tolist()
    assert [os.path.basename(os.path.dirname(p)) for p in paths] == names
    assert saved['query_labels'].tolist() == [0] * 4 + [1] * 3 + [2] * 4


def test_gallery_test_head_features_and_tensorboard(folders, tmp_path):
    path = tmp_path / 'simclr.pth'
    save_our_checkpoint(path)
    args = [
        '--ckpt',
        path,
        *folder_args(folders),
        *MEAN_STD,
        *RUN,
        '--gallery',
        'test',
        '--features',
        'head',
        '--save_embeddings',
        'e.npz',
    ]
    result = call('main_retrieval', args, tmp_path)
    assert result.code == 0, result.err
    assert 'note: no knn_acc with --gallery test' in result.out
    measured = f'path-{folders.name}-test_test_size8_head_gallery_test'
    record = json.loads((tmp_path / f'retrieval_simclr_{measured}.json').read_text())
    saved = np.load(tmp_path / 'e.npz', allow_pickle=False)
    assert saved['query_features'].shape == (11, 128)  # the projection head's width
    np.testing.assert_array_equal(saved['gallery_features'], saved['query_features'])
    np.testing.assert_array_equal(saved['gallery_paths'], saved['query_paths'])
    assert record['leave_one_out'] and record['num_gallery'] == 11 and 'knn_acc' not in record
    assert_agree(record, peer(saved['query_features'], saved['query_labels']))
    scalars = read_scalars(tmp_path / 'retrieval_tensorboard' / measured)
    assert sorted(scalars) == sorted(SCRIPT_METRICS)
    assert scalars['r_precision'] == [
        (1, pytest.approx(record['r_precision'], abs=1e-6))
    ]  # epoch 1


def test_digits_with_val_split_queries_the_held_out_images(tmp_path):
    path = tmp_path / 'supcon.pth'
    save_our_checkpoint(path)
    args = [
        '--ckpt',
        path,
        '--dataset',
        'digits',
        '--val_split',
        '0.1',
        '--gallery',
        'test',
        *RUN,
        '--save_embeddings',
        'e.npz',
    ]
    result = call('main_retrieval', args, tmp_path)
    assert result.code == 0, result.err
    assert 'embedding 144 digits held-out images (queries)' in result.out
    saved = np.load(tmp_path / 'e.npz', allow_pickle=False)
    assert 'query_paths' not in saved.files and saved['class_names'].tolist() == list('0123456789')
    held_out = datasets.build_dataset('digits', 'test', None, val_split=0.1)
    assert saved['query_labels'].tolist() == held_out.targets
    measured = 'digits_val0.1_size8_encoder_gallery_test'
    record = json.loads((tmp_path / f'retrieval_supcon_{measured}.json').read_text())
    assert record['queries'] == 'held-out' and record['num_queries'] == 144


@pytest.mark.slow
def test_torchrun_ranks_embed_shares_and_count_every_image_once(folders, tmp_path):
    path = tmp_path / 'supcon.pth'
    save_our_checkpoint(path)
    args = [*folder_args(folders), *MEAN_STD, *RUN, '--ckpt', path]
    one = call(
        'main_retrieval', args + ['--save_embeddings', 'one.npz', '--out', 'one.json'], tmp_path
    )
    assert one.code == 0, one.err
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2']
    two = subprocess.run(
        launcher + ['--master_port', str(free_port()), str(REPO / 'main_retrieval.py')]
        + [str(a) for a in args] + ['--save_embeddings', 'two.npz', '--out', 'two.json'],
        cwd=tmp_path, env=dict(script_env(), PYTHONPATH=str(REPO)), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count('precision_at_1:') == 1  # rank 0 alone reports
    # 18 gallery images, --batch_size_val 5: one process reads 4 batches (5, 5, 5, 3); under
    # torchrun rank 0 reads whole batches 0 and 2, rank 1 batches 1 and 3
    assert 'gallery: 4/4 batches' in one.out and 'gallery: 2/2 batches' in two.stdout
    assert printed_metrics(two.stdout) == printed_metrics(one.out)
    one_npz, two_npz = (np.load(tmp_path / f'{n}.npz', allow_pickle=False) for n in ('one', 'two'))
    assert sorted(two_npz.files) == sorted(one_npz.files)
    for key in one_npz.files:
        # the same arrays, features included, bit for bit: every image is embedded in the
        # batch one process embeds it in (once ranks of 2 images differed by up to 4e-7)
        np.testing.assert_array_equal(two_npz[key], one_npz[key])
    assert len(set(two_npz['query_paths'].tolist())) == 11


@pytest.mark.slow
def test_bench_table_over_checkpoints(folders, tmp_path, monkeypatch, capsys):
    """benchmarks/bench_retrieval.py checkpoints: main_retrieval.py on each (a process of its
    own; the driver in this one), one row each, and the mean and standard deviation over them."""
    monkeypatch.syspath_prepend(str(REPO / 'benchmarks'))
    import bench_retrieval

    paths = [tmp_path / f'seed{seed}.pth' for seed in (0, 1)]
    for seed, path in enumerate(paths):
        save_our_checkpoint(path, seed=seed)
    argv = ['checkpoints', *map(str, paths), '--json', 'all.json', '--']
    argv += [*map(str, folder_args(folders)), *MEAN_STD, *RUN]
    monkeypatch.setattr(sys, 'argv', ['bench_retrieval.py', *argv])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # main_retrieval.py's processes: one thread
    bench_retrieval.main()
    records = json.loads((tmp_path / 'all.json').read_text())
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ')]
    assert rows[0].split(' | ')[1:4] == ['P@1', 'R-Prec', 'MAP@R'] and len(rows) == 4
    p1 = [records[str(path)]['precision_at_1'] for path in paths]
    assert rows[1].startswith(f'| {paths[0]} | {p1[0]:.4f} |')
    assert rows[2].startswith(f'| {paths[1]} | {p1[1]:.4f} |')
    mean, std = np.mean(p1), np.std(p1, ddof=1)
    assert rows[3].startswith(f'| mean ± std (2) | {mean:.4f} ± {std:.4f} |')
    assert not list(tmp_path.glob('retrieval_*.json'))  # its runs write to a scratch folder


# --------------------------------------------------------------------------- bad input


def test_a_failed_export_leaves_no_file_and_says_so_in_one_line(folders, tmp_path, monkeypatch):
    import main_retrieval

    def half_written(f, **arrays):
        f.write(b'PK half a zip')
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(main_retrieval.np, 'savez', half_written)
    path = tmp_path / 'supcon.pth'
    save_our_checkpoint(path)
    args = ['--ckpt', path, *folder_args(folders), *MEAN_STD, *RUN, '--save_embeddings', 'e.npz']
    result = call('main_retrieval', args, tmp_path)
    assert_one_line_error(result, '--save_embeddings e.npz', 'No space left on device')
    assert not list(tmp_path.glob('*.npz')) and not list(tmp_path.glob('.e.npz*'))


def bad_cases(root, tmp_path):
    good = tmp_path / 'good.pth'
    save_our_checkpoint(good)
    no_encoder = tmp_path / 'noenc.pth'
    torch.save(
        {'model': {'head.weight': torch.zeros(4, 4)}, 'opt': {'model': 'resnet18'}}, no_encoder
    )
    ce = tmp_path / 'ce.pth'
    torch.save(
        {
            'model': SupCEResNet('resnet18', num_classes=3).state_dict(),
            'opt': {'model': 'resnet18'},
        },
        ce,
    )
    (tmp_path / 'a_file').write_text('')
    write_image_folder(tmp_path / 'singles', {'x': 1, 'y': 1}, size=8)
    base = [*folder_args(root), *MEAN_STD, *RUN]
    return {
        'empty split (caught by the --val_split check)': (
            ['--ckpt', good, '--dataset', 'digits', '--val_split', '0.9999', *RUN],
            ['--val_split 0.9999', 'keeps 0 of the 1437 training images'],
        ),
        'no encoder': (['--ckpt', no_encoder, *base], ['holds no encoder weights']),
        'unwritable npz': (
            ['--ckpt', good, *base, '--save_embeddings', tmp_path / 'a_file' / 'e.npz'],
            ['--save_embeddings', 'is a file, not a folder'],
        ),
        'not npz': (
            ['--ckpt', good, *base, '--save_embeddings', 'e.txt'],
            ['does not end in .npz'],
        ),
        'bad gallery': (
            ['--ckpt', good, *base, '--gallery', 'val'],
            ["--gallery must be train", "got 'val'"],
        ),
        'no key encoder': (
            ['--ckpt', good, *base, '--key_encoder'],
            ['--key_encoder needs a checkpoint of main_supcon.py --moco'],
        ),
        'no head': (
            ['--ckpt', ce, *base, '--features', 'head'],
            ['cross-entropy (SupCE) checkpoint'],
        ),
        'nothing to find': (
            [
                '--ckpt',
                good,
                '--dataset',
                'path',
                '--test_folder',
                tmp_path / 'singles',
                *MEAN_STD,
                *RUN,
                '--gallery',
                'test',
            ],
            ['no query', 'another image of its class'],
        ),
        'no ckpt': (base, ['--ckpt is required']),
    }


def test_bad_input_is_one_line_before_any_work(folders, tmp_path):
    for name, (args, words) in bad_cases(folders, tmp_path).items():
        result = call('main_retrieval', args, tmp_path)
        assert_one_line_error(result, *words)
        assert 'embedding' not in result.out, name
        assert not list(tmp_path.glob('*.json')) and not list(tmp_path.rglob('*.npz')), name
