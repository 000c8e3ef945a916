"""Labels that are not one clean class per image, tried as a hostile user would (issue 34):
main_tsne.py on --dataset csv checkpoints, labels holding tabs and newlines in the projector's
metadata, the notes about which test split is read, the HPARAMS record of multi-label runs, the
advice of the multi-label refusals, and --val_split's memory on a multi-label CSV. Each test
failed on the code before its fix."""

import csv
import tracemalloc

import numpy as np
import pytest
from inprocess import assert_one_line_error, call, save_folder
from test_csv_dataset import write_csv, write_png
from test_tensorboard_views import accumulator, session_starts

from supcon.data import csv_dataset
from supcon.data.csv_dataset import build_csv_dataset

NORM = ['--mean', '(0.5,0.5,0.5)', '--std', '(0.25,0.25,0.25)']
FAST = [
    '--size',
    '8',
    '--num_workers',
    '0',
    '--device',
    'cpu',
    '--seed',
    '0',
    '--print_freq',
    '100',
]
TRAIN = NORM + FAST + ['--model', 'resnet18', '--batch_size', '4', '--epochs', '1']
# labels a CSV may hold that TensorBoard's metadata.tsv cannot: a tab, a newline, a backslash
ODD = ['plain', 'tab\there', 'two\nlines', 'back\\slash']


@pytest.fixture(scope='module')
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp('lists')
    for i in range(24):
        write_png(root / 'img' / f'{i}.png', i)
    write_csv(root / 'odd.csv', [[f'img/{i}.png', ODD[i % 4]] for i in range(16)])
    write_csv(root / 'odd_test.csv', [[f'img/{i}.png', ODD[i % 4]] for i in range(16, 24)])
    multi = ['a', 'b', 'a;b', 'c', 'b;c', 'a;c', 'c', 'a']
    write_csv(root / 'multi.csv', [[f'img/{i}.png', multi[i % 8]] for i in range(16)])
    mtest = ['a', 'b;c', 'c', 'a;b']
    write_csv(root / 'mtest.csv', [[f'img/{i}.png', mtest[i % 4]] for i in range(16, 24)])
    partly = [[f'img/{i}.png', '' if i % 4 == 0 else 'ab'[i % 2]] for i in range(16)]
    write_csv(root / 'partly.csv', partly)
    write_csv(root / 'test.csv', [[f'img/{i}.png', 'ab'[i % 2]] for i in range(16, 24)])
    return root


@pytest.fixture(scope='module')
def csv_checkpoint(lists):
    """main_supcon.py on --dataset csv (the odd labels), given --test_csv: its last.pth."""
    args = [
        '--dataset',
        'csv',
        '--data_csv',
        lists / 'odd.csv',
        '--test_csv',
        lists / 'odd_test.csv',
    ]
    args += TRAIN
    result = call('main_supcon', args, lists)
    assert result.code == 0, result.err
    return save_folder('main_supcon', args, lists) / 'last.pth'


# --------------------------------------------------------------------------- main_tsne.py


@pytest.mark.parametrize('given', [[], ['--data_csv', 'odd.csv'], ['--test_csv', 'odd_test.csv']])
def test_main_tsne_reads_a_csv_checkpoints_data(lists, csv_checkpoint, tmp_path, given):
    """Once every --dataset csv checkpoint was refused ("drop --data_folder/--test_folder",
    neither given): the recorded CSV paths were taken as the folders."""
    given = [lists / a if a.endswith('.csv') else a for a in given]
    out = tmp_path / 'map.png'
    args = ['--ckpt', csv_checkpoint, '--out', out, '--perplexity', '3', *given]
    args += ['--num_workers', '0', '--device', 'cpu']
    result = call('main_tsne', args, tmp_path)
    assert result.code == 0, result.err
    taken = result.out.splitlines()[0]
    assert taken.startswith('note: from the checkpoint: --dataset csv --size 8')
    assert ('--data_csv' in taken) == (not given or '--test_csv' in map(str, given))
    assert '--data_folder' not in taken and '--test_folder' not in taken
    assert out.is_file() and 'extracting encoder features of 8 csv test images' in result.out


