"""End to end, the training options the reference does not have: --moco, --gpu_aug, timm
backbones, --optimizer lars, --aug (and main_linear's --aug none), --dataset imagenet, --val_split
(tiny models and images)."""

import numpy as np
import pytest
import torch
from helpers import folder_args
from inprocess import call
from PIL import Image

import main_ce
import main_linear
import main_supcon
from networks.from_checkpoint import encoder_from_checkpoint
from supcon.data import datasets
from supcon.errors import UserError
from supcon.system import runtime
from supcon.system.checkpoint import load_checkpoint

DIGITS = [
    '--dataset',
    'digits',
    '--model',
    'resnet18',
    '--size',
    '8',
    '--num_workers',
    '0',
    '--device',
    'cpu',
    '--seed',
    '0',
    '--print_freq',
    '1000',
]


def write_folder(root, classes=('a', 'b'), count=8, size=32, ext='png'):
    rng = np.random.default_rng(len(str(root)))
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.{ext}')
    return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """--dataset path: two classes, 8 training and 4 test images each, 32x32."""
    root = tmp_path_factory.mktemp('folder')
    write_folder(root / 'train')
    write_folder(root / 'test', count=4)
    return root


def path_args(root, **changes):
    options = dict(size=32, batch_size=8, seed=0, print_freq=1000, learning_rate=0.05)
    return folder_args(root, **dict(options, **changes))


def run_ok(script, args, cwd):
    result = call(script, args, cwd)
    assert result.code == 0, result.out[-2000:] + result.err
    return result


def last_checkpoint(module, args, cwd):
    return cwd / module.parse_option(args).save_folder / 'last.pth'


# --------------------------------------------------------------------------- --moco


@pytest.mark.slow
def test_moco_saves_key_encoder_and_queue_and_linear_reads_either(folder, tmp_path):
    args = path_args(folder, model='resnet18', size=16, epochs=2, moco=True, moco_k=20, moco_m=0.5)
    run_ok('main_supcon', args, tmp_path)
    path = last_checkpoint(main_supcon, args, tmp_path)
    assert path.parent.name.endswith('_moco_k20_m0.5')
    ckpt = load_checkpoint(str(path))
    moco = ckpt['moco']
    # 4 steps of 2 views x 8 keys: the queue is full and has wrapped
    assert int(moco['queue.count']) == 20
    assert int(moco['queue.ptr']) == (4 * 16) % 20
    rows = moco['queue.features']
    assert torch.allclose(rows.norm(dim=1), torch.ones(20), atol=1e-3)
    assert set(moco['queue.labels'].tolist()) == {0, 1}
    # the key encoder is a moving average: close to, but not equal to, the trained encoder
    query, key = (
        encoder_from_checkpoint(ckpt, str(path))[0],
        encoder_from_checkpoint(ckpt, str(path), key_encoder=True)[0],
    )
    diffs = [
        (a - b).abs().max().item()
        for a, b in zip(query.state_dict().values(), key.state_dict().values())
        if a.is_floating_point()
    ]
    assert max(diffs) > 0
    for flag in (False, True):
        result = run_ok(
            'main_linear', path_args(folder, ckpt=path, size=16, key_encoder=flag), tmp_path
        )
        assert 'final accuracy:' in result.out


def test_moco_flags_without_moco_are_refused():
    with pytest.raises(Exception, match='only act with --moco'):
        main_supcon.parse_option(['--moco_k', '64'])


# --------------------------------------------------------------------------- --gpu_aug


@pytest.mark.slow
def test_gpu_aug_runs_are_repeatable_with_a_seed(folder, tmp_path):
    args = path_args(folder, model='resnet18', size=16, gpu_aug=True)
    weights = []
    for name in ('a', 'b'):
        (tmp_path / name).mkdir()
        run_ok('main_supcon', args, tmp_path / name)
        weights.append(
            load_checkpoint(str(last_checkpoint(main_supcon, args, tmp_path / name)))['model']
        )
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    result = run_ok('main_ce', path_args(folder, model='resnet18', size=16, gpu_aug=True), tmp_path)
    assert 'final accuracy:' in result.out


@pytest.mark.slow
def test_gpu_aug_on_digits(tmp_path):
    """The in-memory 32x32 data sets go to the device as they are."""
    run_ok(
        'main_supcon',
        DIGITS + ['--batch_size', '256', '--epochs', '1', '--gpu_aug', '--val_split', '0.8'],
        tmp_path,
    )


