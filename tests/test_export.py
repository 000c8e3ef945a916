"""main_export.py: TorchScript and ONNX give PyTorch's outputs on real images at two batch
sizes, exported weights load strictly into torchvision's and timm's own models and compute the
same features, and bad input is one line."""

import importlib.util
import io
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from helpers import save_our_checkpoint
from inprocess import assert_one_line_error, call
from torchvision import transforms
from trained_models import DIGIT_CLASSES, copy_of

from networks.encoders import build_encoder
from networks.resnet_big import SupConResNet
from supcon.data import datasets
from supcon.data.normalization import MEAN_STD
from supcon.inference import export
from supcon.system import checkpoint

# torch marks TorchScript deprecated from 2.10; loading it is what these tests check
pytestmark = pytest.mark.filterwarnings('ignore::FutureWarning')
HAVE_ONNX = not export.missing_onnx_packages()
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason='onnx, onnxscript, onnxruntime not installed')


@pytest.fixture(scope='module')
def ckpts(digits_checkpoints):
    return digits_checkpoints


def digits_images(size=8):
    """The digits test split as main_export.py's graphs take it: resized, in [0, 1]."""
    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    dataset = datasets.build_dataset('digits', 'test', tf)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def plain_network(kind, ckpts):
    """What the exported graph must compute, built without supcon.inference.trained_model: our
    ResNet with the checkpoint's weights, its fc, torchvision's Normalize with the digits
    constants."""
    net = SupConResNet('resnet18')
    encoder_file = ckpts['encoder'] if kind in ('linear', 'encoder') else ckpts[kind]
    state = checkpoint.load_checkpoint(str(encoder_file))['model']
    net.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith('encoder.')})
    fc = nn.Identity()
    if kind != 'encoder':
        weights = checkpoint.load_checkpoint(str(ckpts[kind]))['model']
        fc = nn.Linear(512, 10)
        fc.load_state_dict({'weight': weights['fc.weight'], 'bias': weights['fc.bias']})
    normalize = transforms.Normalize(*MEAN_STD['digits'])
    return lambda images: fc(net.encoder.eval()(normalize(images)))


def export_file(kind, fmt, ckpts, tmp_path, suffix):
    out = tmp_path / f'{kind}{suffix}'
    result = call('main_export', ['--ckpt', ckpts[kind], '--format', fmt, '--out', out], tmp_path)
    assert result.code == 0, result.err
    assert 'checked: the file gives PyTorch\'s outputs to' in result.out
    side = json.loads((tmp_path / f'{kind}{suffix}.json').read_text())
    return out, side


def check_metadata(meta, kind):
    assert meta['input_size'] == 8 and meta['model'] == 'resnet18' and meta['kind'] == kind
    assert meta['mean'] == pytest.approx(MEAN_STD['digits'][0])
    assert meta['std'] == pytest.approx(MEAN_STD['digits'][1])
    if kind == 'encoder':
        assert meta['classes'] is None and meta['activation'] is None
    else:
        assert meta['classes'] == DIGIT_CLASSES and meta['activation'] == 'softmax'


@pytest.mark.parametrize('kind', ['linear', 'ce', 'encoder'])
def test_torchscript_gives_pytorch_outputs_on_digits_at_two_batch_sizes(kind, ckpts, tmp_path):
    out, side = export_file(kind, 'torchscript', ckpts, tmp_path, '.pt')
    extra = {export.METADATA_FILE: ''}
    module = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[export.METADATA_FILE]) == side
    check_metadata(side, kind)
    want = plain_network(kind, ckpts)
    images = digits_images()
    with torch.no_grad():
        for batch in (images[:7], images[7:39]):  # the batch dimension is dynamic
            got = module(batch)
            assert got.shape == (len(batch), 512 if kind == 'encoder' else 10)
            torch.testing.assert_close(got, want(batch), rtol=0, atol=1e-4)


@pytest.mark.slow
@needs_onnx
@pytest.mark.parametrize('kind', ['linear', 'encoder'])
def test_onnxruntime_gives_pytorch_outputs_on_digits_at_two_batch_sizes(kind, ckpts, tmp_path):
    import onnx
    import onnxruntime

    out, side = export_file(kind, 'onnx', ckpts, tmp_path, '.onnx')
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    assert export.onnx_metadata(proto) == side
    check_metadata(side, kind)
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 8, 8]
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    want = plain_network(kind, ckpts)
    images = digits_images()
    with torch.no_grad():
        for batch in (images[:5], images[5:37]):
            (got,) = session.run(None, {'images': batch.numpy()})
            np.testing.assert_allclose(got, want(batch).numpy(), rtol=0, atol=1e-4)


def test_without_the_onnx_packages_onnx_is_one_line_naming_them(ckpts, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        'find_spec',
        lambda name, *a: None if name in ('onnx', 'onnxruntime') else find_spec(name, *a),
    )
    out = tmp_path / 'm.onnx'
    result = call(
        'main_export', ['--ckpt', ckpts['linear'], '--format', 'onnx', '--out', out], tmp_path
    )
    assert_one_line_error(result, 'optional packages onnx, onnxruntime', 'pip install')
    assert not out.exists()


def torchvision_model(name, stem):
    """torchvision's ResNet with the two-line CIFAR-stem change docs/using-a-model.md shows."""
    model = getattr(torchvision.models, name)()
    if stem == 'cifar':
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


