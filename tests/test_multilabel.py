"""Multi-label data in the scripts: mean average precision and F1@0.5 against scikit-learn, and one
epoch of main_supcon.py (both rules), main_linear.py and main_ce.py on a tiny multi-label CSV,
their printed numbers recomputed from the saved weights."""

import csv
import re

import numpy as np
import pytest
import torch
from helpers import read_scalars
from inprocess import call, save_folder
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

import losses
from networks.from_checkpoint import encoder_from_checkpoint
from networks.resnet_big import LinearClassifier, SupCEResNet
from supcon.data import augment, datasets
from supcon.evaluation import multilabel
from supcon.system.checkpoint import load_checkpoint

CLASSES = ['a', 'b', 'c', 'd']  # 'd' has no test image: it is left out of both means
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


# --------------------------------------------------------------------------- the measures


@pytest.mark.parametrize('tied', [False, True])
def test_average_precision_is_scikit_learns(tied):
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, size=(60, 5))
    targets[:, 3] = 0  # a label without a positive
    scores = rng.integers(0, 4, size=(60, 5)) if tied else rng.normal(size=(60, 5))
    ap = multilabel.average_precision(torch.as_tensor(scores), torch.as_tensor(targets))
    for c in range(5):
        if c == 3:
            assert torch.isnan(ap[c])
        else:
            assert ap[c].item() == pytest.approx(
                average_precision_score(targets[:, c], scores[:, c]), abs=1e-12
            )


def test_f1_at_one_half_and_the_summary_are_scikit_learns_over_the_labels_with_a_positive():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, size=(50, 4))
    targets[:, 1] = 0
    scores = rng.normal(size=(50, 4))
    f1 = multilabel.f1_scores(torch.as_tensor(scores), torch.as_tensor(targets))
    predicted = (1 / (1 + np.exp(-scores)) >= 0.5).astype(int)
    present = [0, 2, 3]
    assert torch.isnan(f1[1])
    assert f1[present].tolist() == pytest.approx(
        f1_score(targets, predicted, average=None, labels=present).tolist(), abs=1e-12
    )
    mean_ap, mean_f1, left_out = multilabel.summary(
        torch.as_tensor(scores), torch.as_tensor(targets)
    )
    assert left_out == 1
    assert mean_ap == pytest.approx(
        100 * average_precision_score(targets[:, present], scores[:, present], average='macro')
    )
    assert mean_f1 == pytest.approx(
        100 * f1_score(targets, predicted, average='macro', labels=present)
    )


def test_top1_hits_counts_images_whose_best_label_is_theirs():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    targets = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 0, 1.0]])
    expected = sum(targets[i, scores[i].argmax()].item() == 1 for i in range(3))
    assert multilabel.top1_hits(scores, targets).item() == expected == 2


# --------------------------------------------------------------------------- the scripts


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """16 training and 8 test images, 1 or 2 labels each (3 unlabelled training rows)."""
    root = tmp_path_factory.mktemp('multi')
    rng = np.random.default_rng(0)
    train_labels = ['a;b', 'b', 'c', 'a', 'b;c', 'd', 'a;d', '', 'c', 'a;c', 'b', '', 'a', 'b;d',
                    'c', '']  # fmt: skip
    test_labels = ['a', 'b', 'c', 'a;b', 'b;c', 'a;c', 'c', 'b']
    for split, labels in (('train', train_labels), ('test', test_labels)):
        (root / split).mkdir()
        with open(root / f'{split}.csv', 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['path', 'labels'])
            for i, names in enumerate(labels):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f'{i}.png')
                writer.writerow([f'{split}/{i}.png', names])
    return root


def script_args(tiny, **changes):
    options = {
        'dataset': 'csv',
        'data_csv': tiny / 'train.csv',
        'test_csv': tiny / 'test.csv',
        'mean': str(MEAN),
        'std': str(STD),
        'size': 8,
        'batch_size': 4,
        'epochs': 1,
        'learning_rate': 0.05,
        'num_workers': 0,
        'device': 'cpu',
        'seed': 2,
        'print_freq': 100,
        'model': 'resnet18',
    }
    options.update(changes)
    return [
        str(item)
        for key, value in options.items()
        if value is not None
        for item in ((f'--{key}',) if value is True else (f'--{key}', value))
    ]


