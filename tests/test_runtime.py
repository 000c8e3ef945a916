"""Tests for runtime.py: run_main's one-line errors and exit codes."""
import argparse

import pytest
import torch
import torch.nn as nn

import runtime
from util import UserError


def schedule(**overrides):
    opt = dict(learning_rate=0.5, cosine=True, lr_decay_rate=0.1, epochs=10,
               lr_decay_epochs=[3, 6], batch_size=32, warm=False, model_name='run')
    opt.update(overrides)
    return argparse.Namespace(**opt)


def sgd(lr=0.777, groups=1):
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{'params': [p]} for p in params], lr=lr)


# --------------------------------------------------------------------------- run_main

def test_run_main_turns_user_error_into_one_line_and_exit_2(capsys):
    def main():
        print('working')
        raise UserError('--thing 3 is wrong; use 4')

    with pytest.raises(SystemExit) as info:
        runtime.run_main(main)
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
        runtime.run_main(main)
    assert info.value.code == 2
    assert capsys.readouterr().err == 'error: cannot read image a.png\n'


def test_run_main_lets_success_and_bugs_through(capsys):
    calls = []
    runtime.run_main(lambda: calls.append(1))
    assert calls == [1] and capsys.readouterr().err == ''

    def buggy():
        raise ValueError('a bug, not a user error')

    with pytest.raises(ValueError):
        runtime.run_main(buggy)