def test_gpu_aug_refuses_other_policies():
    with pytest.raises(Exception, match='--gpu_aug implements the simclr augmentation only'):
        main_ce.parse_option(['--gpu_aug', '--aug', 'randaugment'])


# --------------------------------------------------------------------------- timm backbones


@pytest.mark.slow
@pytest.mark.parametrize(
    'model, extra',
    [
        ('vit_tiny_patch16_224', {'patch_size': 8}),
        ('convnext_atto', {}),
    ],
)
def test_timm_backbone_pretrains_then_linear_and_tsne(folder, tmp_path, model, extra):
    args = path_args(folder, model=model, **extra)
    run_ok('main_supcon', args, tmp_path)
    path = last_checkpoint(main_supcon, args, tmp_path)
    ckpt = load_checkpoint(str(path))
    assert ckpt['opt']['model'] == model
    result = run_ok('main_linear', path_args(folder, ckpt=path, batch_size=16), tmp_path)
    assert 'best accuracy:' in result.out
    classifier = load_checkpoint(
        str(last_checkpoint(main_linear, path_args(folder, ckpt=path, batch_size=16), tmp_path))
    )['model']
    assert (
        classifier['fc.weight'].shape[1] == encoder_from_checkpoint(ckpt, str(path))[0].feature_dim
    )
    run_ok(
        'main_tsne',
        [
            '--dataset',
            'path',
            '--test_folder',
            str(folder / 'test'),
            '--mean',
            '(0.5,0.5,0.5)',
            '--std',
            '(0.25,0.25,0.25)',
            '--size',
            '32',
            '--ckpt',
            str(path),
            '--num_workers',
            '0',
            '--device',
            'cpu',
            '--out',
            str(tmp_path / 'tsne.png'),
        ],
        tmp_path,
    )
    assert (tmp_path / 'tsne.png').exists()


@pytest.mark.slow
def test_timm_backbone_in_cross_entropy_with_amp_and_resume(folder, tmp_path):
    run_ok('main_ce', path_args(folder, model='convnext_atto', amp=True), tmp_path)
    result = run_ok(
        'main_ce',
        path_args(folder, model='convnext_atto', amp=True, epochs=2, resume='auto'),
        tmp_path,
    )
    assert 'continuing at epoch 2' in result.out


def test_unknown_model_is_one_line_with_a_hint(tmp_path):
    result = call(
        'main_supcon', DIGITS[:2] + ['--model', 'vit_tiny_patch16', '--epochs', '1'], tmp_path
    )
    assert result.code == 2 and result.err.count('\n') == 1
    assert 'vit_tiny_patch16_224' in result.err and 'timm.list_models' in result.err


# --------------------------------------------------------------------------- LARS, --aug


