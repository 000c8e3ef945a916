"""--labelled_fraction / --labelled_only / --linear_labels: which images keep their labels.

The choice is checked against its definition written out here (per class, max(1, round(F n))
images, halves rounded up), for seeding and nesting, through a --val_split, in main_supcon.py's
batches and in main_linear.py's training set (the same images); runs are killed and resumed
as tests/test_resume.py does it, with a fraction below 1.
"""

import math

import numpy as np
import pytest
import torch
from helpers import folder_args
from inprocess import assert_one_line_error, call, save_folder
from test_resume import Runs, max_abs_diff

import main_linear
import main_supcon
from supcon.data import datasets, labelling
from supcon.system import runtime
from supcon.system.checkpoint import load_checkpoint

FRACTION = 0.5


def expected_count(fraction, n):
    return max(1, math.floor(fraction * n + 0.5))


def digits_targets():
    return np.asarray(datasets.build_dataset('digits', 'train', None).targets)


# --------------------------------------------------------------------------- the choice


@pytest.mark.parametrize('fraction', [0.01, 0.1, 0.3, 1.0])
def test_each_class_keeps_max_1_round_F_n_of_its_images(fraction):
    targets = digits_targets()
    keep = labelling.stratified_fraction(targets, fraction, seed=3)
    for label in range(10):
        members = targets == label
        assert keep[members].sum() == expected_count(fraction, members.sum()), label
    assert keep.sum() == sum(expected_count(fraction, (targets == c).sum()) for c in range(10))


def test_the_choice_is_seeded_nested_and_ignores_global_rngs():
    targets = digits_targets()
    a = labelling.stratified_fraction(targets, 0.1, seed=5)
    np.random.seed(123)
    torch.manual_seed(123)
    assert np.array_equal(a, labelling.stratified_fraction(targets, 0.1, seed=5))
    other = labelling.stratified_fraction(targets, 0.1, seed=6)
    assert a.sum() == other.sum() and not np.array_equal(a, other)
    larger = labelling.stratified_fraction(targets, 0.3, seed=5)
    assert not (a & ~larger).any()  # F = 0.1's images are among F = 0.3's


def test_unlabelled_images_are_never_chosen_and_a_class_of_one_keeps_it():
    targets = np.array([-1, -1, 0, 0, 0, 0, 1, -1, 2, 2])
    keep = labelling.stratified_fraction(targets, 0.25, seed=0)
    assert not keep[targets == -1].any()
    assert [keep[targets == c].sum() for c in (0, 1, 2)] == [1, 1, 1]


def test_through_a_val_split_an_image_keeps_the_choice_of_the_whole_training_set():
    full = datasets.build_dataset('digits', 'train', None)
    part = datasets.build_dataset('digits', 'train', None, val_split=0.2)
    whole = labelling.labelled_mask(full, 0.1, seed=2)
    assert np.array_equal(labelling.labelled_mask(part, 0.1, seed=2), whole[part.indices])


# --------------------------------------------------------------------------- the scripts


def pretrain_args(images, **changes):
    return folder_args(images, **{'seed': 7, 'model': 'resnet18', **changes})


def linear_args(images, ckpt, *extra):
    args = pretrain_args(images, model=None, ckpt=ckpt)
    return args + [str(a) for a in extra]


def training_set(script, args):
    """The training data set the script's set_loader builds (under its SeededDataset)."""
    opt = script.parse_option([str(a) for a in args])
    rt = runtime.setup_runtime(opt)
    loader = script.set_loader(opt, rt)[0]
    return opt, loader.dataset.dataset


def paths_of(dataset, labelled_only=True):
    """The image files of a data set's items (of those with a label)."""
    base, positions = dataset, np.arange(len(dataset))
    while hasattr(base, 'indices') and hasattr(base, 'dataset'):
        positions = np.asarray(base.indices)[positions]
        base = base.dataset
    keep = np.asarray(dataset.targets) != -1 if labelled_only else np.ones(len(dataset), bool)
    return sorted(base.samples[i][0] for i in positions[keep])


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, images):
    """A SupCon checkpoint of --labelled_fraction 0.5 and a SimCLR one of the same seed."""
    cwd = tmp_path_factory.mktemp('pretrain')
    ckpts = {}
    for method, extra in (('SupCon', {'labelled_fraction': FRACTION}), ('SimCLR', {})):
        args = pretrain_args(images, method=method, **extra)
        result = call('main_supcon', args, cwd)
        assert result.code == 0, result.err
        ckpts[method] = (save_folder('main_supcon', args, cwd) / 'last.pth', result.out)
    return ckpts


def test_main_supcon_batches_carry_minus_1_for_the_unlabelled_images(images):
    args = pretrain_args(images, labelled_fraction=FRACTION)
    opt, dataset = training_set(main_supcon, args)
    assert opt.model_name.endswith('_lab0.5')
    targets = np.asarray(dataset.targets)
    true = np.asarray(dataset.dataset.targets)
    assert len(targets) == 16 and [(targets == c).sum() for c in (-1, 0, 1)] == [8, 4, 4]
    assert np.array_equal(targets[targets != -1], true[targets != -1])
    rt = runtime.setup_runtime(opt)
    loader, sampler, _ = main_supcon.set_loader(opt, rt)
    sampler.set_epoch(1)
    seen = torch.cat([labels for _, labels in loader])
    order = torch.as_tensor(sampler.rank_indices())
    assert torch.equal(seen, torch.as_tensor(targets)[order])  # what the loss gets


