"""main_predict.py: its accuracy is main_linear.py's, its probabilities a plain softmax's, its kNN
a brute-force vote's; folders, CSVs of paths and broken images; torchrun; one-line errors."""

import csv
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, free_port, script_env
from inprocess import assert_one_line_error, call
from PIL import Image
from test_export import digits_images, plain_network
from trained_models import DIGIT_CLASSES, DIGITS

from supcon.system import checkpoint


@pytest.fixture(scope='module')
def ckpts(digits_checkpoints):
    return digits_checkpoints


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def probabilities(text):
    return [float(p) for p in text.split(';')]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Images in nested folders of any layout: PNG, greyscale JPEG with an upper-case
    extension, RGBA, a broken PNG, a text file (not an image), and an empty sub-folder."""
    root = tmp_path_factory.mktemp('to_classify')
    rng = np.random.default_rng(0)
    (root / 'b' / 'deep').mkdir(parents=True)
    (root / 'a').mkdir()
    (root / 'empty').mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f'{i}.png')
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(root / 'b' / 'GREY.JPG')
    rgba = rng.integers(0, 256, (12, 12, 4), dtype=np.uint8)
    Image.fromarray(rgba, 'RGBA').save(root / 'b' / 'deep' / 'alpha.png')
    (root / 'a' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    (root / 'a' / 'notes.txt').write_text('not an image')
    return root


IMAGES = ['0.png', '1.png', '2.png', 'a/broken.png', 'b/GREY.JPG', 'b/deep/alpha.png']


@pytest.mark.slow
def test_accuracy_on_the_test_split_is_main_linears_final_accuracy(ckpts, tmp_path):
    """Also: every probability is the softmax of the plain network's logits, top-k sorted."""
    args = ['--ckpt', ckpts['linear'], '--split', 'test', '--out', 'p.csv', '--num_workers', '0']
    result = call('main_predict', args, tmp_path)
    assert result.code == 0, result.err
    printed = re.findall(r'^accuracy: ([\d.]+) \((\d+) of 360 test images\)$', result.out, re.M)
    assert printed and printed[0][0] == ckpts['final'], (result.out, ckpts['final'])
    rows = read_csv(tmp_path / 'p.csv')
    assert [r['path'] for r in rows] == [f'digits:test:{i}' for i in range(360)]
    assert sum(r['class'] == r['label'] for r in rows) == int(printed[0][1])
    with torch.no_grad():
        want = F.softmax(plain_network('linear', ckpts)(digits_images()), dim=1)
    top_p, top_i = want.topk(5, dim=1)
    for row, p, i in zip(rows, top_p.tolist(), top_i.tolist()):
        assert row['top_classes'].split(';') == [DIGIT_CLASSES[c] for c in i]
        assert probabilities(row['top_probabilities']) == pytest.approx(p, abs=2e-6)
        assert row['class'] == DIGIT_CLASSES[i[0]] and float(row['probability']) == pytest.approx(
            p[0], abs=2e-6
        )
        assert row['error'] == ''


def test_a_folder_is_searched_recursively_in_order_and_a_broken_image_is_a_row(
    ckpts, folder, tmp_path
):
    result = call(
        'main_predict',
        ['--ckpt', ckpts['ce'], '--images', folder, '--out', 'out/p.csv', '--topk', '3'],
        tmp_path,
    )
    assert result.code == 0, result.err
    assert 'predicted 5 of 6 images (1 unreadable)' in result.out
    rows = read_csv(tmp_path / 'out' / 'p.csv')
    assert [r['path'] for r in rows] == [str(folder / name) for name in IMAGES]
    broken = rows[3]
    assert broken['class'] == '' and broken['error'].startswith('cannot read the image')
    for row in rows[:3] + rows[4:]:
        assert row['error'] == '' and row['class'] in DIGIT_CLASSES
        assert len(row['top_classes'].split(';')) == 3
        top = probabilities(row['top_probabilities'])
        assert top == sorted(top, reverse=True) and float(row['probability']) == top[0]

    # a CSV of the same paths (relative to the CSV, a labels column ignored): the same rows
    listed = folder / 'list.csv'
    listed.write_text('labels,path\n' + ''.join(f'x,{name}\n' for name in IMAGES))
    again = call(
        'main_predict',
        ['--ckpt', ckpts['ce'], '--images', listed, '--out', 'q.csv', '--topk', '3'],
        tmp_path,
    )
    assert again.code == 0, again.err
    assert read_csv(tmp_path / 'q.csv') == rows


