"""Models against sizes and files: timm checkpoints, too-small images, ViT sizes, --pretrained
files, run names and main_tsne.py's defaults, each as a hostile tester ran it (tiny data, in
process)."""

import glob
import math

import numpy as np
import pytest
import torch
from helpers import folder_args
from inprocess import assert_one_line_error, call
from PIL import Image

pytest.importorskip('timm')

import timm  # noqa: E402

import main_ce  # noqa: E402
import main_supcon  # noqa: E402
import main_tsne  # noqa: E402
from networks.encoders import build_encoder  # noqa: E402
from networks.from_checkpoint import encoder_from_checkpoint, encoder_state  # noqa: E402
from networks.resnet_big import SupConResNet  # noqa: E402
from supcon.data import datasets  # noqa: E402
from supcon.data.augment import test_transform as eval_transform  # noqa: E402
from supcon.system import runtime
from supcon.system.checkpoint import (
    load_checkpoint,  # noqa: E402
    plain_options,  # noqa: E402
)

# the issue's `D`, on the CPU (main_supcon.py has no --num_workers_val: see digits())
D = ['--dataset', 'digits', '--size', '8', '--batch_size', '64', '--epochs', '1']
D += ['--num_workers', '0', '--device', 'cpu']
CPU = ['--device', 'cpu', '--num_workers', '0']


def digits(script):
    return D + (['--num_workers_val', '0'] if script in ('main_ce', 'main_linear') else [])


def with_size(args, size):
    """``args`` with its --size replaced."""
    args = list(args)
    args[args.index('--size') + 1] = str(size)
    return args


def no_checkpoint_written(cwd):
    return not glob.glob(str(cwd / 'save' / '**' / '*.pth'), recursive=True)


def write_folder(root, count, size=8, classes=('a', 'b')):
    rng = np.random.default_rng(count)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i}.png')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """--dataset path: two classes of 8x8 images, 8 training and 4 test images each."""
    root = tmp_path_factory.mktemp('images')
    write_folder(root / 'train', 8)
    write_folder(root / 'test', 4)
    return root


def path_args(root, **changes):
    options = dict(batch_size=8, seed=0, print_freq=1000, learning_rate=None)
    return folder_args(root, **dict(options, **changes))


def trained(script, args, cwd):
    """The last.pth of a run of ``script`` (main_supcon or main_ce) that must succeed."""
    result = call(script, args, cwd)
    assert result.code == 0, result.out[-2000:] + result.err
    module = {'main_supcon': main_supcon, 'main_ce': main_ce}[script]
    return cwd / module.parse_option([str(a) for a in args]).save_folder / 'last.pth'


def equal_weights(module, state, prefix='encoder.'):
    own = module.state_dict()
    theirs = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)


# --------------------------------------------------------------------------- item 2


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_supcon', 'main_ce'])
def test_timm_resnet_checkpoints_evaluate_with_linear_and_tsne(script, folder, tmp_path):
    """timm's ResNets name their projections `downsample`, as torchvision does: their
    checkpoints are still read as the timm model they record, not as the released one."""
    ckpt_path = trained(script, path_args(folder, model='resnet10t'), tmp_path)
    ckpt = load_checkpoint(str(ckpt_path))
    assert any('.downsample.' in key for key in ckpt['model'])  # the layout that was misread
    encoder, name = encoder_from_checkpoint(ckpt, str(ckpt_path))
    assert name == 'resnet10t' and type(encoder).__module__.startswith('timm.')
    assert equal_weights(encoder, ckpt['model'])

    linear = call('main_linear', path_args(folder, ckpt=ckpt_path), tmp_path)
    assert linear.code == 0, linear.err
    assert 'best accuracy:' in linear.out
    out = tmp_path / 'map.png'
    tsne = call('main_tsne', ['--ckpt', ckpt_path, '--out', out, *CPU], tmp_path)
    assert tsne.code == 0, tsne.err
    assert out.is_file() and f'wrote {out}' in tsne.out