def test_labelled_only_trains_on_the_labelled_images_alone(images):
    opt, dataset = training_set(
        main_supcon, pretrain_args(images, labelled_fraction=FRACTION, labelled_only=True)
    )
    assert opt.model_name.endswith('_lab0.5_labonly')
    _, partial = training_set(main_supcon, pretrain_args(images, labelled_fraction=FRACTION))
    assert len(dataset) == 8 and -1 not in dataset.targets
    assert paths_of(dataset) == paths_of(partial)


def test_main_linear_trains_on_the_images_pretraining_kept_labelled(images, pretrained):
    ckpt, out = pretrained['SupCon']
    assert 'note: 8 of the 16 training images keep their labels' in out
    _, pretraining = training_set(main_supcon, pretrain_args(images, labelled_fraction=FRACTION))
    opt, linear = training_set(main_linear, linear_args(images, ckpt))
    assert (opt.labelled_fraction, opt.labelled_seed, opt.linear_labels) == (0.5, 7, 'labelled')
    assert opt.model_name.endswith('_lab0.5')
    assert len(linear) == 8 and paths_of(linear) == paths_of(pretraining)
    # the linear run's own seed does not move the subset: the checkpoint's chose it
    _, reseeded = training_set(main_linear, linear_args(images, ckpt, '--seed', 99))
    assert paths_of(reseeded) == paths_of(pretraining)

    opt, every = training_set(main_linear, linear_args(images, ckpt, '--linear_labels', 'all'))
    assert len(every) == 16 and opt.linear_labels == 'all' and '_lab' not in opt.model_name

    # a SimCLR encoder of the same seed evaluated on the same labelled images
    simclr, _ = pretrained['SimCLR']
    opt, same = training_set(main_linear, linear_args(images, simclr, '--labelled_fraction', 0.5))
    assert opt.labelled_seed == 7 and paths_of(same) == paths_of(pretraining)
    _, full = training_set(main_linear, linear_args(images, simclr))
    assert len(full) == 16


def test_the_checkpoint_records_the_fraction(pretrained):
    ckpt = load_checkpoint(str(pretrained['SupCon'][0]))
    assert ckpt['opt']['labelled_fraction'] == 0.5 and ckpt['opt']['seed'] == 7
    assert ckpt['opt']['labelled_only'] is False


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    'changes, fragment',
    [
        ({'labelled_fraction': 0}, '--labelled_fraction must be a fraction in (0, 1]'),
        ({'labelled_fraction': 1.5}, '--labelled_fraction must be a fraction in (0, 1]'),
        ({'labelled_fraction': 'nan'}, 'finite'),
        ({'method': 'SimCLR', 'labelled_fraction': 0.5}, 'SimCLR reads no labels'),
        ({'method': 'SimCLR', 'labelled_only': True}, 'SimCLR reads no labels'),
        ({'labelled_only': True}, 'every training image is labelled'),
    ],
)
def test_main_supcon_refuses_in_one_line(images, tmp_path, changes, fragment):
    result = call('main_supcon', pretrain_args(images, **changes), tmp_path)
    assert_one_line_error(result, fragment)


def test_main_linear_refuses_in_one_line(images, pretrained, tmp_path):
    ckpt, _ = pretrained['SupCon']
    result = call('main_linear', linear_args(images, ckpt, '--labelled_fraction', 0.3), tmp_path)
    assert_one_line_error(result, 'differs from the 0.5 the checkpoint was pretrained with')
    simclr, _ = pretrained['SimCLR']
    args = linear_args(images, simclr, '--labelled_fraction', 0.3, '--linear_labels', 'all')
    assert_one_line_error(call('main_linear', args, tmp_path), 'drop one of them')


def test_resuming_with_another_fraction_is_refused(images, tmp_path):
    args = pretrain_args(images, labelled_fraction=FRACTION)
    assert call('main_supcon', args, tmp_path).code == 0
    folder = save_folder('main_supcon', args, tmp_path)
    other = pretrain_args(images, labelled_fraction=0.25, epochs=2)
    result = call('main_supcon', other + ['--resume', str(folder / 'last.pth')], tmp_path)
    assert_one_line_error(result, '--labelled_fraction 0.25 differs from the run\'s 0.5')


# --------------------------------------------------------------------------- kill and resume


class PartialRuns(Runs):
    """test_resume's runs, pretrained with --labelled_fraction 0.5 (main_linear follows it)."""

    def args(self, script, **changes):
        if script.partition('+')[0] == 'main_supcon':
            changes = dict({'labelled_fraction': FRACTION}, **changes)
        return super().args(script, **changes)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, images):
    return PartialRuns(tmp_path_factory.mktemp('runs'), images)


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_supcon', 'main_linear'])
def test_kill_and_resume_auto_with_partial_labels_equals_the_uninterrupted_run(runs, script):
    _, reference = runs.reference(script)
    cwd, result = runs.killed_and_resumed(script)
    assert 'continuing at epoch ' in result.out
    if script == 'main_linear':
        assert 'note: the classifier trains on the 8 labelled of the 16 training images' in (
            result.out
        )
    assert '_lab0.5' in str(reference)
    resumed = save_folder(script, runs.args(script), cwd) / 'last.pth'
    assert max_abs_diff(reference, resumed) <= 1e-6
