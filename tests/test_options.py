"""Tests for options.py: warm-up set-up, --lr_decay_epochs, plain options."""
import argparse
import io

import pytest
import torch
import torch.nn as nn

import options
from util import UserError


def schedule(**overrides):
    opt = dict(learning_rate=0.5, cosine=True, lr_decay_rate=0.1, epochs=10,
               lr_decay_epochs=[3, 6], batch_size=32, warm=False, model_name='run')
    opt.update(overrides)
    return argparse.Namespace(**opt)


def sgd(lr=0.777, groups=1):
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{'params': [p]} for p in params], lr=lr)


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

@pytest.mark.parametrize('text, epochs', [('700,800,900', [700, 800, 900]), ('5', [5]),
                                          (' 1, 2 ', [1, 2]), ('1,2,', [1, 2])])
def test_parse_decay_epochs(text, epochs):
    assert options.parse_decay_epochs(text) == epochs


@pytest.mark.parametrize('text', ['a,b', '1.5', '1;2', '10,x'])
def test_parse_decay_epochs_errors_name_the_flag_and_value(text):
    with pytest.raises(UserError) as info:
        options.parse_decay_epochs(text)
    message = str(info.value)
    assert '--lr_decay_epochs' in message and repr(text) in message and '\n' not in message


def test_plain_options_keeps_only_plain_values():
    opt = argparse.Namespace(a=1, b=1.5, c='s', d=True, e=None, f=[1, 2], g=(1, 'x'),
                             h=torch.device('cpu'), i=torch.zeros(1), j={'k': 1},
                             k=[1, object()], l=argparse.Namespace(x=1))
    plain = options.plain_options(opt)
    assert plain == {'a': 1, 'b': 1.5, 'c': 's', 'd': True, 'e': None, 'f': [1, 2],
                     'g': [1, 'x'], 'h': 'cpu'}
    buffer = io.BytesIO()
    torch.save({'opt': plain}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)['opt'] == plain