def test_projector_metadata_escapes_tabs_and_newlines_in_labels(lists, csv_checkpoint, tmp_path):
    """Once a tab or newline inside a label split a row of metadata.tsv (3 columns under a
    2-column header; 33 lines for 16 rows)."""
    out = tmp_path / 'map.png'
    args = ['--ckpt', csv_checkpoint, '--out', out, '--perplexity', '3', '--projector']
    args += ['--num_workers', '0', '--device', 'cpu']
    result = call('main_tsne', args, tmp_path)
    assert result.code == 0, result.err
    (metadata,) = (tmp_path / 'map_projector').rglob('metadata.tsv')
    lines = metadata.read_text().split('\n')
    assert lines[-1] == ''  # one line per point after the header, each ended by a newline
    rows = [line.split('\t') for line in lines[:-1]]
    assert rows[0] == ['label', 'class'] and len(rows) == 9
    assert all(len(row) == 2 for row in rows)
    classes = sorted(ODD)  # the training CSV's classes, sorted
    escaped = {'plain': 'plain', 'tab\there': 'tab\\there', 'two\nlines': 'two\\nlines'}
    escaped['back\\slash'] = 'back\\\\slash'
    test_labels = [ODD[i % 4] for i in range(16, 24)]
    assert [(int(a), b) for a, b in rows[1:]] == [
        (classes.index(name), escaped[name]) for name in test_labels
    ]


# --------------------------------------------------------------------------- notes


@pytest.mark.slow
def test_the_test_csv_is_noted_only_where_it_is_not_read(lists):
    """main_ce.py / main_linear.py on --dataset csv read --test_csv (once a note said they did
    not); main_supcon.py reads it for the probe (once: 'only for --knn_every')."""
    data = ['--dataset', 'csv', '--data_csv', 'partly.csv', '--test_csv', 'test.csv']
    ce = call('main_ce', data + TRAIN + ['--trial', 'notes'], lists)
    assert ce.code == 0, ce.err
    assert 'not read' not in ce.out + ce.err and ' * Acc@1 ' in ce.out
    ckpt = save_folder('main_ce', data + TRAIN + ['--trial', 'notes'], lists) / 'last.pth'
    linear = call('main_linear', data + TRAIN + ['--ckpt', ckpt], lists)
    assert linear.code == 0, linear.err
    assert 'not read' not in linear.out + linear.err and ' * Acc@1 ' in linear.out
    probe = call('main_supcon', data + TRAIN + ['--online_probe', '--trial', 'notes'], lists)
    assert probe.code == 0, probe.err
    assert 'not read' not in probe.out and 'probe accuracy: ' in probe.out
    plain = call('main_supcon', data + TRAIN + ['--trial', 'plain'], lists)
    assert (
        plain.out.count(
            'note: --test_csv test.csv is not read: pretraining reads the test split only for'
            ' --knn_every, --online_probe, --ce_weight\n'
        )
        == 1
    )
    held_out = call('main_ce', data + TRAIN + ['--val_split', '0.5', '--trial', 'val'], lists)
    assert held_out.code == 0, held_out.err
    assert 'note: --test_csv test.csv is not read: --val_split 0.5 evaluates' in held_out.out


@pytest.mark.parametrize('script', ['main_ce', 'main_supcon'])
def test_held_out_images_without_a_label_are_left_out_of_the_evaluation(lists, script):
    """--val_split of a partly labelled CSV holds out unlabelled rows too; scoring them once
    ended in a traceback (cross-entropy given the target -1) in main_ce.py, main_linear.py and
    main_supcon.py's probe."""
    args = ['--dataset', 'csv', '--data_csv', 'partly.csv', '--val_split', '0.5', *TRAIN]
    args += ['--trial', 'held_out'] + (['--online_probe'] if script == 'main_supcon' else [])
    result = call(script, args, lists)
    assert result.code == 0, result.err
    # 16 rows, 4 unlabelled; the stratified half holds out 2 of them
    assert result.out.count('note: 2 held-out images without a label left out of') == 1
    assert (' * Acc@1 ' if script == 'main_ce' else 'probe accuracy: ') in result.out


