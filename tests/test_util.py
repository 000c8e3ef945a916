"""Tests for util.py: schedule, warm-up, options, checkpoints, meters, accuracy, run_main."""
import argparse
import io
import os
import zipfile

import pytest
import torch
import torch.nn as nn

import util
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


# --------------------------------------------------------------------------- schedule

def test_cosine_schedule_goes_from_lr_to_lr_times_rate_cubed():
    opt = schedule()
    assert util.learning_rate_at(opt, 0) == pytest.approx(0.5)
    # eta_min = 0.5 * 0.1 ** 3 = 5e-4; 5e-4 + (0.5 - 5e-4) * (1 + cos(pi * 3 / 10)) / 2
    assert util.learning_rate_at(opt, 3) == pytest.approx(0.39704936676004515)
    # 5e-4 + (0.5 - 5e-4) * (1 + cos(pi / 2)) / 2 = 5e-4 + 0.4995 / 2
    assert util.learning_rate_at(opt, 5) == pytest.approx(0.25025)
    # the last epoch reaches eta_min = 0.5 * 0.1 ** 3
    assert util.learning_rate_at(opt, 10) == pytest.approx(5e-4)


def test_step_schedule_decays_after_each_listed_epoch():
    opt = schedule(cosine=False, learning_rate=0.1)
    # epoch > 3 decays once (0.1 * 0.1), epoch > 6 twice (0.1 * 0.1 ** 2)
    expected = {1: 0.1, 3: 0.1, 4: 0.01, 6: 0.01, 7: 0.001, 100: 0.001}
    for epoch, lr in expected.items():
        assert util.learning_rate_at(opt, epoch) == pytest.approx(lr), epoch


def test_adjust_learning_rate_sets_every_param_group():
    optimizer = sgd(groups=2)
    util.adjust_learning_rate(schedule(cosine=False, learning_rate=0.1), optimizer, 4)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.01, 0.01])


# --------------------------------------------------------------------------- warm-up

def test_warmup_is_forced_above_256_with_the_warm_suffix():
    opt = schedule(batch_size=257, epochs=100)
    util.configure_warmup(opt, large_batch=256)
    assert opt.warm is True and opt.model_name == 'run_warm'
    assert opt.warmup_from == 0.01 and opt.warm_epochs == 10
    # cosine: the schedule's value at epoch warm_epochs,
    # 5e-4 + (0.5 - 5e-4) * (1 + cos(pi * 10 / 100)) / 2
    assert opt.warmup_to == pytest.approx(0.4877763649447146)


def test_warmup_not_forced_at_256_or_when_opt_in_only():
    at_limit = schedule(batch_size=256)
    util.configure_warmup(at_limit, large_batch=256)
    assert at_limit.warm is False and at_limit.model_name == 'run'
    assert not hasattr(at_limit, 'warmup_to')
    opt_in = schedule(batch_size=1024)
    util.configure_warmup(opt_in, large_batch=None)
    assert opt_in.warm is False and opt_in.model_name == 'run'


def test_warmup_requested_below_256_and_step_schedule_warms_to_lr():
    opt = schedule(batch_size=16, warm=True, cosine=False, learning_rate=0.3)
    util.configure_warmup(opt, large_batch=256)
    assert opt.model_name == 'run_warm' and opt.warmup_to == 0.3


def test_warmup_learning_rate_is_linear_over_warm_epochs():
    opt = schedule(batch_size=512, epochs=20)
    util.configure_warmup(opt)
    # cosine with 20 epochs: 5e-4 + (0.5 - 5e-4) * (1 + cos(pi * 10 / 20)) / 2
    assert opt.warmup_to == pytest.approx(0.25025)
    optimizer = sgd()
    cases = [
        (1, 0, 0.01),  # p = 0 / (10 * 4)
        (1, 2, 0.01 + 2 / 40 * (0.25025 - 0.01)),  # p = (2 + 0 * 4) / (10 * 4)
        (3, 1, 0.01 + 9 / 40 * (0.25025 - 0.01)),  # p = (1 + 2 * 4) / (10 * 4)
        (10, 3, 0.01 + 39 / 40 * (0.25025 - 0.01)),  # last warm-up step
    ]
    for epoch, batch, lr in cases:
        util.warmup_learning_rate(opt, epoch, batch, 4, optimizer)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(lr), (epoch, batch)
    util.set_lr(optimizer, 0.777)
    util.warmup_learning_rate(opt, 11, 0, 4, optimizer)  # past the warm-up: untouched
    assert optimizer.param_groups[0]['lr'] == 0.777


def test_warmup_learning_rate_does_nothing_without_warm():
    optimizer = sgd()
    util.warmup_learning_rate(schedule(), 1, 0, 4, optimizer)
    assert optimizer.param_groups[0]['lr'] == 0.777


# --------------------------------------------------------------------------- options

@pytest.mark.parametrize('text, epochs', [('700,800,900', [700, 800, 900]), ('5', [5]),
                                          (' 1, 2 ', [1, 2]), ('1,2,', [1, 2])])
def test_parse_decay_epochs(text, epochs):
    assert util.parse_decay_epochs(text) == epochs


@pytest.mark.parametrize('text', ['a,b', '1.5', '1;2', '10,x'])
def test_parse_decay_epochs_errors_name_the_flag_and_value(text):
    with pytest.raises(UserError) as info:
        util.parse_decay_epochs(text)
    message = str(info.value)
    assert '--lr_decay_epochs' in message and repr(text) in message and '\n' not in message