def read_test_split(tiny):
    """(test images normalised [N, 3, 8, 8], multi-hot targets [N, 4]) read independently."""
    rows = list(csv.DictReader(open(tiny / 'test.csv')))
    transform = augment.test_transform(8, MEAN, STD)
    images = torch.stack([transform(Image.open(tiny / r['path']).convert('RGB')) for r in rows])
    targets = torch.tensor([[float(c in r['labels'].split(';')) for c in CLASSES] for r in rows])
    return images, targets


def reported(out, name):
    return float(re.search(rf'^final {re.escape(name)}: ([0-9.]+)$', out, re.M).group(1))


def check_against_sklearn(out, logits, targets):
    logits, targets = logits.numpy(), targets.numpy()
    present = [c for c in range(len(CLASSES)) if targets[:, c].any()]
    assert present == [0, 1, 2]
    assert 'note: 1 of the 4 labels have no positive in the test split' in out
    expected_ap = 100 * average_precision_score(
        targets[:, present], logits[:, present], average='macro'
    )
    predicted = (logits >= 0).astype(int)
    expected_f1 = 100 * f1_score(targets, predicted, average='macro', labels=present)
    assert abs(reported(out, 'mean average precision') - expected_ap) <= 0.0051
    assert abs(reported(out, 'F1@0.5') - expected_f1) <= 0.0051
    assert re.search(r'^best mean average precision: [0-9.]+$', out, re.M)


@pytest.fixture(scope='module')
def pretrained(tiny, tmp_path_factory):
    """{rule: (checkpoint, the labels each loss call got, the loss's rule)} of one epoch each."""
    cwd = tmp_path_factory.mktemp('pretrain')
    runs = {}
    forward = losses.SupConLoss.forward
    for rule in ('jaccard', 'any'):
        seen = []

        def spy(self, features, labels=None, *args, **kwargs):
            seen.append((labels.detach().cpu().clone(), self.multilabel))
            return forward(self, features, labels, *args, **kwargs)

        args = script_args(tiny, multilabel=None if rule == 'jaccard' else rule)
        losses.SupConLoss.forward = spy
        try:
            result = call('main_supcon', args, cwd)
        finally:
            losses.SupConLoss.forward = forward
        assert result.code == 0, result.err
        runs[rule] = (save_folder('main_supcon', args, cwd) / 'last.pth', seen)
    return runs


@pytest.mark.slow
def test_main_supcon_gives_the_loss_multi_hot_labels_and_the_rule(tiny, pretrained):
    dataset = datasets.build_dataset('csv', 'train', None, data_folder=tiny / 'train.csv')
    rows = sorted(map(tuple, np.asarray(dataset.targets).tolist()))
    for rule, (ckpt, seen) in pretrained.items():
        assert len(seen) == 4 and all(r == rule for _, r in seen)
        labels = torch.cat([labels for labels, _ in seen])
        assert labels.shape == (16, 4) and labels.dtype == torch.float32
        assert sorted(map(tuple, labels.int().tolist())) == rows  # every image once
        assert ('_ml_any' in str(ckpt)) == (rule == 'any')
    a, b = (load_checkpoint(str(pretrained[r][0]))['model'] for r in ('jaccard', 'any'))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the rules weigh pairs differently


@pytest.mark.slow
def test_main_linear_reports_scikit_learns_mean_average_precision(tiny, pretrained, tmp_path):
    ckpt = pretrained['jaccard'][0]
    args = script_args(tiny, model=None, ckpt=ckpt, epochs=2, learning_rate=0.1)
    result = call('main_linear', args, tmp_path)
    assert result.code == 0, result.err
    assert 'note: the classifier trains on the 13 labelled of the 16 training images' in result.out
    encoder, _ = encoder_from_checkpoint(load_checkpoint(str(ckpt)), str(ckpt), 'resnet18')
    folder = save_folder('main_linear', args, tmp_path)
    classifier = LinearClassifier(name='resnet18', num_classes=4, dim_in=encoder.feature_dim)
    classifier.load_state_dict(load_checkpoint(str(folder / 'last.pth'))['model'])
    images, targets = read_test_split(tiny)
    with torch.no_grad():
        logits = classifier(encoder.eval()(images))
    check_against_sklearn(result.out, logits, targets)
    tags = read_scalars(args_tb_folder('main_linear', args, tmp_path))
    assert {'val_map', 'val_f1'} <= set(tags) and 'val_acc' not in tags


