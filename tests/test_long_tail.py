"""Long tails on purpose (--imbalance_ratio, datasets.long_tail_indices) and what each class gets
(class_accuracy.py, validate's per-class counts): profiles, hand counts, the scripts' lines and
per_class_accuracy.json."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from inprocess import assert_one_line_error, call, save_folder
from PIL import Image
from test_resume import scalars, tb_folder

import main_linear
from supcon.data import datasets
from supcon.data.sampling import build_loader
from supcon.evaluation import class_accuracy, classify
from supcon.system import runtime

# --------------------------------------------------------------------------- the profile


def test_the_exponential_profile_of_cifar_lt():
    targets = np.repeat(np.arange(5), 50)
    np.random.default_rng(0).shuffle(targets)
    kept = datasets.long_tail_indices(targets, 5, ratio=10.0, seed=3)
    counts = np.bincount(targets[kept], minlength=5).tolist()
    assert counts == [int(50 * 10.0 ** (-i / 4)) for i in range(5)] == [50, 28, 15, 8, 5]
    assert kept.tolist() == sorted(set(kept.tolist()))  # sorted, no repeats
    # ratio 1 keeps everything; a huge ratio still keeps one image of the rarest class
    assert len(datasets.long_tail_indices(targets, 5, 1.0, 0)) == 250
    assert np.bincount(targets[datasets.long_tail_indices(targets, 5, 1e9, 0)]).tolist()[-1] == 1


def test_n_max_is_the_largest_class_and_a_class_keeps_at_most_what_it_has():
    targets = np.array([0] * 10 + [1] * 40 + [2] * 3)
    kept = datasets.long_tail_indices(targets, 3, ratio=4.0, seed=0)
    # wanted: 40, 40 / 2 = 20, 40 / 4 = 10; class 0 has 10 and class 2 only 3
    assert np.bincount(targets[kept]).tolist() == [10, 20, 3]


def test_unlabelled_images_are_all_kept_and_the_classes_get_their_tail():
    labels = np.repeat(np.arange(3), 20)
    targets = np.concatenate([labels, np.full(7, -1)])  # 7 CSV rows without labels
    np.random.default_rng(1).shuffle(targets)
    kept = datasets.long_tail_indices(targets, 3, ratio=4.0, seed=0)
    assert np.flatnonzero(targets == -1).tolist() == [i for i in kept if targets[i] == -1]
    assert np.bincount(targets[kept][targets[kept] >= 0]).tolist() == [20, 10, 5]


def test_the_images_kept_depend_on_the_seed_only():
    targets = np.repeat(np.arange(4), 30)
    first = datasets.long_tail_indices(targets, 4, 5.0, seed=7)
    assert np.array_equal(first, datasets.long_tail_indices(targets, 4, 5.0, seed=7))
    other = datasets.long_tail_indices(targets, 4, 5.0, seed=8)
    assert not np.array_equal(first, other)
    assert np.array_equal(np.bincount(targets[first]), np.bincount(targets[other]))


@pytest.mark.parametrize('val_split', [0.0, 0.2])
def test_digits_training_split_gets_the_tail_and_the_evaluation_split_is_untouched(val_split):
    splits = dict(val_split=val_split)
    full = datasets.build_dataset('digits', 'train', None, **splits)
    tail = datasets.build_dataset(
        'digits', 'train', None, imbalance_ratio=10, imbalance_seed=1, **splits
    )
    full_counts = np.bincount(full.targets)
    n_max = full_counts.max()
    want = [min(full_counts[i], max(1, int(n_max * 10 ** (-i / 9)))) for i in range(10)]
    assert np.bincount(tail.targets).tolist() == want
    assert want[-1] < 20 and want[0] > 100  # few-shot and many-shot classes both present
    test = datasets.build_dataset('digits', 'test', None, imbalance_ratio=10, **splits)
    plain_test = datasets.build_dataset('digits', 'test', None, **splits)
    assert test.targets == plain_test.targets
    assert np.array_equal(test[5][0], plain_test[5][0])
    # the tail's images are training images of their class, each once
    assert [full.targets[i] for i in tail.indices] == tail.targets
    assert tail.indices == sorted(set(tail.indices))


# --------------------------------------------------------------------------- per class


def test_shot_groups_means_and_thirds_against_a_hand_count():
    train = [101, 100, 20, 19, 150, 5]
    correct = [9, 5, 2, 1, 10, 0]
    total = [10, 10, 4, 2, 10, 0]  # the last class has no test image: no accuracy
    summary = class_accuracy.summarize(correct, total, train)
    assert summary['many'] == pytest.approx((90 + 100) / 2)  # 101 and 150 images
    assert summary['medium'] == pytest.approx((50 + 50) / 2)  # 100 and 20
    assert summary['few'] == pytest.approx(50)  # 19 (and 5, without test images)
    assert summary['mean'] == pytest.approx((90 + 50 + 50 + 50 + 100) / 5)
    # by training count: [150, 101], [100, 20], [19, 5]
    assert summary['thirds'] == pytest.approx([95, 50, 50])
    lines = class_accuracy.report_lines(summary)
    assert lines == [
        'mean per-class accuracy: 68.00',
        'many / medium / few-shot accuracy: 95.00 / 50.00 / 50.00',
    ]


def test_an_empty_group_prints_a_dash_and_the_thirds():
    summary = class_accuracy.summarize([1, 2, 3, 4], [4, 4, 4, 4], [500, 400, 300, 30])
    assert summary['few'] is None
    assert class_accuracy.report_lines(summary) == [
        'mean per-class accuracy: 62.50',
        'many / medium / few-shot accuracy: 50.00 / 100.00 / -',
        'thirds by training count (many / medium / few): 37.50 / 75.00 / 100.00',
    ]


def test_validate_counts_each_class_by_hand():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(23, 4, generator=generator)
    labels = torch.randint(0, 6, (23,), generator=generator)
    torch.manual_seed(1)
    classifier = nn.Linear(4, 6).eval()
    loader, _ = build_loader(
        torch.utils.data.TensorDataset(features, labels), 5, shuffle=False, seed=0, pad=False
    )
    rt = runtime.Runtime(device=torch.device('cpu'))
    opt = type('Opt', (), {'print_freq': 1000})()
    _, top1, _, (correct, total) = classify.validate(
        loader, classifier, nn.CrossEntropyLoss(), opt, rt, 6, per_class=True
    )
    predicted = classifier(features).argmax(1)
    for c in range(6):
        mine = labels == c
        assert total[c] == int(mine.sum()) and correct[c] == int((predicted[mine] == c).sum())
    assert 100 * sum(correct) / 23 == pytest.approx(top1)


# --------------------------------------------------------------------------- the scripts


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """Three classes: 8 training and 3 test images each, 8x8."""
    root = tmp_path_factory.mktemp('tail')
    rng = np.random.default_rng(0)
    for split, count in (('train', 8), ('test', 3)):
        for c, name in enumerate(('a', 'b', 'c')):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                base = np.array([90 * c, 255 - 90 * c, 128])
                pixels = np.clip(base + rng.normal(0, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f'{i}.png')
    return root


def args_of(root, **changes):
    options = dict(
        dataset='path',
        data_folder=root / 'train',
        test_folder=root / 'test',
        mean='(0.5,0.5,0.5)',
        std='(0.25,0.25,0.25)',
        size=8,
        batch_size=4,
        epochs=2,
        num_workers=0,
        device='cpu',
        seed=0,
        print_freq=100,
        learning_rate=0.05,
    )
    options.update(changes)
    return [
        x
        for k, v in options.items()
        if v is not None
        for x in ((f'--{k}',) if v is True else (f'--{k}', v))
    ]


def check_report(result, folder, train_counts):
    """The printed lines and per_class_accuracy.json agree with each other and the data."""
    out = result.out
    final = float(re.search(r'^final accuracy: ([0-9.]+)$', out, re.M).group(1))
    lines = out[out.index('final accuracy:') :].splitlines()
    report = json.loads((folder / 'per_class_accuracy.json').read_text())
    classes = report['classes']
    assert [c['class'] for c in classes] == ['a', 'b', 'c']
    assert [c['train_count'] for c in classes] == train_counts
    assert [c['test_count'] for c in classes] == [3, 3, 3]
    hits = [c['accuracy'] * c['test_count'] / 100 for c in classes]
    assert hits == pytest.approx([round(h) for h in hits])  # whole images
    assert sum(hits) / 9 * 100 == pytest.approx(final, abs=0.006)
    mean = sum(c['accuracy'] for c in classes) / 3
    # fewer than 20 training images each: only the few-shot group has classes
    assert lines[1:4] == [
        f'mean per-class accuracy: {mean:.2f}',
        f'many / medium / few-shot accuracy: - / - / {mean:.2f}',
        'thirds by training count (many / medium / few): '
        + ' / '.join(f'{c["accuracy"]:.2f}' for c in classes),  # one class a third
    ]
    assert report['few_acc'] == pytest.approx(mean) and report['many_acc'] is None
    return report


@pytest.mark.slow
def test_main_ce_long_tail_prints_and_writes_what_each_class_gets(folder, tmp_path):
    args = args_of(folder, model='resnet18', imbalance_ratio=4, epochs=1)
    result = call('main_ce', args, tmp_path)
    assert result.code == 0, result.err
    save = save_folder('main_ce', args, tmp_path)
    assert save.name.endswith('_imb4')
    check_report(result, save, [8, 4, 2])  # 8 * 4 ** (-i / 2)
    tb = tb_folder('main_ce', args, tmp_path)
    assert [step for step, _ in scalars(tb, 'mean_class_acc')] == [1]
    assert scalars(tb, 'few_acc') == scalars(tb, 'mean_class_acc')  # every class is few-shot
    with pytest.raises(KeyError):
        scalars(tb, 'many_acc')  # an empty group is not logged

    # another ratio cannot resume this run
    other = args_of(folder, model='resnet18', imbalance_ratio=2, epochs=1)
    result = call('main_ce', other + ['--resume', save / 'last.pth'], tmp_path)
    assert_one_line_error(result, '--imbalance_ratio 2.0 differs from the run\'s 4.0')


@pytest.mark.slow
def test_main_linear_takes_the_checkpoint_tail_and_its_seed(folder, tmp_path):
    pretrain = args_of(folder, model='resnet18', imbalance_ratio=4, epochs=1, seed=5)
    assert call('main_supcon', pretrain, tmp_path).code == 0
    ckpt = save_folder('main_supcon', pretrain, tmp_path) / 'last.pth'
    args = args_of(folder, ckpt=ckpt, seed=0, aug='none')  # another seed, no --imbalance_ratio
    opt = main_linear.parse_option([str(a) for a in args])
    assert (opt.imbalance_ratio, opt.imbalance_seed) == (4.0, 5)
    rt = runtime.Runtime(device=torch.device('cpu'), seed=0)
    train_loader, *_ = datasets.classification_loaders(opt, rt)
    pretrained = datasets.build_dataset(
        'path', 'train', None, data_folder=folder / 'train', imbalance_ratio=4, imbalance_seed=5
    )
    assert train_loader.dataset.dataset.indices == pretrained.indices  # the same images
    result = call('main_linear', args, tmp_path)
    assert result.code == 0, result.err
    assert 'imb4' in save_folder('main_linear', args, tmp_path).name
    check_report(result, save_folder('main_linear', args, tmp_path), [8, 4, 2])


@pytest.mark.parametrize('ratio', ['0.5', 'nan', 'inf'])
def test_a_ratio_below_one_or_not_finite_is_refused_in_one_line(folder, tmp_path, ratio):
    result = call('main_ce', args_of(folder, model='resnet18', imbalance_ratio=ratio), tmp_path)
    assert_one_line_error(result, '--imbalance_ratio must be a finite number')