def test_timm_resnet_that_matches_one_of_ours_keeps_its_own_stem(tmp_path):
    """timm's resnet18 has our resnet18's depths and a 7x7 stem: it was taken for the released
    torchvision layout, then refused with '--stem is for our ResNets' though no --stem was given."""
    name = 'resnet18.a1_in1k'
    torch.manual_seed(0)
    model = SupConResNet(name=name, encoder=build_encoder(name, size=8))
    path = tmp_path / 'timm18.pth'
    torch.save(
        {'model': model.state_dict(), 'opt': {'model': name, 'size': 8, 'stem': 'cifar'}}, path
    )
    ckpt = load_checkpoint(str(path))
    state, recorded = encoder_state(ckpt)
    assert state is ckpt['model'] and recorded['stem'] == 'cifar'  # nothing renamed
    encoder, got = encoder_from_checkpoint(ckpt, str(path))
    assert got == name and equal_weights(encoder, model.state_dict())
    # the released checkpoint (no options, torchvision's names) is still converted
    released = {
        k.replace('.shortcut.', '.downsample.'): v
        for k, v in SupConResNet('resnet18', stem='imagenet').state_dict().items()
    }
    _, recorded = encoder_state({'model': released, 'opt': {}})
    assert recorded['model'] == 'resnet18' and recorded['stem'] == 'imagenet'


# --------------------------------------------------------------------------- item 3


def forward_ok(name, size, **kwargs):
    """timm's own model on a real (CPU) batch: the independent check of the advice."""
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        return True
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.parametrize(
    'script, model, size, smallest, takes_img_size',
    [
        ('main_supcon', 'convnext_atto', 16, 32, False),
        ('main_ce', 'convnext_atto', 16, 32, False),
        ('main_supcon', 'inception_v3', 16, 75, False),
        ('main_supcon', 'crossvit_tiny_240', 16, 18, True),
        ('main_supcon', 'vit_tiny_patch16_224', 8, 16, True),
    ],
)
def test_too_small_size_is_refused_naming_the_smallest_that_works(
    script, model, size, smallest, takes_img_size, tmp_path
):
    result = call(script, with_size(digits(script), size) + ['--model', model], tmp_path)
    assert_one_line_error(
        result, f'--model {model} cannot take --size {size} images', f'pass --size {smallest}'
    )
    assert 'Traceback' not in result.err and no_checkpoint_written(tmp_path)

    def fits(side):
        return forward_ok(model, side, **({'img_size': side} if takes_img_size else {}))

    assert not fits(size) and fits(smallest) and not fits(smallest - 1)
    if model.startswith('vit_'):
        assert '--patch_size 8 or less' in result.err
        assert forward_ok(model, 8, img_size=8, patch_size=8)


def test_the_size_check_leaves_the_weights_as_timm_builds_them():
    """The dry run draws no random numbers and changes nothing: a run starts from the plain
    build's weights, in train mode."""
    torch.manual_seed(5)
    checked, _ = build_encoder('convnext_atto', size=32)
    torch.manual_seed(5)
    plain = timm.create_model('convnext_atto', pretrained=False, num_classes=0)
    assert checked.training and equal_weights(checked, plain.state_dict(), prefix='')


# --------------------------------------------------------------------------- item 4


@pytest.fixture(scope='module')
def vit_run(folder, tmp_path_factory):
    cwd = tmp_path_factory.mktemp('vit')
    args = path_args(folder, model='vit_tiny_patch16_224', patch_size=4)
    return cwd, trained('main_supcon', args, cwd)


def test_tsne_takes_a_vit_checkpoints_size_and_refuses_another(vit_run, folder):
    cwd, ckpt = vit_run
    out = cwd / 'vit.png'
    result = call('main_tsne', ['--ckpt', ckpt, '--out', out, *CPU], cwd)
    assert result.code == 0, result.err
    assert '--size 8' in result.out and out.is_file()
    for size in (32, 16):
        refused = call('main_tsne', ['--ckpt', ckpt, '--size', size, '--out', out, *CPU], cwd)
        assert_one_line_error(refused, f'--size {size} differs from the 8', 'pass --size 8')
    linear = call('main_linear', path_args(folder, ckpt=ckpt, size=32), cwd)
    assert_one_line_error(linear, '--size 32 differs from the 8', 'pass --size 8')


# --------------------------------------------------------------------------- items 5, 8, 20


@pytest.fixture(scope='module')
def digits_ckpt(tmp_path_factory):
    """An untrained resnet18 SupCon checkpoint of digits at size 8, with a --moco key encoder
    whose weights differ from the query encoder's."""
    root = tmp_path_factory.mktemp('digits')
    torch.manual_seed(0)
    query = SupConResNet('resnet18', feat_dim=16)
    key = SupConResNet('resnet18', feat_dim=16)
    opt = main_supcon.parse_option(D + ['--model', 'resnet18', '--moco'])
    path = root / 'last.pth'
    torch.save(
        {
            'model': query.state_dict(),
            'moco': {'key_encoder.model.' + k: v for k, v in key.state_dict().items()},
            'opt': plain_options(opt),
            'epoch': 1,
        },
        path,
    )
    return path, query, key


