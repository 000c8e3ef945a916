"""Tests for options.py: warm-up set-up, --lr_decay_epochs, plain options."""

import argparse
import io

import pytest
import torch
from test_util import schedule

from supcon import options
from supcon.system import checkpoint
from util import UserError

# --------------------------------------------------------------------------- warm-up


def test_warmup_is_forced_above_256_with_the_warm_suffix():
    opt = schedule(batch_size=257, epochs=100)
    options.configure_warmup(opt, large_batch=256)
    assert opt.warm is True and opt.model_name == 'run_warm'
    assert opt.warmup_from == 0.01 and opt.warm_epochs == 10
    # cosine: the schedule's value at epoch warm_epochs,
    # 5e-4 + (0.5 - 5e-4) * (1 + cos(pi * 10 / 100)) / 2
    assert opt.warmup_to == pytest.approx(0.4877763649447146)


def test_warmup_not_forced_at_256_or_when_opt_in_only():
    at_limit = schedule(batch_size=256)
    options.configure_warmup(at_limit, large_batch=256)
    assert at_limit.warm is False and at_limit.model_name == 'run'
    assert not hasattr(at_limit, 'warmup_to')
    opt_in = schedule(batch_size=1024)
    options.configure_warmup(opt_in, large_batch=None)
    assert opt_in.warm is False and opt_in.model_name == 'run'


def test_warmup_requested_below_256_and_step_schedule_warms_to_lr():
    opt = schedule(batch_size=16, warm=True, cosine=False, learning_rate=0.3)
    options.configure_warmup(opt, large_batch=256)
    assert opt.model_name == 'run_warm' and opt.warmup_to == 0.3


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    'text, epochs',
    [('700,800,900', [700, 800, 900]), ('5', [5]), (' 1, 2 ', [1, 2]), ('1,2,', [1, 2])],
)
def test_parse_decay_epochs(text, epochs):
    assert options.parse_decay_epochs(text) == epochs


@pytest.mark.parametrize('text', ['a,b', '1.5', '1;2', '10,x'])
def test_parse_decay_epochs_errors_name_the_flag_and_value(text):
    with pytest.raises(UserError) as info:
        options.parse_decay_epochs(text)
    message = str(info.value)
    assert '--lr_decay_epochs' in message and repr(text) in message and '\n' not in message


def test_plain_options_keeps_only_plain_values():
    opt = argparse.Namespace(
        a=1,
        b=1.5,
        c='s',
        d=True,
        e=None,
        f=[1, 2],
        g=(1, 'x'),
        h=torch.device('cpu'),
        i=torch.zeros(1),
        j={'k': 1},
        k=[1, object()],
        l=argparse.Namespace(x=1),
    )
    plain = checkpoint.plain_options(opt)
    assert plain == {
        'a': 1,
        'b': 1.5,
        'c': 's',
        'd': True,
        'e': None,
        'f': [1, 2],
        'g': [1, 'x'],
        'h': 'cpu',
    }
    buffer = io.BytesIO()
    torch.save({'opt': plain}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)['opt'] == plain


# --------------------------------------------------------------------------- float flags


def training_options(**changes):
    values = dict(
        batch_size=4,
        epochs=1,
        save_freq=1,
        print_freq=1,
        size=8,
        batch_size_val=4,
        num_workers=0,
        learning_rate=0.05,
        momentum=0.9,
        weight_decay=1e-4,
        lr_decay_rate=0.1,
        temp=0.07,
    )
    values.update(changes)
    return argparse.Namespace(**values)


@pytest.mark.parametrize(
    'name, value, words',
    [
        ('learning_rate', float('nan'), 'a finite number > 0'),
        ('learning_rate', float('inf'), 'a finite number > 0'),
        ('learning_rate', 0.0, 'a finite number > 0'),
        ('temp', float('nan'), 'a finite number > 0'),
        ('temp', -0.1, 'a finite number > 0'),
        ('momentum', -1.0, 'in [0, 1)'),
        ('momentum', 1.0, 'in [0, 1)'),
        ('momentum', float('nan'), 'in [0, 1)'),
        ('weight_decay', -1.0, '>= 0'),
        ('weight_decay', float('inf'), '>= 0'),
        ('lr_decay_rate', 0.0, 'in (0, 1]'),
        ('lr_decay_rate', 1.5, 'in (0, 1]'),
        ('lr_decay_rate', float('-inf'), 'in (0, 1]'),
        ('moco_m', float('nan'), 'a finite number'),  # any other float flag: finite at least
    ],
)
def test_float_flags_must_be_finite_and_in_range(name, value, words):
    with pytest.raises(UserError) as info:
        options.check_common_options(training_options(**{name: value}))
    message = str(info.value)
    assert message.startswith(f'--{name} must be ') and words in message
    assert message.endswith(f'got {value}') and '\n' not in message


def test_float_flags_accept_their_boundaries_and_missing_flags():
    options.check_common_options(
        training_options(momentum=0.0, weight_decay=0.0, lr_decay_rate=1.0, learning_rate=1e-8)
    )
    linear = training_options()
    del linear.temp  # main_ce.py and main_linear.py have no --temp
    options.check_common_options(linear)


@pytest.mark.parametrize('script', ['main_supcon', 'main_ce', 'main_linear'])
@pytest.mark.parametrize(
    'flag, value',
    [
        ('--learning_rate', 'nan'),
        ('--learning_rate', 'inf'),
        ('--momentum', '-1'),
        ('--weight_decay', '-1'),
        ('--lr_decay_rate', '0'),
    ],
)
def test_every_training_script_refuses_bad_float_flags(script, flag, value):
    import importlib

    module = importlib.import_module(script)
    args = [flag, value, '--dataset', 'digits']
    if script == 'main_linear':
        args += ['--ckpt', 'never_read.pth']  # the flags are checked before it is read
    with pytest.raises(UserError, match=f'^{flag} must be a finite number'):
        module.parse_option(args)
