import copy

import pytest
import torch
import torch.nn.functional as F

from networks.resnet_big import (
    MODEL_NAMES,
    BasicBlock,
    Bottleneck,
    LinearClassifier,
    ResNet,
    SupCEResNet,
    SupConResNet,
    feature_dim,
    model_dict,
    resnet18,
    resnet50,
)

EXPECTED_DIMS = {'resnet18': 512, 'resnet34': 512, 'resnet50': 2048, 'resnet101': 2048}
BN_SUFFIXES = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


@pytest.fixture(scope='module')
def supcon18():
    torch.manual_seed(0)
    return SupConResNet('resnet18', head='mlp', feat_dim=16).eval()


def _basic_block_keys(prefix, has_shortcut):
    keys = [f'{prefix}.conv1.weight', f'{prefix}.conv2.weight']
    keys += [f'{prefix}.bn{i}.{s}' for i in (1, 2) for s in BN_SUFFIXES]
    if has_shortcut:
        keys.append(f'{prefix}.shortcut.0.weight')
        keys += [f'{prefix}.shortcut.1.{s}' for s in BN_SUFFIXES]
    return keys


def _expected_resnet18_supcon_keys():
    # Written out from the reference layout, not from the module: stem conv1 + bn1, then four
    # stages of two BasicBlocks; only the first block of layer2..4 changes stride/width and so
    # carries a conv+BN shortcut; then the MLP head's two Linear layers at Sequential indices
    # 0 and 2.
    keys = ['encoder.conv1.weight'] + [f'encoder.bn1.{s}' for s in BN_SUFFIXES]
    for stage in range(1, 5):
        for block in range(2):
            keys += _basic_block_keys(
                f'encoder.layer{stage}.{block}', has_shortcut=stage > 1 and block == 0
            )
    keys += ['head.0.weight', 'head.0.bias', 'head.2.weight', 'head.2.bias']
    return keys


# --- shapes -------------------------------------------------------------------------------------


def test_model_names_and_feature_dims():
    assert MODEL_NAMES == ('resnet18', 'resnet34', 'resnet50', 'resnet101')
    for name, dim in EXPECTED_DIMS.items():
        assert feature_dim(name) == dim
        assert model_dict[name][1] == dim


@pytest.mark.parametrize('name', ['resnet18', 'resnet34', 'resnet50', 'resnet101'])
def test_encoder_output_shape(name):
    torch.manual_seed(0)
    encoder = model_dict[name][0]().eval()
    with torch.no_grad():
        feats = encoder(torch.randn(2, 3, 16, 16))
    assert feats.shape == (2, EXPECTED_DIMS[name])