# --------------------------------------------------------------------------- multi-label runs


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_ce', 'main_linear'])
def test_the_hparams_record_of_a_multi_label_run_names_its_logged_metrics(lists, tmp_path, script):
    """Once the record named val_acc, which a multi-label run never logs."""
    args = [
        '--dataset',
        'csv',
        '--data_csv',
        lists / 'multi.csv',
        '--test_csv',
        lists / 'mtest.csv',
    ]
    args += TRAIN
    if script == 'main_linear':
        ce = call('main_ce', args, tmp_path)
        assert ce.code == 0, ce.err
        args = args + ['--ckpt', save_folder('main_ce', args, tmp_path) / 'last.pth']
    result = call(script, args, tmp_path)
    assert result.code == 0, result.err
    tb = tmp_path / save_folder(script, args, tmp_path).relative_to(tmp_path)
    tb = str(tb).replace('_models', '_tensorboard')
    _, metrics = session_starts(tb)
    assert metrics == ['train_loss', 'train_acc', 'val_loss', 'val_map', 'val_f1']
    assert set(metrics) <= set(accumulator(tb).Tags()['scalars'])


@pytest.mark.parametrize(
    'extra, advice',
    [
        (['--knn_every', '1'], 'drop --knn_every: main_linear.py (mean average precision)'),
        (['--method', 'SupCon_hybrid'], 'use --method SupCon (which weighs shared labels)'),
        (['--moco'], 'drop --moco'),
    ],
)
def test_the_multi_label_refusals_advise_what_fits(lists, extra, advice):
    """Once --knn_every with --method SupCon was told to "use --method SupCon / SimCLR"."""
    args = ['--dataset', 'csv', '--data_csv', 'multi.csv', '--test_csv', 'mtest.csv', *TRAIN]
    result = call('main_supcon', args + extra, lists)
    assert_one_line_error(result, advice)
    assert 'use --method SupCon / SimCLR with the CSV' not in result.err


# --------------------------------------------------------------------------- memory


def dense_rarest_labels(targets, counts=None):
    """The rarest label of each multi-hot row (-1 for none), computed on the whole matrix;
    ``counts``: the labels' counts over all rows, when ``targets`` are some of them."""
    dense = np.asarray(targets, dtype=bool)
    counts = dense.sum(axis=0) if counts is None else counts
    rarest = np.where(dense, counts, np.iinfo(np.int64).max).argmin(axis=1)
    return np.where(dense.any(axis=1), rarest, -1).tolist()


def test_val_split_of_a_multi_label_csv_stratifies_by_the_rarest_label(tmp_path, monkeypatch):
    """Read from a CSV, in blocks of 7 rows (8 labels x 7 < 64 cells), as on the whole matrix."""
    names = [f'l{j}' for j in range(8)]
    rng = np.random.default_rng(0)
    rows = [
        [f'img/{i % 4}.png', ';'.join(names[j] for j in rng.choice(8, rng.integers(0, 4), False))]
        for i in range(50)
    ]
    for i in range(4):
        write_png(tmp_path / 'img' / f'{i}.png', i)
    with open(tmp_path / 'big.csv', 'w', newline='') as f:
        csv.writer(f).writerows([['path', 'labels']] + rows)
    monkeypatch.setattr(csv_dataset, 'STRATIFY_ENTRIES', 63)
    dataset = build_csv_dataset('train', None, tmp_path / 'big.csv', None)
    assert dataset.stratify_targets == dense_rarest_labels(dataset.targets)
    assert -1 in dataset.stratify_targets and len(set(dataset.stratify_targets)) > 3


def test_val_split_of_a_multi_label_csv_grows_with_the_rows_not_rows_by_labels():
    """--val_split stratifies by each row's rarest label; that once built a rows x labels int64
    array (100k rows, 1500 labels: 2.4 GB peak against 1.0 GB without the split). Here 20k rows
    of 500 labels: the old way peaked at 90 MB over the targets themselves."""
    rng = np.random.default_rng(1)
    n, labels = 20000, 500
    targets = [np.zeros(labels, np.uint8) for _ in range(n)]
    for row, chosen in zip(targets, rng.integers(0, labels, size=(n, 2))):
        row[chosen] = 1
    classes = [str(j) for j in range(labels)]
    dataset = csv_dataset.CSVImageDataset('x.csv', ['x.png'] * n, targets, classes, True)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        stratify = dataset.stratify_targets
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * labels * 8 / 4, f'peak {peak / 2**20:.0f} MiB'  # 20 MB; old: about 90
    counts = np.sum(targets, axis=0, dtype=np.int64)
    assert stratify[:500] == dense_rarest_labels(targets[:500], counts)