@pytest.mark.parametrize('name, stem', [('resnet18', 'cifar'), ('resnet50', 'imagenet')])
def test_weights_load_strictly_into_torchvision_and_compute_our_features(name, stem, tmp_path):
    torch.manual_seed(0)
    net = SupConResNet(name, stem=stem)
    with torch.no_grad():  # BatchNorm statistics other than the initial ones
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    opt = {'model': name, 'stem': stem, 'dataset': 'digits', 'size': 32}
    ckpt = tmp_path / 'encoder.pth'
    torch.save({'model': net.state_dict(), 'opt': opt, 'epoch': 1}, ckpt)
    out = tmp_path / 'weights.pth'
    result = call('main_export', ['--ckpt', ckpt, '--format', 'weights', '--out', out], tmp_path)
    assert result.code == 0, result.err
    side = json.loads((tmp_path / 'weights.pth.json').read_text())
    assert side['library'] == 'torchvision' and side['stem'] == stem
    assert ('maxpool = nn.Identity()' in side['build']) == (stem == 'cifar')
    model = torchvision_model(name, stem)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), net.encoder.eval()(images))


@pytest.mark.parametrize(
    'name, size, patch', [('resnet10t', 8, None), ('vit_tiny_patch16_224', 8, 4)]
)
def test_weights_of_a_timm_backbone_load_strictly_into_timm(name, size, patch, tmp_path):
    torch.manual_seed(0)
    encoder, dim = build_encoder(name, size=size, patch_size=patch)
    net = SupConResNet(name, encoder=(encoder, dim))
    opt = {'model': name, 'size': size, 'patch_size': patch, 'dataset': 'digits'}
    ckpt = tmp_path / 'encoder.pth'
    torch.save({'model': net.state_dict(), 'opt': opt, 'epoch': 1}, ckpt)
    out = tmp_path / 'weights.pth'
    result = call('main_export', ['--ckpt', ckpt, '--format', 'weights', '--out', out], tmp_path)
    assert result.code == 0, result.err
    side = json.loads((tmp_path / 'weights.pth.json').read_text())
    assert side['library'] == 'timm'
    model = timm.create_model(name, pretrained=False, num_classes=0, **side['timm_kwargs'])
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), encoder.eval()(images))


def test_a_moved_encoder_is_found_with_encoder_and_wrong_kinds_are_one_line(ckpts, tmp_path):
    """A linear classifier whose recorded encoder is gone names --encoder; --encoder takes a
    copy elsewhere; a classifier given as --encoder, a file of other weights, a missing file,
    --encoder for a checkpoint with its own encoder: one line each, nothing written."""
    encoder = copy_of(ckpts['encoder'], tmp_path / 'moved')
    linear = tmp_path / 'linear.pth'
    state = checkpoint.load_checkpoint(str(ckpts['linear']))
    state['extra']['encoder_ckpt'] = str(tmp_path / 'gone' / 'last.pth')
    state['opt']['ckpt'] = str(tmp_path / 'gone' / 'last.pth')
    torch.save(state, linear)
    other = tmp_path / 'other.pth'
    torch.save({'model': {'conv.weight': torch.zeros(1)}}, other)
    out = tmp_path / 'm.pt'
    base = ['--format', 'torchscript', '--out', out]
    cases = [
        (['--ckpt', linear], ['recorded encoder', 'is not there', '--encoder PATH']),
        (['--ckpt', linear, '--encoder', ckpts['linear']], ['is a main_linear.py classifier']),
        (['--ckpt', other], ['holds neither a classifier', 'nor an encoder']),
        (['--ckpt', tmp_path / 'missing.pth'], ['missing.pth: no such file']),
        (['--ckpt', ckpts['ce'], '--encoder', encoder], ['drop --encoder']),
        (['--ckpt', linear, '--out', tmp_path / 'm.onnx'], ['should end in .pt or .pth']),
    ]
    for args, fragments in cases:
        assert_one_line_error(call('main_export', base + args, tmp_path), *fragments)
        assert not out.exists()
    result = call('main_export', ['--ckpt', linear, '--encoder', encoder] + base, tmp_path)
    assert result.code == 0, result.err
    assert str(encoder) in result.out


def test_an_untrained_encoder_without_recorded_options_exports_with_the_reference_defaults(
    tmp_path,
):
    ckpt = tmp_path / 'supcon.pth'
    save_our_checkpoint(ckpt)  # the reference's options: cifar10, size 32
    result = call(
        'main_export', ['--ckpt', ckpt, '--format', 'torchscript', '--out', 'm.pt'], tmp_path
    )
    assert result.code == 0, result.err
    meta = json.loads((tmp_path / 'm.pt.json').read_text())
    assert meta['input_size'] == 32 and meta['mean'] == pytest.approx(MEAN_STD['cifar10'][0])
    module = torch.jit.load(io.BytesIO((tmp_path / 'm.pt').read_bytes()))
    assert module(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_an_export_that_differs_from_pytorch_is_not_written(ckpts, tmp_path, monkeypatch):
    monkeypatch.setattr(export, 'parity', lambda content, fmt, tm: 0.5)
    out = tmp_path / 'm.pt'
    args = ['--ckpt', ckpts['ce'], '--format', 'torchscript', '--out', out]
    assert_one_line_error(call('main_export', args, tmp_path), 'differs from PyTorch by 0.5')
    assert not out.exists() and not (tmp_path / 'm.pt.json').exists()
    assert not list(tmp_path.glob('.*.tmp'))