@pytest.mark.parametrize('head', ['mlp', 'linear'])
def test_supcon_output_is_unit_norm(head):
    torch.manual_seed(0)
    model = SupConResNet('resnet18', head=head, feat_dim=32).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_supce_and_linear_classifier_shapes():
    torch.manual_seed(0)
    model = SupCEResNet('resnet18', num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    probe = LinearClassifier('resnet50', num_classes=5)
    assert probe(torch.randn(4, 2048)).shape == (4, 5)
    assert set(probe.state_dict()) == {'fc.weight', 'fc.bias'}


# --- state-dict compatibility with the reference -------------------------------------------------


def test_resnet18_supcon_state_dict_keys(supcon18):
    keys = list(supcon18.state_dict())
    # stem 1 conv + 5 BN = 6; block without shortcut 2 convs + 2x5 BN = 12, with shortcut +1+5 = 18;
    # layer1 2x12 = 24, layer2..4 each 18+12 = 30 -> 90; encoder 6+24+90 = 120; MLP head 4 -> 124.
    assert len(keys) == 124
    assert set(keys) == set(_expected_resnet18_supcon_keys())
    for key in [
        'encoder.conv1.weight',
        'encoder.bn1.running_mean',
        'encoder.layer1.0.conv1.weight',
        'encoder.layer2.0.shortcut.0.weight',
        'encoder.layer2.0.shortcut.1.num_batches_tracked',
        'encoder.layer4.1.bn2.running_var',
        'head.0.weight',
        'head.2.bias',
    ]:
        assert key in keys
    assert not any(k.startswith('encoder.layer1.') and 'shortcut' in k for k in keys)


def test_linear_head_keys():
    model = SupConResNet('resnet18', head='linear', feat_dim=8)
    head_keys = {k for k in model.state_dict() if k.startswith('head.')}
    assert head_keys == {'head.weight', 'head.bias'}


def test_bottleneck_keys():
    block = Bottleneck(64, 64)
    keys = set(block.state_dict())
    # 64 -> 256 channels, so even a stride-1 Bottleneck gets a projection shortcut.
    assert {
        'conv3.weight',
        'bn3.weight',
        'bn3.running_var',
        'shortcut.0.weight',
        'shortcut.1.bias',
    } <= keys
    assert len(keys) == 3 + 3 * 5 + 1 + 5


def test_dataparallel_prefixed_state_dict_loads(supcon18):
    state = {
        k.replace('encoder.', 'encoder.module.', 1): v for k, v in supcon18.state_dict().items()
    }
    assert any(k.startswith('encoder.module.') for k in state)
    stripped = {k.replace('module.', ''): v for k, v in state.items()}
    fresh = SupConResNet('resnet18', head='mlp', feat_dim=16)
    fresh.load_state_dict(stripped, strict=True)
    torch.testing.assert_close(fresh.encoder.conv1.weight, supcon18.encoder.conv1.weight)


# --- stems ---------------------------------------------------------------------------------------


def _layer1_spatial(encoder, size):
    seen = {}

    def record(module, inputs, output):
        seen['shape'] = output.shape  # returning None leaves the output untouched

    handle = encoder.layer1.register_forward_hook(record)
    with torch.no_grad():
        encoder.eval()(torch.randn(1, 3, size, size))
    handle.remove()
    return tuple(seen['shape'][-2:])


def test_imagenet_stem_downsamples_and_keeps_keys():
    torch.manual_seed(0)
    imagenet = resnet18(stem='imagenet')
    cifar = resnet18(stem='cifar')
    assert imagenet.conv1.weight.shape == (64, 3, 7, 7)
    assert cifar.conv1.weight.shape == (64, 3, 3, 3)
    assert _layer1_spatial(imagenet, 64) == (16, 16)
    assert _layer1_spatial(cifar, 64) == (64, 64)
    assert list(imagenet.state_dict()) == list(cifar.state_dict())


# --- memory format and mixed precision -----------------------------------------------------------


def test_channels_last_matches_contiguous(supcon18):
    x = torch.randn(2, 3, 32, 32)
    cl_model = copy.deepcopy(supcon18).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = supcon18(x)
        out = cl_model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_close_to_fp32(supcon18):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = supcon18.encoder(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = supcon18.encoder(x)
            normed = supcon18(x)
    assert torch.isfinite(low).all()
    assert F.cosine_similarity(low.float(), ref, dim=1).min() > 0.99
    assert normed.shape == (2, 16)


# --- init and errors -----------------------------------------------------------------------------


def test_zero_init_residual_zeroes_last_bn():
    basic = resnet18(zero_init_residual=True)
    blocks = [m for m in basic.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8
    assert all(b.bn2.weight.abs().sum() == 0 and (b.bn1.weight == 1).all() for b in blocks)

    bottle = resnet50(zero_init_residual=True)
    blocks = [m for m in bottle.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    assert all(b.bn3.weight.abs().sum() == 0 and (b.bn2.weight == 1).all() for b in blocks)

    assert all((m.bn2.weight == 1).all() for m in resnet18().modules() if isinstance(m, BasicBlock))


def test_unknown_name_head_stem_raise_value_error():
    with pytest.raises(ValueError, match='resnet18, resnet34, resnet50, resnet101'):
        SupConResNet('resnet19')
    for cls in (SupCEResNet, LinearClassifier):
        with pytest.raises(ValueError, match='resnet19'):
            cls('resnet19')
    with pytest.raises(ValueError, match='resnet19'):
        feature_dim('resnet19')
    with pytest.raises(ValueError, match='head'):
        SupConResNet('resnet18', head='transformer')
    with pytest.raises(ValueError, match='stem'):
        ResNet(BasicBlock, [2, 2, 2, 2], stem='tiny')
    with pytest.raises(ValueError, match='stem'):
        SupConResNet('resnet18', stem='tiny')
