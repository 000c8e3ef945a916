"""Tests for checkpoint.py: wrapper keys, safe loading, reference checkpoints."""

import errno
import os
import time
import zipfile

import pytest
import torch
import torch.nn as nn
from helpers import reference_options

from supcon.system import checkpoint
from util import UserError

# --------------------------------------------------------------------------- checkpoints


def test_strip_wrapper_keys():
    value = torch.ones(1)
    stripped = checkpoint.strip_wrapper_keys(
        {
            'encoder.module.conv1.weight': value,
            'module.head.0.weight': 1,
            '_orig_mod.encoder.module.layer1.0.bn1.bias': 2,
            'module._orig_mod.fc.bias': 3,  # DDP over torch.compile
            'encoder.module.module.conv2.weight': 7,  # nested DataParallel
            'modules.weight': 4,  # 'modules' is not a wrapper
            'encoder.submodule.weight': 5,
            'fc.weight': 6,
        }
    )
    assert stripped == {
        'encoder.conv1.weight': value,
        'head.0.weight': 1,
        'encoder.layer1.0.bn1.bias': 2,
        'fc.bias': 3,
        'modules.weight': 4,
        'encoder.submodule.weight': 5,
        'fc.weight': 6,
        'encoder.conv2.weight': 7,
    }
    assert stripped['encoder.conv1.weight'] is value


def real_checkpoint():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {
        'model': net.state_dict(),
        'optimizer': optimizer.state_dict(),
        'epoch': 2,
        'opt': {'model': 'resnet18', 'lr_decay_epochs': [1, 2], 'warm': False},
    }


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
    torch.save(
        {
            'opt': opt,
            'optimizer': optimizer.state_dict(),
            'epoch': 3,
            'model': {
                'encoder.module.conv1.weight': weight,
                'encoder.module.bn1.num_batches_tracked': torch.tensor(5),
                'head.0.bias': torch.zeros(2),
            },
        },
        path,
    )
    ckpt = checkpoint.load_checkpoint(str(path))
    assert isinstance(ckpt['opt'], dict) and ckpt['opt'] == vars(opt)
    assert ckpt['opt']['lr_decay_epochs'] == [700, 800, 900]
    assert sorted(ckpt['model']) == [
        'encoder.bn1.num_batches_tracked',
        'encoder.conv1.weight',
        'head.0.bias',
    ]
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
    message = str(info.value)
    assert message.startswith(f'--ckpt {path} holds pickled code or objects other than weights')
    assert 'so it was refused' in message and '\n' not in message
    assert ('posix.system' if payload == 'os.system' else 'NotAllowed') in message
    # never a hint to load it unsafely, nor torch's text cut short
    assert 'weights_only' not in message and 'In PyTorch' not in message
    assert not marker.exists()


def test_truncated_random_and_non_checkpoint_files_are_user_errors(tmp_path):
    real = tmp_path / 'real.pth'
    checkpoint.save_checkpoint(real_checkpoint(), str(real))
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    assert zipfile.is_zipfile(real) and not zipfile.is_zipfile(truncated)
    random_bytes = tmp_path / 'random.pth'
    random_bytes.write_bytes(os.urandom(2048))
    a_list = tmp_path / 'list.pth'
    torch.save([1, 2], a_list)
    no_model = tmp_path / 'no_model.pth'
    torch.save({'epoch': 3, 'optimizer': {}}, no_model)
    expected = {
        truncated: 'not a readable checkpoint',
        random_bytes: 'not a readable checkpoint',
        a_list: 'not a SupContrast checkpoint',
        no_model: 'not a SupContrast checkpoint',
        tmp_path / 'missing.pth': 'no such file',
    }
    for path, words in expected.items():
        with pytest.raises(UserError) as info:
            checkpoint.load_checkpoint(str(path), flag='--ckpt')
        message = str(info.value)
        assert message.startswith(f'--ckpt {path}') and words in message, message
        assert '\n' not in message


