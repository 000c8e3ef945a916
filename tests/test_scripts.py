"""The three scripts end to end on tiny data, run as ``python main_*.py`` in a temporary
directory: output names as the reference composes them, checkpoint contents, TensorBoard
scalars, and the commands of the seed README with fewer epochs and smaller images. The seed
README's pretraining command starts a fresh interpreter; the other runs call the script's main in
this process (``inprocess.run``), which gives the same exit code and output."""

import argparse
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FAST,
    SEED_MEAN,
    SEED_STD,
    describe,
    read_scalars,
    run_script,
    save_reference_checkpoint,
    saved_files,
    write_cifar10,
    write_image_folder,
)
from inprocess import run as run_inprocess

import main_ce
import main_linear
import main_supcon
import util
from networks.resnet_big import SupCEResNet, SupConResNet
from supcon.data import augment, datasets

ANIMALS = [
    'butterfly',
    'cat',
    'chicken',
    'cow',
    'dog',
    'elephant',
    'horse',
    'sheep',
    'spider',
    'squirrel',
]
SEED_RUN = 'SupCon_path_resnet18_lr_0.5_decay_0.0001_bsz_26_temp_0.1_trial_0_cosine'
SEED_LINEAR = 'path_resnet18_lr_1.0_decay_0_bsz_26'
PLAIN = (bool, int, float, str, type(None), list)


def schedule(**opt):
    return argparse.Namespace(**opt)


def assert_ok(result):
    assert result.returncode == 0, describe(result)
    assert 'Traceback' not in result.stderr, describe(result)


def assert_lr_logged(scalars, opt, epochs):
    assert [step for step, _ in scalars['learning_rate']] == list(range(1, epochs + 1))
    for epoch, value in scalars['learning_rate']:
        assert value == pytest.approx(util.learning_rate_at(opt, epoch), rel=1e-6), epoch


def best_accuracy(stdout):
    found = re.findall(r'best accuracy: (\S+)', stdout)
    assert len(found) == 1, stdout
    value = float(found[0])
    assert 0 <= value <= 100
    return value


def load_plain(path):
    """A checkpoint as a user's tool reads it: ``opt`` an argparse.Namespace as the reference
    writes it (the one class allowed besides tensors), holding plain values only; returned
    with ``opt`` as a dict."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, weights_only=True)
    assert isinstance(ckpt['opt'], argparse.Namespace)
    assert ckpt['opt'].model == vars(ckpt['opt'])['model']  # ckpt['opt'].model works
    ckpt['opt'] = vars(ckpt['opt'])
    assert all(isinstance(v, PLAIN) for v in ckpt['opt'].values()), ckpt['opt']
    assert not [k for k in ckpt['model'] if 'module.' in k or '_orig_mod.' in k]
    return ckpt


def split_images(folder, size=8):
    """The test split as the scripts see it (no augmentation), as one batch."""
    mean, std = datasets.resolve_mean_std('path', SEED_MEAN, SEED_STD)
    dataset = datasets.build_dataset(
        'path',
        'test',
        augment.test_transform(size, mean, std),
        data_folder=folder,
        test_folder=folder,
    )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images, torch.tensor(dataset.targets)


def loss_and_accuracy(model, folder):
    images, labels = split_images(folder)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    return (
        F.cross_entropy(logits, labels).item(),
        100.0 * (logits.argmax(1) == labels).float().mean().item(),
    )


def linear_probe(encoder_state, classifier_state):
    """Encoder from a pretraining checkpoint plus main_linear.py's classifier."""
    net = SupConResNet(name='resnet18')
    net.encoder.load_state_dict(
        {k[len('encoder.') :]: v for k, v in encoder_state.items() if k.startswith('encoder.')}
    )
    fc = torch.nn.Linear(512, classifier_state['fc.weight'].shape[0])
    fc.load_state_dict({k[len('fc.') :]: v for k, v in classifier_state.items()})
    return torch.nn.Sequential(net.encoder, fc)


def assert_matches_last_validation(scalars, loss, acc):
    assert scalars['val_loss'][-1][1] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert scalars['val_acc'][-1][1] == pytest.approx(acc, abs=1e-3)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope='module')