@pytest.mark.slow
def test_tsne_val_split_embeds_the_held_out_training_images(digits_ckpt, tmp_path):
    from sklearn.model_selection import train_test_split

    path, _, _ = digits_ckpt
    args = ['--ckpt', path, '--val_split', '0.2', '--max_samples', '5000', *CPU]
    opt = main_tsne.parse_option([str(a) for a in args])
    rt = runtime.setup_runtime(opt)  # one process, CPU: nothing to clean up
    loader, _ = main_tsne.set_loader(opt, rt)
    transform = eval_transform(8, *datasets.resolve_mean_std('digits', None, None))
    train = datasets.build_dataset('digits', 'train', transform)
    _, held_out = train_test_split(
        np.arange(len(train.targets)), test_size=0.2, stratify=train.targets, random_state=0
    )
    images = torch.cat([batch for batch, _ in loader])
    expected = torch.stack([train[i][0] for i in sorted(held_out)])
    assert len(images) == len(held_out) == math.ceil(0.2 * len(train.targets))
    torch.testing.assert_close(images, expected)

    out = tmp_path / 'held_out.png'
    result = call('main_tsne', args + ['--out', out], tmp_path)
    assert result.code == 0, result.err
    assert f'{len(held_out)} digits held-out (val_split 0.2) images' in result.out
    assert out.is_file()
    help_text = call('main_tsne', ['--help'], tmp_path).out
    assert 'held-out fraction of the training images' in ' '.join(help_text.split())


def test_tsne_key_encoder_has_its_own_file_and_title(digits_ckpt, tmp_path):
    path, query, key = digits_ckpt
    defaults = {}
    for extra in ([], ['--key_encoder']):
        opt = main_tsne.parse_option([str(a) for a in ['--ckpt', path, *CPU, *extra]])
        defaults[bool(extra)] = opt.out
        if extra:
            rt = runtime.setup_runtime(opt)
            encoder, _, title = main_tsne.set_model(opt, rt)
            assert 'key encoder' in title
            assert equal_weights(encoder, key.state_dict())
            assert not equal_weights(encoder, query.state_dict())
    assert defaults[False].endswith('last_tsne_encoder.png')
    assert defaults[True].endswith('last_tsne_key_encoder.png')


@pytest.mark.slow
def test_tsne_takes_the_data_options_from_the_checkpoint(digits_ckpt, folder, tmp_path):
    path, _, _ = digits_ckpt
    opt = main_tsne.parse_option([str(a) for a in ['--ckpt', path, *CPU]])
    assert (opt.dataset, opt.size) == ('digits', 8)  # not cifar10 at 32 (a download)
    # given flags win; the checkpoint's mean/std and folders only go with its own data set
    opt = main_tsne.parse_option([str(a) for a in ['--ckpt', path, '--size', '12', *CPU]])
    assert (opt.dataset, opt.size) == ('digits', 12)
    bare = tmp_path / 'bare.pth'
    torch.save({'model': SupConResNet('resnet18').state_dict()}, bare)
    opt = main_tsne.parse_option([str(a) for a in ['--ckpt', bare, *CPU]])
    assert (opt.dataset, opt.size) == ('cifar10', 32)  # a checkpoint that records nothing

    ckpt = trained(
        'main_supcon', path_args(folder, model='resnet18', mean='(0.4,0.4,0.4)'), tmp_path
    )
    opt = main_tsne.parse_option([str(a) for a in ['--ckpt', ckpt, *CPU]])
    assert opt.dataset == 'path' and opt.size == 8 and opt.mean == '(0.4,0.4,0.4)'
    assert opt.test_folder == str(folder / 'test') and opt.data_folder == str(folder / 'train')
    other = main_tsne.parse_option([str(a) for a in ['--ckpt', ckpt, '--dataset', 'digits', *CPU]])
    assert other.mean is None and other.size == 32 and other.test_folder is None
    result = call('main_tsne', ['--ckpt', ckpt, '--out', tmp_path / 'path.png', *CPU], tmp_path)
    assert result.code == 0, result.err
    assert 'note: from the checkpoint: --dataset path --size 8' in result.out


def test_tsne_model_help_names_timm(tmp_path):
    help_text = ' '.join(call('main_tsne', ['--help'], tmp_path).out.split())
    assert 'or a timm name' in help_text and "default: the checkpoint's (cifar10" in help_text


