"""Tests for checkpoint.py: wrapper keys, safe loading, reference checkpoints."""
import argparse
import os
import zipfile

import pytest
import torch
import torch.nn as nn

import checkpoint
from helpers import reference_options
from util import UserError


def schedule(**overrides):
    opt = dict(learning_rate=0.5, cosine=True, lr_decay_rate=0.1, epochs=10,
               lr_decay_epochs=[3, 6], batch_size=32, warm=False, model_name='run')
    opt.update(overrides)
    return argparse.Namespace(**opt)


def sgd(lr=0.777, groups=1):
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{'params': [p]} for p in params], lr=lr)


# --------------------------------------------------------------------------- checkpoints

def test_strip_wrapper_keys():
    value = torch.ones(1)
    stripped = checkpoint.strip_wrapper_keys({
        'encoder.module.conv1.weight': value,
        'module.head.0.weight': 1,
        '_orig_mod.encoder.module.layer1.0.bn1.bias': 2,
        'module._orig_mod.fc.bias': 3,  # DDP over torch.compile
        'encoder.module.module.conv2.weight': 7,  # nested DataParallel
        'modules.weight': 4,  # 'modules' is not a wrapper
        'encoder.submodule.weight': 5,
        'fc.weight': 6,
    })
    assert stripped == {'encoder.conv1.weight': value, 'head.0.weight': 1,
                        'encoder.layer1.0.bn1.bias': 2, 'fc.bias': 3, 'modules.weight': 4,
                        'encoder.submodule.weight': 5, 'fc.weight': 6,
                        'encoder.conv2.weight': 7}
    assert stripped['encoder.conv1.weight'] is value


def real_checkpoint():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {'model': net.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 2,
            'opt': {'model': 'resnet18', 'lr_decay_epochs': [1, 2], 'warm': False}}


def test_save_load_round_trip_weights_only(tmp_path):
    state = real_checkpoint()
    path = tmp_path / 'run' / 'ckpt.pth'
    checkpoint.save_checkpoint(state, str(path))
    checkpoint.save_checkpoint(state, str(path))  # overwriting an existing file works too
    assert os.listdir(path.parent) == ['ckpt.pth']  # no temporary file left behind
    plain = torch.load(path, weights_only=True)
    loaded = checkpoint.load_checkpoint(str(path))
    for ckpt in (plain, loaded):
        assert ckpt['epoch'] == 2 and ckpt['opt'] == state['opt']
        assert ckpt['model'].keys() == state['model'].keys()
        assert all(torch.equal(ckpt['model'][k], v) for k, v in state['model'].items())
        assert ckpt['optimizer']['state'][0]['momentum_buffer'].shape == (2, 3)


def test_loads_a_reference_checkpoint(tmp_path):
    weight = torch.randn(4, 3, 3, 3)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.5)
    opt = reference_options()
    path = tmp_path / 'ckpt_epoch_3.pth'
    torch.save({'opt': opt, 'optimizer': optimizer.state_dict(), 'epoch': 3,
                'model': {'encoder.module.conv1.weight': weight,
                          'encoder.module.bn1.num_batches_tracked': torch.tensor(5),
                          'head.0.bias': torch.zeros(2)}}, path)
    ckpt = checkpoint.load_checkpoint(str(path))
    assert isinstance(ckpt['opt'], dict) and ckpt['opt'] == vars(opt)
    assert ckpt['opt']['lr_decay_epochs'] == [700, 800, 900]
    assert sorted(ckpt['model']) == ['encoder.bn1.num_batches_tracked', 'encoder.conv1.weight',
                                     'head.0.bias']
    assert torch.equal(ckpt['model']['encoder.conv1.weight'], weight)
    assert ckpt['epoch'] == 3 and ckpt['optimizer']['param_groups'][0]['lr'] == 0.5


class NotAllowed:
    """A class a checkpoint must never be able to make the loader import."""

    def __init__(self):
        self.x = 1


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.parametrize('payload', ['class', 'os.system'])
def test_forbidden_global_is_refused_and_not_executed(tmp_path, payload):
    marker = tmp_path / 'pwned'
    evil = NotAllowed() if payload == 'class' else RunsShell(marker)
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'opt': evil, 'epoch': 1}, path)
    with pytest.raises(UserError) as info:
        checkpoint.load_checkpoint(str(path))
    assert 'not a readable checkpoint' in str(info.value) and str(path) in str(info.value)
    assert '\n' not in str(info.value)
    assert not marker.exists()


def test_truncated_random_and_non_checkpoint_files_are_user_errors(tmp_path):
    real = tmp_path / 'real.pth'
    checkpoint.save_checkpoint(real_checkpoint(), str(real))
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(real.read_bytes()[:real.stat().st_size // 2])
    assert zipfile.is_zipfile(real) and not zipfile.is_zipfile(truncated)
    random_bytes = tmp_path / 'random.pth'
    random_bytes.write_bytes(os.urandom(2048))
    a_list = tmp_path / 'list.pth'
    torch.save([1, 2], a_list)
    no_model = tmp_path / 'no_model.pth'
    torch.save({'epoch': 3, 'optimizer': {}}, no_model)
    expected = {truncated: 'not a readable checkpoint', random_bytes: 'not a readable checkpoint',
                a_list: 'not a SupContrast checkpoint', no_model: 'not a SupContrast checkpoint',
                tmp_path / 'missing.pth': 'no such file'}
    for path, words in expected.items():
        with pytest.raises(UserError) as info:
            checkpoint.load_checkpoint(str(path), flag='--ckpt')
        message = str(info.value)
        assert message.startswith(f'--ckpt {path}') and words in message, message
        assert '\n' not in message