def animals(tmp_path_factory):
    """The seed README's layout: ./datasets/animals10_300x300/{train,test}/<class>/."""
    root = tmp_path_factory.mktemp('animals')
    folder = root / 'datasets' / 'animals10_300x300'
    write_image_folder(folder / 'train', dict.fromkeys(ANIMALS, 3), seed=1)
    write_image_folder(folder / 'test', dict.fromkeys(ANIMALS, 1), seed=2)
    return root


@pytest.fixture(scope='module')
def tiny3(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny3')
    write_image_folder(root / 'train', {'a': 4, 'b': 4, 'c': 4}, seed=3)
    write_image_folder(root / 'test', {'a': 2, 'b': 2, 'c': 2}, seed=4)
    return root


def tiny3_args(root, test=True):
    args = [
        '--dataset',
        'path',
        '--data_folder',
        root / 'train',
        '--mean',
        SEED_MEAN,
        '--std',
        SEED_STD,
        '--size',
        '8',
    ]
    return args + (['--test_folder', root / 'test'] if test else []) + FAST


# --------------------------------------------------------------------------- seed README


@pytest.fixture(scope='module')
def seed_pretrain(animals):
    """The README's animals10 pretraining command, 2 epochs at --size 8 instead of 300."""
    result = run_script(
        'main_supcon',
        [
            '--dataset',
            'path',
            '--data_folder',
            './datasets/animals10_300x300/train/',
            '--learning_rate',
            '0.5',
            '--temp',
            '0.1',
            '--cosine',
            '--model',
            'resnet18',
            '--epochs',
            '2',
            '--save_freq',
            '2',
            '--size',
            '8',
            '--batch_size',
            '26',
            '--method',
            'SupCon',
            '--mean',
            SEED_MEAN,
            '--std',
            SEED_STD,
            '--print_freq',
            '1',
        ]
        + FAST,
        cwd=animals,
    )
    return animals, result


@pytest.fixture(scope='module')
def seed_linear(seed_pretrain):
    """The README's classifier command on the checkpoint of the pretraining above."""
    root, pretrain = seed_pretrain
    assert_ok(pretrain)
    result = run_inprocess(
        'main_linear',
        [
            '--batch_size',
            '26',
            '--batch_size_val',
            '26',
            '--epochs',
            '2',
            '--save_freq',
            '2',
            '--learning_rate',
            '1',
            '--model',
            'resnet18',
            '--dataset',
            'path',
            '--mean',
            SEED_MEAN,
            '--std',
            SEED_STD,
            '--data_folder',
            './datasets/animals10_300x300/train/',
            '--test_folder',
            './datasets/animals10_300x300/test/',
            '--size',
            '8',
            '--num_classes',
            '10',
            '--ckpt',
            f'./save/SupCon/path_models/{SEED_RUN}/ckpt_epoch_2.pth',
            '--num_workers_val',
            '4',
        ]
        + FAST,
        cwd=root,
    )  # the fork's flag, on its command
    return root, result


@pytest.mark.slow
def test_seed_pretrain_command_writes_the_reference_names(seed_pretrain):
    root, result = seed_pretrain
    assert_ok(result)
    run = f'save/SupCon/path_models/{SEED_RUN}'
    # save_freq 2: a numbered checkpoint for epoch 2 only
    assert saved_files(root) == [
        f'{run}/checkpoint.pth',
        f'{run}/ckpt_epoch_2.pth',
        f'{run}/last.pth',
    ]
    assert list((root / 'save/SupCon/path_tensorboard' / SEED_RUN).glob('events.out.tfevents.*'))
    assert 'epoch 1, total time' in result.stdout and 'epoch 2, total time' in result.stdout
    assert f'saved ./save/SupCon/path_models/{SEED_RUN}/last.pth' in result.stdout
    assert re.search(r'Train: \[1\]\[2/2\]', result.stdout)  # 30 images, batches of 26


@pytest.mark.slow
def test_supcon_checkpoint_contents(seed_pretrain):
    root, result = seed_pretrain
    assert_ok(result)
    run = root / 'save/SupCon/path_models' / SEED_RUN
    last = load_plain(run / 'last.pth')
    assert {'model', 'optimizer', 'epoch', 'opt'} <= set(last) and last['epoch'] == 2
    assert set(last['model']) == set(SupConResNet(name='resnet18').state_dict())
    opt = last['opt']
    assert (opt['model'], opt['method'], opt['batch_size'], opt['dataset']) == (
        'resnet18',
        'SupCon',
        26,
        'path',
    )
    assert opt['lr_decay_epochs'] == [700, 800, 900] and opt['model_name'] == SEED_RUN
    assert last['optimizer']['param_groups'][0]['lr'] == pytest.approx(0.5 * 0.1**3)
    # after the final epoch the numbered, the rolling and the last checkpoint agree
    for name in ('ckpt_epoch_2.pth', 'checkpoint.pth'):
        other = load_plain(run / name)
        assert other['epoch'] == 2
        assert all(torch.equal(other['model'][k], v) for k, v in last['model'].items())


@pytest.mark.slow
def test_supcon_tensorboard_scalars(seed_pretrain):
    root, result = seed_pretrain
    assert_ok(result)
    scalars = read_scalars(root / 'save/SupCon/path_tensorboard' / SEED_RUN)
    assert {'loss', 'learning_rate'} <= set(scalars)
    assert [step for step, _ in scalars['loss']] == [1, 2]
    assert all(0 < value < 100 for _, value in scalars['loss'])
    assert_lr_logged(
        scalars,
        schedule(
            learning_rate=0.5,
            cosine=True,
            lr_decay_rate=0.1,
            epochs=2,
            lr_decay_epochs=[700, 800, 900],
        ),
        2,
    )


@pytest.mark.slow
def test_seed_classifier_command(seed_linear):
    root, result = seed_linear
    assert_ok(result)
    rel = f'{SEED_RUN}/ckpt_epoch_2/{SEED_LINEAR}'
    folder = f'save/SupCon/path_linear_models/{rel}'
    assert [f for f in saved_files(root) if 'linear' in f] == [
        f'{folder}/checkpoint.pth',
        f'{folder}/ckpt_epoch_2.pth',
        f'{folder}/last.pth',
    ]
    scalars = read_scalars(root / 'save/SupCon/path_linear_tensorboard' / rel)
    assert {'train_loss', 'train_acc', 'val_loss', 'val_acc', 'learning_rate'} <= set(scalars)
    assert all([s for s, _ in scalars[tag]] == [1, 2] for tag in scalars)
    assert_lr_logged(
        scalars,
        schedule(
            learning_rate=1.0,
            cosine=False,
            lr_decay_rate=0.2,
            epochs=2,
            lr_decay_epochs=[60, 75, 90],
        ),
        2,
    )
    assert best_accuracy(result.stdout) == pytest.approx(
        max(v for _, v in scalars['val_acc']), abs=0.006
    )
    # the reference's lines: each test batch's value with the running average in brackets,
    # then ' * Acc@1 X' and (10 classes) ' * Acc@5 X' on lines of their own
    assert re.search(
        r'^Test: \[0/1\]\tTime [\d.]+ \([\d.]+\)\tLoss [\d.]+ \([\d.]+\)\t'
        r'Acc@1 [\d.]+ \([\d.]+\)$',
        result.stdout,
        re.M,
    ), result.stdout
    assert re.search(r'^ \* Acc@1 \d+\.\d{3}$', result.stdout, re.M)
    assert re.search(r'^ \* Acc@5 \d+\.\d{3}$', result.stdout, re.M)
    assert result.stdout.count('==> Saving...') == 3  # epochs 1 and 2, last.pth
    final = re.search(r'^final accuracy: ([\d.]+)$', result.stdout, re.M)
    assert final and float(final.group(1)) == pytest.approx(scalars['val_acc'][-1][1], abs=0.006)
    assert 'Train epoch 1, total time' in result.stdout
    assert 'Train epoch 2, total time' in result.stdout

    classifier = load_plain(root / folder / 'last.pth')
    assert set(classifier['model']) == {'fc.weight', 'fc.bias'}
    assert classifier['model']['fc.weight'].shape == (10, 512) and classifier['epoch'] == 2
    # the frozen encoder: the pretraining checkpoint's weights give the logged accuracy
    encoder = load_plain(root / 'save/SupCon/path_models' / SEED_RUN / 'ckpt_epoch_2.pth')
    probe = linear_probe(encoder['model'], classifier['model'])
    assert_matches_last_validation(
        scalars, *loss_and_accuracy(probe, root / 'datasets/animals10_300x300/test')
    )


# --------------------------------------------------------------------------- main_linear


@pytest.mark.slow
def test_linear_on_last_checkpoint_with_three_classes(seed_pretrain, tiny3, tmp_path):
    root, pretrain = seed_pretrain
    assert_ok(pretrain)
    ckpt = root / 'save/SupCon/path_models' / SEED_RUN / 'last.pth'
    # no --model: the checkpoint says resnet18
    result = run_inprocess(
        'main_linear',
        tiny3_args(tiny3) + ['--batch_size', '4', '--epochs', '1', '--ckpt', ckpt],
        cwd=tmp_path,
    )
    assert_ok(result)
    folder = f'save/SupCon/path_linear_models/{SEED_RUN}/last/path_resnet18_lr_0.1_decay_0_bsz_4'
    assert saved_files(tmp_path) == [f'{folder}/checkpoint.pth', f'{folder}/last.pth']
    assert list(
        (
            tmp_path
            / 'save/SupCon/path_linear_tensorboard'
            / SEED_RUN
            / 'last'
            / 'path_resnet18_lr_0.1_decay_0_bsz_4'
        ).glob('events.out.tfevents.*')
    )
    # top-5 needs 5 classes: the reference crashed here, this prints top-1 only
    assert ' * Acc@1 ' in result.stdout and 'Acc@5' not in result.stdout
    best_accuracy(result.stdout)
    classifier = load_plain(tmp_path / folder / 'last.pth')
    assert classifier['model']['fc.weight'].shape == (3, 512)


@pytest.mark.slow
def test_linear_loads_a_reference_checkpoint(tiny3, tmp_path):
    ckpt = tmp_path / 'reference_run' / 'ckpt_epoch_3.pth'
    state = save_reference_checkpoint(ckpt, model='resnet18', seed=7)
    assert any(
        k.startswith('encoder.module.') for k in torch.load(ckpt, weights_only=False)['model']
    )
    result = run_inprocess(
        'main_linear',
        tiny3_args(tiny3)
        + ['--model', 'resnet18', '--batch_size', '4', '--epochs', '1', '--ckpt', ckpt],
        cwd=tmp_path,
    )
    assert_ok(result)
    rel = 'reference_run/ckpt_epoch_3/path_resnet18_lr_0.1_decay_0_bsz_4'
    classifier = load_plain(tmp_path / 'save/SupCon/path_linear_models' / rel / 'last.pth')
    assert set(classifier['model']) == {'fc.weight', 'fc.bias'}
    # the logged validation is that of the reference encoder's weights
    scalars = read_scalars(tmp_path / 'save/SupCon/path_linear_tensorboard' / rel)
    probe = linear_probe(state, classifier['model'])
    assert_matches_last_validation(scalars, *loss_and_accuracy(probe, tiny3 / 'test'))


# --------------------------------------------------------------------------- main_supcon


@pytest.mark.slow
def test_simclr_names_its_run_simclr(tiny3, tmp_path):
    result = run_inprocess(
        'main_supcon',
        tiny3_args(tiny3, test=False)
        + [
            '--method',
            'SimCLR',
            '--model',
            'resnet18',
            '--batch_size',
            '6',
            '--epochs',
            '1',
            '--learning_rate',
            '0.5',
            '--temp',
            '0.5',
            '--cosine',
        ],
        cwd=tmp_path,
    )
    assert_ok(result)
    name = 'SimCLR_path_resnet18_lr_0.5_decay_0.0001_bsz_6_temp_0.5_trial_0_cosine'
    # save_freq 50: no numbered checkpoint after 1 epoch
    assert saved_files(tmp_path) == [
        f'save/SupCon/path_models/{name}/checkpoint.pth',
        f'save/SupCon/path_models/{name}/last.pth',
    ]
    assert (
        load_plain(tmp_path / f'save/SupCon/path_models/{name}/last.pth')['opt']['method']
        == 'SimCLR'
    )
    scalars = read_scalars(tmp_path / 'save/SupCon/path_tensorboard' / name)
    assert [step for step, _ in scalars['loss']] == [1]
    assert 'epoch 1, total time' in result.stdout


@pytest.mark.slow
def test_cifar10_seed_command_with_forced_warmup(tmp_path):
    # 410 images: batch 400 fits, and the epoch has a second, 10-image step
    write_cifar10(tmp_path / 'datasets', n_train=410, n_test=10)
    result = run_inprocess(
        'main_supcon',
        [
            '--dataset',
            'cifar10',
            '--method',
            'SupCon',
            '--batch_size',
            '400',
            '--learning_rate',
            '0.5',
            '--temp',
            '0.1',
            '--cosine',
            '--epochs',
            '1',
            '--model',
            'resnet18',
            '--size',
            '8',
        ]
        + FAST,
        cwd=tmp_path,
    )
    assert_ok(result)
    name = 'SupCon_cifar10_resnet18_lr_0.5_decay_0.0001_bsz_400_temp_0.1_trial_0_cosine_warm'
    assert saved_files(tmp_path) == [
        f'save/SupCon/cifar10_models/{name}/checkpoint.pth',
        f'save/SupCon/cifar10_models/{name}/last.pth',
    ]
    scalars = read_scalars(tmp_path / 'save/SupCon/cifar10_tensorboard' / name)
    # The logged rate is the warm-up's after the last step: warmup_to is the cosine value
    # at epoch 10 of 1, eta_min + (0.5 - eta_min) * (1 + cos(10 pi)) / 2 = 0.5, and the
    # last step has p = (1 + 0 * 2) / (10 * 2), so 0.01 + 0.05 * (0.5 - 0.01) = 0.0345.
    assert scalars['learning_rate'] == [(1, pytest.approx(0.0345, rel=1e-6))]
    opt = load_plain(tmp_path / f'save/SupCon/cifar10_models/{name}/last.pth')['opt']
    assert opt['warm'] is True and opt['warmup_from'] == 0.01 and opt['warm_epochs'] == 10


# --------------------------------------------------------------------------- main_ce


@pytest.mark.slow
def test_ce_on_an_image_folder_with_test_folder(tiny3, tmp_path):
    result = run_inprocess(
        'main_ce',
        tiny3_args(tiny3)
        + [
            '--model',
            'resnet18',
            '--batch_size',
            '6',
            '--epochs',
            '2',
            '--save_freq',
            '1',
            '--learning_rate',
            '0.2',
            '--cosine',
        ],
        cwd=tmp_path,
    )
    assert_ok(result)
    name = 'SupCE_path_resnet18_lr_0.2_decay_0.0001_bsz_6_trial_0_cosine'
    run = f'save/SupCon/path_models/{name}'
    assert saved_files(tmp_path) == [
        f'{run}/checkpoint.pth',
        f'{run}/ckpt_epoch_1.pth',
        f'{run}/ckpt_epoch_2.pth',
        f'{run}/last.pth',
    ]
    assert 'epoch 1, total time' in result.stdout and 'epoch 2, total time' in result.stdout
    assert 'Acc@5' not in result.stdout  # 3 classes
    scalars = read_scalars(tmp_path / 'save/SupCon/path_tensorboard' / name)
    assert {'train_loss', 'train_acc', 'val_loss', 'val_acc', 'learning_rate'} <= set(scalars)
    assert_lr_logged(
        scalars,
        schedule(
            learning_rate=0.2,
            cosine=True,
            lr_decay_rate=0.1,
            epochs=2,
            lr_decay_epochs=[350, 400, 450],
        ),
        2,
    )
    assert best_accuracy(result.stdout) == pytest.approx(
        max(v for _, v in scalars['val_acc']), abs=0.006
    )

    last = load_plain(tmp_path / run / 'last.pth')
    assert last['epoch'] == 2 and last['opt']['num_classes'] is None
    net = SupCEResNet(name='resnet18', num_classes=3)
    assert set(last['model']) == set(net.state_dict())
    net.load_state_dict(last['model'])
    assert_matches_last_validation(scalars, *loss_and_accuracy(net, tiny3 / 'test'))


# --------------------------------------------------------------------------- names only


def test_seed_cifar10_resnet50_names(tmp_path):
    opt = main_supcon.parse_option(
        [
            '--dataset',
            'cifar10',
            '--method',
            'SupCon',
            '--batch_size',
            '400',
            '--learning_rate',
            '0.5',
            '--temp',
            '0.1',
            '--cosine',
            '--epochs',
            '300',
        ]
    )
    name = 'SupCon_cifar10_resnet50_lr_0.5_decay_0.0001_bsz_400_temp_0.1_trial_0_cosine_warm'
    assert opt.model_name == name and opt.warm is True
    assert opt.save_folder == f'./save/SupCon/cifar10_models/{name}'
    assert opt.tb_folder == f'./save/SupCon/cifar10_tensorboard/{name}'

    # the README's classifier command on that run's last numbered checkpoint
    ckpt = tmp_path / 'save/SupCon/cifar10_models' / name / 'ckpt_epoch_300.pth'
    ckpt.parent.mkdir(parents=True)
    torch.save({'model': {}, 'opt': {'model': 'resnet50'}}, ckpt)
    linear = main_linear.parse_option(
        ['--batch_size', '256', '--learning_rate', '5', '--ckpt', str(ckpt), '--epochs', '100']
    )
    assert linear.model == 'resnet50' and linear.warm is False
    assert linear.save_folder.replace('\\', '/') == (
        f'./save/SupCon/cifar10_linear_models/{name}/ckpt_epoch_300/'
        f'cifar10_resnet50_lr_5.0_decay_0_bsz_256'
    )
    # warm-up stays opt-in for the linear classifier, as in the reference
    assert main_linear.parse_option(['--batch_size', '512', '--ckpt', str(ckpt)]).warm is False


@pytest.mark.parametrize('batch, suffix', [(256, ''), (257, '_warm')])
def test_warmup_forced_above_256(tiny3, batch, suffix):
    opt = main_supcon.parse_option(
        [
            '--dataset',
            'path',
            '--data_folder',
            str(tiny3 / 'train'),
            '--batch_size',
            str(batch),
            '--model',
            'resnet18',
        ]
    )
    assert opt.model_name == (
        f'SupCon_path_resnet18_lr_0.05_decay_0.0001_bsz_{batch}_temp_0.07_trial_0{suffix}'
    )
    assert opt.warm is bool(suffix)
    ce = main_ce.parse_option(
        [
            '--dataset',
            'path',
            '--data_folder',
            str(tiny3 / 'train'),
            '--test_folder',
            str(tiny3 / 'test'),
            '--batch_size',
            str(batch),
            '--cosine',
            '--trial',
            '3',
        ]
    )
    assert (
        ce.model_name == f'SupCE_path_resnet50_lr_0.2_decay_0.0001_bsz_{batch}_trial_3'
        f'_cosine{suffix}'
    )


def test_digits_names():
    opt = main_supcon.parse_option(
        [
            '--dataset',
            'digits',
            '--model',
            'resnet18',
            '--batch_size',
            '32',
            '--learning_rate',
            '0.5',
            '--temp',
            '0.1',
            '--cosine',
        ]
    )
    name = 'SupCon_digits_resnet18_lr_0.5_decay_0.0001_bsz_32_temp_0.1_trial_0_cosine'
    assert opt.save_folder == f'./save/SupCon/digits_models/{name}'
    assert opt.tb_folder == f'./save/SupCon/digits_tensorboard/{name}'