# --------------------------------------------------------------------------- item 7


def test_patch_size_and_pretrained_are_in_the_run_name():
    base = ['--dataset', 'digits', '--model', 'vit_tiny_patch16_224']
    reference = 'SupCon_digits_vit_tiny_patch16_224_lr_0.05_decay_0.0001_bsz_256_temp_0.07_trial_0'
    names = {
        tuple(extra): main_supcon.parse_option(base + extra).model_name
        for extra in (
            [],
            ['--patch_size', '4'],
            ['--patch_size', '2'],
            ['--pretrained', 'w/vit in21k.pth'],
            ['--pretrained', 'w/other.pth'],
        )
    }
    assert names[()] == reference  # unchanged when neither is given
    assert names[('--patch_size', '4')] == reference + '_patch_4'
    assert names[('--pretrained', 'w/vit in21k.pth')] == reference + '_pretrained_vit-in21k'
    assert len(set(names.values())) == len(names)
    ce = main_ce.parse_option(base + ['--patch_size', '4']).model_name
    assert ce == 'SupCE_digits_vit_tiny_patch16_224_lr_0.2_decay_0.0001_bsz_256_trial_0_patch_4'


def test_resume_refuses_another_pretrained_file(folder, tmp_path):
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        encoder, _ = build_encoder('resnet10t', size=8)
        files.append(tmp_path / f'w{seed}.pth')
        torch.save(encoder.state_dict(), files[-1])
    ckpt = trained(
        'main_supcon', path_args(folder, model='resnet10t', pretrained=files[0]), tmp_path
    )
    assert ckpt.parent.name.endswith('_pretrained_w1')
    result = call(
        'main_supcon',
        path_args(folder, model='resnet10t', pretrained=files[1], epochs=2, resume=ckpt),
        tmp_path,
    )
    assert_one_line_error(result, f'--pretrained {files[1]} differs', str(files[0]))


# --------------------------------------------------------------------------- items 10, 12, 13, 14


def test_pretrained_file_errors_are_one_clean_line(tmp_path):
    pickled = tmp_path / 'pickled.pth'
    torch.save({'layer': torch.nn.Linear(2, 2)}, pickled)
    arrays = tmp_path / 'arrays.pth'
    torch.save({'w': np.zeros(3)}, arrays)
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint' * 8)
    cases = {
        pickled: 'holds pickled Python objects (torch.nn.modules.linear.Linear)',
        arrays: 'holds pickled Python objects (numpy',
        junk: 'cannot be read as a state dict',
        tmp_path: 'is a directory',
        tmp_path / 'nope.pth': 'file not found',
    }
    for path, words in cases.items():
        args = D + ['--model', 'resnet10t', '--pretrained', path]
        result = call('main_supcon', args, tmp_path)
        assert_one_line_error(result, f'--pretrained {path}', words)
        message = result.err.lower()
        assert '\x1b' not in message and 'weights_only' not in message
        assert 're-run' not in message and 'trust' not in message
        assert no_checkpoint_written(tmp_path)


@pytest.mark.parametrize('script', ['main_supcon', 'main_ce'])
def test_hub_names_get_the_no_download_message(script, tmp_path):
    name = 'hf-hub:timm/vit_tiny_patch16_224.augreg_in21k'
    result = call(script, digits(script) + ['--model', name], tmp_path)
    assert_one_line_error(
        result, f'--model {name}', 'only timm registry names', 'nothing is downloaded'
    )
    assert 'list_models' not in result.err


@pytest.mark.parametrize(
    'patch, words',
    [
        ('0', '--patch_size must be a positive integer, got 0'),
        ('-2', '--patch_size must be a positive integer, got -2'),
        ('9', '--patch_size must be from 1 to the image size (--size 8), got 9'),
    ],
)
def test_patch_sizes_that_cannot_work_are_one_line(patch, words, tmp_path):
    result = call(
        'main_supcon', D + ['--model', 'vit_tiny_patch16_224', '--patch_size', patch], tmp_path
    )
    assert_one_line_error(result, words)
    assert no_checkpoint_written(tmp_path)


def test_hub_names_in_main_tsne_get_the_same_message(digits_ckpt, tmp_path):
    path, _, _ = digits_ckpt
    name = 'hf-hub:timm/vit_tiny_patch16_224.augreg_in21k'
    result = call('main_tsne', ['--ckpt', path, '--model', name, *CPU], tmp_path)
    assert_one_line_error(result, f'--model {name}', 'nothing is downloaded')