@pytest.mark.slow
def test_main_ce_reports_scikit_learns_mean_average_precision(tiny, tmp_path):
    args = script_args(tiny, epochs=2)
    result = call('main_ce', args, tmp_path)
    assert result.code == 0, result.err
    model = SupCEResNet(name='resnet18', num_classes=4)
    model.load_state_dict(
        load_checkpoint(str(save_folder('main_ce', args, tmp_path) / 'last.pth'))['model']
    )
    images, targets = read_test_split(tiny)
    with torch.no_grad():
        logits = model.eval()(images)
    check_against_sklearn(result.out, logits, targets)


def args_tb_folder(script, args, cwd):
    import importlib

    return cwd / importlib.import_module(script).parse_option(args).tb_folder


# --------------------------------------------------------------------------- two ranks


class ScoredRows(torch.utils.data.Dataset):
    """Inputs and multi-hot targets, with ``targets`` as --dataset csv holds them."""

    def __init__(self, inputs, targets):
        self.inputs = inputs
        self.targets = list(targets.numpy().astype(np.uint8))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.inputs[index], torch.from_numpy(self.targets[index].astype(np.float32))


def two_rank_case():
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(11, 3, generator=generator)  # 6 and 5 rows: unequal shares
    targets = (torch.rand(11, 4, generator=generator) < 0.4).float()
    targets[0] = torch.tensor([1.0, 1, 1, 1])  # every label has a positive
    torch.manual_seed(6)
    return ScoredRows(inputs, targets), torch.nn.Linear(3, 4)


def _rank_validate(rank, world):
    import argparse

    from supcon.data.sampling import build_loader
    from supcon.evaluation import classify
    from supcon.system import runtime

    dataset, model = two_rank_case()
    loader, _ = build_loader(
        dataset, 2, shuffle=False, seed=0, rank=rank, world_size=world, pad=False
    )
    rt = runtime.Runtime(device=torch.device('cpu'), rank=rank, world_size=world)
    opt = argparse.Namespace(print_freq=1000)
    with torch.no_grad():
        return classify.validate(loader, model, torch.nn.BCEWithLogitsLoss(), opt, rt, 4)


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:This process .* is multi-threaded:DeprecationWarning')
def test_two_ranks_measure_every_test_image_once(gloo_ranks):
    loss, mean_ap, f1 = gloo_ranks(_rank_validate)[0]
    dataset, model = two_rank_case()
    inputs = dataset.inputs
    targets = torch.stack([torch.from_numpy(t.astype(np.float32)) for t in dataset.targets])
    with torch.no_grad():
        logits = model(inputs)
    assert loss == pytest.approx(torch.nn.BCEWithLogitsLoss()(logits, targets).item(), rel=1e-6)
    assert mean_ap == pytest.approx(100 * average_precision_score(targets, logits, average='macro'))
    predicted = (logits >= 0).int().numpy()
    assert f1 == pytest.approx(100 * f1_score(targets.numpy(), predicted, average='macro'))


def test_the_two_digit_set_labels_each_image_with_both_of_its_digits(tmp_path):
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location(
        'two_digits_csv', REPO / 'benchmarks' / 'two_digits_csv.py'
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    builder.main(['--out', str(tmp_path), '--seed', '1'])
    train_x, train_y, test_x, test_y = datasets._digits_arrays()
    for split, digits, labels in (('train', train_x, train_y), ('test', test_x, test_y)):
        rows = list(csv.DictReader(open(tmp_path / f'{split}.csv')))
        assert len(rows) == len(digits)
        small = np.stack(
            [np.asarray(Image.fromarray(d).resize((16, 16), Image.BICUBIC)) for d in digits]
        )
        for i in (0, 7, len(rows) - 1):
            image = np.asarray(Image.open(tmp_path / rows[i]['path']))
            assert np.array_equal(image[8:24, :16], small[i]) and not image[:8].any()
            # the right half is one of this split's digits, and the labels are both digits
            matches = np.flatnonzero((small == image[8:24, 16:]).all(axis=(1, 2, 3)))
            assert len(matches)
            names = set(rows[i]['labels'].split(';'))
            assert names == {str(labels[i]), str(labels[matches[0]])}
    dataset = datasets.build_dataset('csv', 'train', None, data_folder=tmp_path / 'train.csv')
    assert dataset.multilabel and dataset.classes == [str(d) for d in range(10)]