def test_plain_options_keeps_only_plain_values():
    opt = argparse.Namespace(a=1, b=1.5, c='s', d=True, e=None, f=[1, 2], g=(1, 'x'),
                             h=torch.device('cpu'), i=torch.zeros(1), j={'k': 1},
                             k=[1, object()], l=argparse.Namespace(x=1))
    plain = util.plain_options(opt)
    assert plain == {'a': 1, 'b': 1.5, 'c': 's', 'd': True, 'e': None, 'f': [1, 2],
                     'g': [1, 'x'], 'h': 'cpu'}
    buffer = io.BytesIO()
    torch.save({'opt': plain}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)['opt'] == plain


# --------------------------------------------------------------------------- checkpoints

def test_strip_wrapper_keys():
    value = torch.ones(1)
    stripped = util.strip_wrapper_keys({
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
    util.save_checkpoint(state, str(path))
    util.save_checkpoint(state, str(path))  # overwriting an existing file works too
    assert os.listdir(path.parent) == ['ckpt.pth']  # no temporary file left behind
    plain = torch.load(path, weights_only=True)
    loaded = util.load_checkpoint(str(path))
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
    ckpt = util.load_checkpoint(str(path))
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
        util.load_checkpoint(str(path))
    assert 'not a readable checkpoint' in str(info.value) and str(path) in str(info.value)
    assert '\n' not in str(info.value)
    assert not marker.exists()


def test_truncated_random_and_non_checkpoint_files_are_user_errors(tmp_path):
    real = tmp_path / 'real.pth'
    util.save_checkpoint(real_checkpoint(), str(real))
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
            util.load_checkpoint(str(path), flag='--ckpt')
        message = str(info.value)
        assert message.startswith(f'--ckpt {path}') and words in message, message
        assert '\n' not in message


# --------------------------------------------------------------------------- meters

def test_average_meter_weights_by_count_and_round_trips():
    meter = util.AverageMeter()
    meter.update(2.0, n=3)
    meter.update(4.0)
    # (2 * 3 + 4 * 1) / 4
    assert (meter.val, meter.sum, meter.count, meter.avg) == (4.0, 10.0, 4, 2.5)
    other = util.AverageMeter()
    other.load_state_dict(meter.state_dict())
    assert (other.sum, other.count, other.avg) == (10.0, 4, 2.5)
    meter.reset()
    assert (meter.val, meter.sum, meter.count, meter.avg) == (0.0, 0.0, 0, 0.0)


def test_correct_counts_and_accuracy():
    output = torch.tensor([[0.1, 0.9, 0.0, 0.2, 0.3, 0.4],   # order: 1, 5, 4, 3, 0, 2
                           [0.8, 0.1, 0.0, 0.0, 0.0, 0.05],  # order: 0, 1, 5, then 2-4
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],   # order: 5, 4, 3, 2, 1, 0
                           [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])  # order: 0, 1, 2, 3, 4, 5
    target = torch.tensor([1, 5, 0, 5])
    # top-1 hits: sample 0 only; top-5 hits: sample 0 and sample 1 (class 5 ranks 3rd);
    # samples 2 and 3 have their class ranked 6th of 6, a miss either way
    top1, top5 = util.correct_counts(output, target, topk=(1, 5))
    assert (top1.item(), top5.item()) == (1.0, 2.0)
    acc1, acc5 = util.accuracy(output, target, topk=(1, 5))
    assert (acc1.item(), acc5.item()) == (25.0, 50.0)  # 100 * 1 / 4, 100 * 2 / 4


def test_top_k_above_the_class_count_counts_every_sample():
    output = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.0, 0.1]])
    top1, top5 = util.correct_counts(output, torch.tensor([2, 0]), topk=(1, 5))
    assert (top1.item(), top5.item()) == (1.0, 2.0)  # with 3 classes top-5 holds all of them


# --------------------------------------------------------------------------- run_main

def test_run_main_turns_user_error_into_one_line_and_exit_2(capsys):
    def main():
        print('working')
        raise UserError('--thing 3 is wrong; use 4')

    with pytest.raises(SystemExit) as info:
        util.run_main(main)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == 'error: --thing 3 is wrong; use 4\n'
    assert captured.out == 'working\n'


def test_run_main_keeps_the_last_line_of_a_worker_traceback(capsys):
    def main():
        raise UserError('Caught DataError in DataLoader worker process 0.\nTraceback (most'
                        ' recent call last):\n  File "x.py", line 1\ndata.DataError: cannot read'
                        ' image a.png')

    with pytest.raises(SystemExit) as info:
        util.run_main(main)
    assert info.value.code == 2
    assert capsys.readouterr().err == 'error: cannot read image a.png\n'


def test_run_main_lets_success_and_bugs_through(capsys):
    calls = []
    util.run_main(lambda: calls.append(1))
    assert calls == [1] and capsys.readouterr().err == ''

    def buggy():
        raise ValueError('a bug, not a user error')

    with pytest.raises(ValueError):
        util.run_main(buggy)


def test_a_new_event_file_sorts_after_the_existing_ones(tmp_path):
    """A resumed run's TensorBoard file must not share the killed run's second (name order)."""
    import time
    now = int(time.time())
    (tmp_path / f'events.out.tfevents.{now}.host.99999.0').write_bytes(b'')
    util.wait_for_a_later_second(str(tmp_path))
    assert int(time.time()) > now
    logger = util.TBLogger(str(tmp_path), purge_step=2)
    logger.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == f'events.out.tfevents.{now}.host.99999.0'
    # older files, or none, cost no wait
    old = tmp_path / 'old'
    old.mkdir()
    (old / f'events.out.tfevents.{now - 5}.host.1.0').write_bytes(b'')
    start = time.time()
    util.wait_for_a_later_second(str(tmp_path / 'missing'))
    util.wait_for_a_later_second(str(old))
    assert time.time() - start < 0.5