def brute_force_knn(gallery, gallery_labels, queries, k=200, temperature=0.07):
    """Each query's class: the largest sum of exp(cos / t) over its k most similar images."""
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    predicted = []
    for sim in q @ g.T:
        nearest = np.argsort(-sim, kind='stable')[:k]
        votes = np.zeros(10)
        np.add.at(votes, gallery_labels[nearest], np.exp(sim[nearest] / temperature))
        predicted.append(int(votes.argmax()))
    return np.array(predicted)


@pytest.mark.slow
def test_knn_with_an_encoder_checkpoint_votes_as_a_brute_force_knn(ckpts, tmp_path):
    from supcon.data import datasets

    args = ['--ckpt', ckpts['encoder'], '--knn', '--split', 'test', '--out', 'k.csv']
    result = call('main_predict', args + ['--num_workers', '0'], tmp_path)
    assert result.code == 0, result.err
    encoder = plain_network('encoder', ckpts)
    train = datasets.build_dataset('digits', 'train', None)
    with torch.no_grad():
        gallery = encoder(digits_images_of(train)).numpy()
        queries = encoder(digits_images()).numpy()
    want = brute_force_knn(gallery, np.array(train.targets), queries)
    rows = read_csv(tmp_path / 'k.csv')
    assert [int(r['class']) for r in rows] == want.tolist()
    for row in rows:
        assert sum(probabilities(row['top_probabilities'])) <= 1 + 1e-5
    test_labels = np.array([int(r['label']) for r in rows])
    accuracy = 100 * (want == test_labels).mean()
    assert f'accuracy: {accuracy:.2f} (' in result.out


def digits_images_of(dataset):
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])
    return torch.stack([tf(Image.fromarray(image)) for image in dataset.images])


@pytest.fixture(scope='module')
def multi_label(ckpts, tmp_path_factory):
    """main_linear.py on a multi-label CSV (3 labels, 12 training and 6 test images)."""
    root = tmp_path_factory.mktemp('multi')
    rng = np.random.default_rng(1)
    labels = ['cat;dog', 'owl', 'cat', 'dog;owl', 'cat;owl', 'dog']
    for split, count in (('train', 12), ('test', 6)):
        lines = ['path,labels']
        for i in range(count):
            name = f'{split}{i}.png'
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name)
            lines.append(f'{name},{labels[i % 6]}')
        (root / f'{split}.csv').write_text('\n'.join(lines) + '\n')
    args = DIGITS[2:] + ['--dataset', 'csv', '--data_csv', root / 'train.csv']
    args += ['--test_csv', root / 'test.csv', '--mean', '(0.5,0.5,0.5)', '--std', '(0.3,0.3,0.3)']
    args += ['--ckpt', ckpts['encoder'], '--batch_size', '4', '--epochs', '1', '--seed', '0']
    result = call('main_linear', args, root)
    assert result.code == 0, result.err
    final = re.findall(r'^final mean average precision: ([\d.]+)$', result.out, re.M)
    path = next(root.rglob('last.pth'))
    assert checkpoint.load_checkpoint(str(path))['extra']['classes'] == ['cat', 'dog', 'owl']
    return root, path, final[0]


def test_multi_label_lists_every_class_at_the_threshold_and_measures_map(multi_label, tmp_path):
    root, ckpt, final = multi_label
    result = call('main_predict', ['--ckpt', ckpt, '--split', 'test', '--out', 'm.csv'], tmp_path)
    assert result.code == 0, result.err
    assert f'mean average precision: {final} (6 images)' in result.out
    rows = read_csv(tmp_path / 'm.csv')
    assert list(rows[0]) == [
        'path', 'labels', 'classes', 'probabilities', 'top_classes', 'top_probabilities', 'error'
    ]  # fmt: skip
    assert rows[0]['labels'] == 'cat;dog' and rows[1]['labels'] == 'owl'
    for threshold in (0.3, 0.5, 0.7):
        out = f't{threshold}.csv'
        args = ['--ckpt', ckpt, '--images', root / 'test.csv', '--out', out]
        result = call('main_predict', args + ['--threshold', str(threshold)], tmp_path)
        assert result.code == 0, result.err
        for row in read_csv(tmp_path / out):
            everything = dict(
                zip(row['top_classes'].split(';'), probabilities(row['top_probabilities']))
            )
            chosen = [
                c for c, p in sorted(everything.items(), key=lambda cp: -cp[1]) if p >= threshold
            ]
            assert (row['classes'].split(';') if row['classes'] else []) == chosen
    # the names come from the checkpoint: the training CSV is no longer needed
    (root / 'train.csv').unlink()
    result = call('main_predict', ['--ckpt', ckpt, '--images', root / 'test.csv'], tmp_path)
    assert result.code == 0, result.err
    for row in read_csv(tmp_path / 'predictions.csv'):
        assert sorted(row['top_classes'].split(';')) == ['cat', 'dog', 'owl']