def test_a_directory_is_named_as_such(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    with pytest.raises(UserError) as info:
        checkpoint.load_checkpoint(str(run), flag='--resume')
    assert str(info.value) == (
        f'--resume {run} is a directory, not a checkpoint file; pass a .pth file'
    )
    checkpoint.save_checkpoint(real_checkpoint(), str(run / 'last.pth'))
    with pytest.raises(UserError, match=r'is a directory, .* e\.g\. .*last\.pth$'):
        checkpoint.load_checkpoint(str(run))


@pytest.mark.parametrize('opt', [[1, 2], 'resnet18', 3, torch.zeros(2)])
def test_options_that_are_not_a_dict_or_namespace_are_refused(tmp_path, opt):
    path = tmp_path / 'odd_opt.pth'
    torch.save({'model': {'w': torch.zeros(1)}, 'opt': opt, 'epoch': 1}, path)
    with pytest.raises(UserError) as info:
        checkpoint.load_checkpoint(str(path))
    message = str(info.value)
    assert message.startswith(f'--ckpt {path} stores its options ("opt") as a')
    assert 'not the dict or Namespace' in message and '\n' not in message
    torch.save({'model': {'w': torch.zeros(1)}, 'opt': None, 'epoch': 1}, path)
    assert checkpoint.load_checkpoint(str(path))['opt'] == {}


def test_a_legacy_format_file_is_read_when_mapping_is_asked(tmp_path):
    path = tmp_path / 'legacy.pth'
    torch.save(
        {'model': {'w': torch.ones(2)}, 'epoch': 4}, path, _use_new_zipfile_serialization=False
    )
    assert checkpoint.load_checkpoint(str(path), mmap=True)['epoch'] == 4


# --------------------------------------------------------------------------- failed saves


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / 'run' / 'checkpoint.pth'
    checkpoint.save_checkpoint({'model': {'w': torch.ones(3)}, 'epoch': 1}, str(path))
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, 'save', full_disk)
    with pytest.raises(UserError) as info:
        checkpoint.save_checkpoint({'model': {'w': torch.zeros(3)}, 'epoch': 2}, str(path))
    monkeypatch.undo()
    assert str(info.value) == (
        f'no space left on device while saving {path}; the previous'
        f' checkpoint.pth is intact: free some space, then continue'
        f' with --resume auto'
    )
    assert path.read_bytes() == before and os.listdir(path.parent) == ['checkpoint.pth']


def test_a_folder_that_cannot_be_written_is_a_user_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    folder = tmp_path / 'save' / 'run'
    assert checkpoint.folder_write_problem(str(folder)) is None
    assert not (tmp_path / 'save').exists()  # the probe creates nothing
    monkeypatch.setattr(checkpoint.tempfile, 'mkstemp', refuse)
    assert checkpoint.folder_write_problem(str(folder)) == f'{tmp_path}: Permission denied'
    with pytest.raises(UserError) as info:
        checkpoint.save_checkpoint({'model': {}}, str(folder / 'checkpoint.pth'))
    assert str(info.value).startswith(
        f'cannot write checkpoints to {folder} (Permission'
        f' denied): make it writable, or start the script from'
    )
    monkeypatch.undo()
    (tmp_path / 'file').write_text('')
    assert (
        checkpoint.folder_write_problem(str(tmp_path / 'file' / 'run'))
        == f'{tmp_path / "file"} is a file, not a folder'
    )


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_folder_is_found_by_the_probe(tmp_path):
    tmp_path.chmod(0o555)
    try:
        assert 'Permission denied' in checkpoint.folder_write_problem(str(tmp_path / 'run'))
    finally:
        tmp_path.chmod(0o755)


# --------------------------------------------------------------------------- resume auto


def test_first_nonfinite_names_the_tensor():
    state = {
        'model': {'a': torch.ones(3), 'n': torch.tensor(5)},
        'optimizer': {'state': {0: {'momentum_buffer': torch.zeros(2)}}},
    }
    assert checkpoint.first_nonfinite(state) is None
    state['optimizer']['state'][0]['momentum_buffer'][1] = float('-inf')
    assert checkpoint.first_nonfinite(state) == 'optimizer.state.0.momentum_buffer'
    state['model']['a'][0] = float('nan')
    assert checkpoint.first_nonfinite(state) == 'model.a'


def save_at(path, epoch, step=0, value=1.0):
    checkpoint.save_checkpoint(
        {'model': {'w': torch.full((2,), value)}, 'epoch': epoch, 'step': step, 'opt': {}},
        str(path),
    )


def test_resume_auto_takes_the_furthest_checkpoint_not_the_newest_file(tmp_path, capsys):
    save_at(tmp_path / 'ckpt_epoch_3.pth', 3)
    save_at(tmp_path / 'ckpt_epoch_6.pth', 6)
    save_at(tmp_path / 'checkpoint.pth', 7, step=2)  # stopped in epoch 8 after 2 steps
    save_at(tmp_path / 'later_step.pth', 7, step=1)
    old = time.time() + 10
    os.utime(tmp_path / 'ckpt_epoch_3.pth', (old, old))  # `touch`ed: the newest file
    assert checkpoint.newest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint.pth')

    # files that cannot be continued from are skipped with a note
    torch.save({'model': {'w': torch.ones(2)}}, tmp_path / 'no_epoch.pth')
    save_at(tmp_path / 'diverged.pth', 9, value=float('nan'))  # as an older version wrote
    (tmp_path / 'broken.pth').write_bytes(b'not a zip')
    capsys.readouterr()
    assert checkpoint.newest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint.pth')
    out = capsys.readouterr().out
    assert f'skips {tmp_path / "no_epoch.pth"}: it records no epoch' in out
    assert f'skips {tmp_path / "diverged.pth"}: it holds NaN or infinite values (model.w)' in out
    assert f'skips {tmp_path / "broken.pth"}: not a readable checkpoint' in out
    assert checkpoint.newest_checkpoint(str(tmp_path / 'none')) is None