def test_lars_pretraining_names_its_run_and_saves_two_groups(folder, tmp_path):
    args = path_args(folder, model='resnet18', size=16, optimizer='lars')
    run_ok('main_supcon', args, tmp_path)
    path = last_checkpoint(main_supcon, args, tmp_path)
    assert path.parent.name.endswith('_lars')
    groups = load_checkpoint(str(path))['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [1e-4, 0.0]


@pytest.mark.parametrize(
    'script, aug', [('main_supcon', 'stacked_randaugment'), ('main_ce', 'autoaugment')]
)
def test_aug_policies_train(folder, tmp_path, script, aug):
    args = path_args(folder, model='resnet18', size=16, aug=aug)
    run_ok(script, args, tmp_path)
    module = main_supcon if script == 'main_supcon' else main_ce
    assert last_checkpoint(module, args, tmp_path).parent.name.endswith(f'_aug_{aug}')


@pytest.mark.slow
def test_linear_evaluation_without_augmentation(digits_checkpoints, tmp_path):
    """main_linear.py --aug none: the classifier trains on the test transform's tensors."""
    ckpt = digits_checkpoints['encoder']  # a main_supcon.py checkpoint of digits at --size 8
    linear = DIGITS + ['--batch_size', '256', '--epochs', '1', '--ckpt', str(ckpt)]
    args = linear + ['--aug', 'none']
    opt = main_linear.parse_option(args)
    rt = runtime.setup_runtime(opt)  # one process, CPU: nothing to clean up
    train_loader, _, val_loader, _ = main_linear.set_loader(opt, rt)
    train_set, test_set = train_loader.dataset.dataset, val_loader.dataset.dataset
    views = [train_loader.dataset[(seed, 0)][0] for seed in range(3)]  # three sample seeds
    assert all(torch.equal(view, views[0]) for view in views)
    assert torch.equal(views[0], test_set.transform(Image.fromarray(train_set.images[0])))
    # the same check sees the reference's crop-and-flip: one image, three different tensors
    default = main_linear.parse_option(linear)
    cropped = main_linear.set_loader(default, runtime.setup_runtime(default))[0].dataset
    crops = [cropped[(seed, 0)][0] for seed in range(3)]
    assert not all(torch.equal(crop, crops[0]) for crop in crops)
    result = run_ok('main_linear', args, tmp_path)
    assert 'final accuracy:' in result.out
    assert (tmp_path / opt.save_folder / 'last.pth').exists()
    assert opt.save_folder.endswith('_aug_none')
    assert default.aug == 'simclr' and not default.save_folder.endswith('_aug_none')
    assert main_ce.parse_option(DIGITS + ['--aug', 'none']).aug == 'none'
    with pytest.raises(UserError, match="invalid choice: 'none'"):  # not for SupCon/SimCLR
        main_supcon.parse_option(DIGITS + ['--aug', 'none'])


# --------------------------------------------------------------------------- --dataset imagenet


@pytest.mark.slow
def test_imagenet_layout_in_every_script(tmp_path):
    root = tmp_path / 'imagenet'
    write_folder(root / 'train', classes=('n01', 'n02'), count=6, size=40, ext='jpg')
    write_folder(root / 'val', classes=('n01', 'n02'), count=2, size=40, ext='jpg')
    common = [
        '--dataset',
        'imagenet',
        '--data_folder',
        str(root),
        '--model',
        'resnet18',
        '--size',
        '32',
        '--batch_size',
        '4',
        '--epochs',
        '1',
        '--num_workers',
        '0',
        '--device',
        'cpu',
        '--seed',
        '0',
    ]
    opt = main_supcon.parse_option(common[:4])
    assert (opt.size, opt.stem) == (224, 'imagenet')  # the ImageNet defaults
    assert datasets.MEAN_STD['imagenet'] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    run_ok('main_supcon', common, tmp_path)
    path = last_checkpoint(main_supcon, common, tmp_path)
    assert path.parent.name.endswith('_stem_imagenet')
    run_ok('main_linear', common[:4] + common[6:] + ['--ckpt', str(path)], tmp_path)
    run_ok('main_ce', common, tmp_path)
    run_ok(
        'main_tsne',
        common[:4] + ['--size', '32', '--ckpt', str(path), '--num_workers', '0', '--device', 'cpu'],
        tmp_path,
    )


def test_imagenet_needs_its_folder():
    with pytest.raises(Exception, match='--dataset imagenet needs --data_folder'):
        main_ce.parse_option(['--dataset', 'imagenet'])


# --------------------------------------------------------------------------- --val_split


def test_val_split_is_stratified_disjoint_and_fixed():
    train = datasets.build_dataset('digits', 'train', None, val_split=0.2)
    held = datasets.build_dataset('digits', 'test', None, val_split=0.2)
    full = datasets.build_dataset('digits', 'train', None)
    assert len(train) + len(held) == len(full) == 1437
    assert not set(train.indices) & set(held.indices)
    counts = np.bincount(held.targets, minlength=10)
    assert counts.min() >= 0.2 * np.bincount(full.targets).min() - 1
    assert held.indices == datasets.build_dataset('digits', 'test', None, val_split=0.2).indices
    image, label = held[0]
    reference_image, reference_label = full[held.indices[0]]
    assert label == reference_label and np.array_equal(
        np.asarray(image), np.asarray(reference_image)
    )


@pytest.mark.slow
def test_val_split_names_runs_and_evaluates_on_held_out_training_images(tmp_path):
    args = DIGITS + ['--batch_size', '256', '--epochs', '1', '--val_split', '0.75']
    opt = main_ce.parse_option(args)
    assert opt.model_name.endswith('_val_0.75')
    result = run_ok('main_ce', args, tmp_path)
    assert 'final accuracy:' in result.out
    assert main_ce.parse_option(DIGITS).val_split == 0.0  # off by default