@pytest.mark.slow
def test_under_torchrun_every_image_is_predicted_once_as_in_one_process(ckpts, folder, tmp_path):
    """Two ranks of one image a batch (--batch_size_val 2 is the global batch) against one
    process of one image a batch: the same arithmetic, so the same bytes."""
    args = ['--ckpt', ckpts['linear'], '--images', folder, '--num_workers', '0']
    one = call('main_predict', args + ['--out', 'one.csv', '--batch_size_val', '1'], tmp_path)
    assert one.code == 0, one.err
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2']
    two = subprocess.run(
        launcher + ['--master_port', str(free_port()), str(REPO / 'main_predict.py')]
        + [str(a) for a in args] + ['--out', 'two.csv', '--batch_size_val', '2'],
        cwd=tmp_path, env=dict(script_env(), PYTHONPATH=str(REPO)), capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count('predicted 5 of 6 images (1 unreadable)') == 1  # rank 0 alone
    rows = read_csv(tmp_path / 'two.csv')
    assert [r['path'] for r in rows] == [str(folder / name) for name in IMAGES]
    assert (tmp_path / 'two.csv').read_bytes() == (tmp_path / 'one.csv').read_bytes()


def test_bad_input_is_one_line_and_writes_nothing(ckpts, folder, tmp_path):
    other = tmp_path / 'other.pth'
    torch.save({'model': {'conv.weight': torch.zeros(1)}}, other)
    no_path = tmp_path / 'no_path.csv'
    no_path.write_text('file,labels\n0.png,x\n')
    linear, encoder = ckpts['linear'], ckpts['encoder']
    for name in ('x', 'y'):
        (tmp_path / 'xy' / name).mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(tmp_path / 'xy' / name / '0.png')
    other_classes = ['--dataset', 'path', '--data_folder', tmp_path / 'xy']
    other_classes += ['--test_folder', tmp_path / 'xy']
    cases = [
        (['--ckpt', tmp_path / 'missing.pth', '--images', folder], ['missing.pth: no such file']),
        (['--ckpt', encoder, '--images', folder], ['encoder checkpoint', 'add --knn']),
        (['--ckpt', other, '--images', folder], ['holds neither a classifier']),
        (['--ckpt', linear, '--encoder', linear, '--images', folder], ['not an encoder']),
        (['--ckpt', linear, '--images', folder, '--threshold', '0.5'], ['multi-label']),
        (['--ckpt', linear], ['--images FOLDER', '--split test']),
        (['--ckpt', linear, '--images', folder, '--split', 'test'], ['pass one of them']),
        (['--ckpt', linear, '--images', folder / 'empty'], ['holds no image files']),
        (['--ckpt', linear, '--images', folder / 'nothing'], ['does not exist']),
        (['--ckpt', linear, '--images', no_path], ['no "path" column']),
        (['--ckpt', linear, '--images', folder, '--dataset', 'digits'], ['--split and --knn']),
        (['--ckpt', linear, '--images', folder, '--out', 'p.txt'], ['does not end in .csv']),
        (['--ckpt', linear, '--split', 'test', *other_classes], ['not the 10 of --ckpt']),
    ]
    for args, fragments in cases:
        result = call('main_predict', args + ['--num_workers', '0'], tmp_path)
        assert_one_line_error(result, *fragments)
    assert not (tmp_path / 'predictions.csv').exists() and not list(tmp_path.glob('.*.tmp'))


@pytest.mark.slow
def test_the_progress_is_shown_on_a_terminal_only(ckpts, folder, tmp_path):
    import os
    import pty

    args = ['--ckpt', ckpts['ce'], '--images', folder, '--batch_size_val', '2']
    captured = call('main_predict', args + ['--out', 'a.csv'], tmp_path)
    assert captured.code == 0 and 'predicting:' not in captured.out + captured.err
    leader, follower = pty.openpty()
    done = subprocess.run(
        [sys.executable, str(REPO / 'main_predict.py'), *map(str, args), '--out', 'b.csv'],
        cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=follower, timeout=300,
    )  # fmt: skip
    os.close(follower)
    shown = b''
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal's other end is closed: all read
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert done.returncode == 0, shown
    assert b'\r  predicting: 3/3 batches' in shown
    assert (tmp_path / 'a.csv').read_bytes() == (tmp_path / 'b.csv').read_bytes()
