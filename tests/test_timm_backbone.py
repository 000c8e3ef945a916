"""timm models as encoders: shapes, names, and local pretrained files (nothing is downloaded)."""

import pytest
import torch

pytest.importorskip('timm')

from networks.resnet_big import MODEL_NAMES  # noqa: E402
from networks.timm_backbone import create_encoder, is_timm_model  # noqa: E402
from util import UserError  # noqa: E402

VIT = 'vit_tiny_patch16_224'


def _forward(model, size=32):
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size))


def test_vit_tiny_at_32_with_patch_4():
    model, dim = create_encoder(VIT, 32, patch_size=4)
    assert dim == 192
    assert model.patch_embed.grid_size == (8, 8)
    out = _forward(model)
    assert out.shape == (2, 192) and torch.isfinite(out).all()


def test_convnext_atto_at_32():
    model, dim = create_encoder('convnext_atto', 32)
    assert dim == model.num_features == 320
    assert _forward(model).shape == (2, dim)


def test_model_without_img_size_or_patch_size():
    model, dim = create_encoder('resnet10t', 32)  # timm's ResNet takes any size, no img_size
    assert _forward(model).shape == (2, dim)
    with pytest.raises(UserError, match='patch size'):
        create_encoder('resnet10t', 32, patch_size=4)


@pytest.mark.parametrize(
    'name, hint',
    [
        ('vit_smal_patch16_224', 'vit_small_patch16_224'),
        ('convnxt_tiny', 'convnext_tiny'),
        ('no_such_net', 'timm.list_models('),
    ],
)
def test_unknown_name_is_a_one_line_user_error_with_a_hint(name, hint):
    with pytest.raises(UserError) as info:
        create_encoder(name, 32)
    message = str(info.value)
    assert name in message and hint in message and 'timm.list_models(' in message
    assert '\n' not in message
    assert not is_timm_model(name)


def test_hub_names_are_refused_without_network():
    with pytest.raises(UserError, match='downloaded'):
        create_encoder('hf-hub:timm/vit_tiny_patch16_224.augreg_in21k', 32)


def test_our_resnets_are_not_timm_models():
    for name in MODEL_NAMES:
        assert not is_timm_model(name)
        with pytest.raises(UserError):
            create_encoder(name, 32)
    assert is_timm_model(VIT) and is_timm_model('convnext_atto')
    assert is_timm_model('resnet50.a1_in1k')  # timm's own ResNet-50 via a tag


def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_pretrained_file_loads_and_drops_the_classifier(tmp_path):
    torch.manual_seed(1)
    source, _ = create_encoder(VIT, 32, patch_size=4)
    state = dict(source.state_dict())
    state['head.weight'] = torch.randn(10, 192)  # a classifier the encoder does not have
    state['head.bias'] = torch.randn(10)
    path = tmp_path / 'vit.pth'
    torch.save(state, path)

    torch.manual_seed(2)
    fresh, _ = create_encoder(VIT, 32, patch_size=4)
    assert not _equal_state(fresh, source)
    torch.manual_seed(2)
    loaded, dim = create_encoder(VIT, 32, patch_size=4, pretrained_file=str(path))
    assert dim == 192 and _equal_state(loaded, source)


def test_safetensors_and_wrapped_checkpoints(tmp_path):
    safetensors = pytest.importorskip('safetensors.torch')
    torch.manual_seed(3)
    source, _ = create_encoder('convnext_atto', 32)
    state = dict(source.state_dict())
    state['head.fc.weight'] = torch.randn(5, 320)
    st = tmp_path / 'convnext.safetensors'
    safetensors.save_file(state, str(st))
    loaded, _ = create_encoder('convnext_atto', 32, pretrained_file=str(st))
    assert _equal_state(loaded, source)

    wrapped = tmp_path / 'train_checkpoint.pth'  # timm's train.py layout
    torch.save({'epoch': 3, 'state_dict': {'module.' + k: v for k, v in state.items()}}, wrapped)
    loaded, _ = create_encoder('convnext_atto', 32, pretrained_file=str(wrapped))
    assert _equal_state(loaded, source)


def test_vit_checkpoint_at_another_size_is_resampled(tmp_path):
    source, _ = create_encoder(VIT, 48, patch_size=8)  # 6x6 grid of 8-pixel patches
    path = tmp_path / 'vit48.pth'
    torch.save(source.state_dict(), path)
    model, _ = create_encoder(VIT, 32, patch_size=4, pretrained_file=str(path))
    assert source.pos_embed.shape == (1, 1 + 36, 192)
    assert model.pos_embed.shape == (1, 1 + 64, 192)  # resampled to the 8x8 grid
    assert model.patch_embed.proj.weight.shape[-2:] == (4, 4)  # 8x8 kernel resampled
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert _forward(model).shape == (2, 192)


def test_wrong_model_file_is_a_one_line_user_error(tmp_path):
    other, _ = create_encoder('convnext_atto', 32)
    path = tmp_path / 'convnext.pth'
    torch.save(other.state_dict(), path)
    with pytest.raises(UserError) as info:
        create_encoder(VIT, 32, patch_size=4, pretrained_file=str(path))
    message = str(info.value)
    assert 'does not fit' in message and VIT in message and '\n' not in message


def test_missing_or_pickled_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match='not found'):
        create_encoder('convnext_atto', 32, pretrained_file=str(tmp_path / 'nope.pth'))
    path = tmp_path / 'pickled.pth'
    torch.save({'weights': torch.nn.Linear(2, 2)}, path)  # a module, not tensors
    with pytest.raises(UserError, match='weights only'):
        create_encoder('convnext_atto', 32, pretrained_file=str(path))
