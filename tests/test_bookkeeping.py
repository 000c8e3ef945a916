"""Tests for bookkeeping.py beyond the end-to-end ones of test_resume.py: the divergence message,
the second Ctrl-C."""

import argparse
import os
import signal
import time

import pytest
import torch

from supcon.system import checkpoint, runtime
from supcon.training import bookkeeping
from util import UserError


def test_a_nan_loss_names_the_last_good_checkpoint(tmp_path):
    opt = argparse.Namespace(learning_rate=0.5, save_folder=str(tmp_path / 'run'))
    bookkeeping.check_finite(1.5, 1, 1, opt)
    with pytest.raises(UserError) as info:
        bookkeeping.check_finite(float('nan'), 2, 3, opt)
    assert str(info.value).startswith(
        'loss is nan at epoch 2, step 3: training diverged and'
        ' nothing was saved from it; no checkpoint was saved'
    )
    for epoch, name in ((2, 'ckpt_epoch_2.pth'), (1, 'checkpoint.pth')):
        checkpoint.save_checkpoint(
            {'model': {'w': torch.ones(2)}, 'epoch': epoch}, str(tmp_path / 'run' / name)
        )
    with pytest.raises(UserError) as info:
        bookkeeping.check_finite(float('inf'), 3, 1, opt)
    message = str(info.value)
    assert f'the last good checkpoint is {tmp_path / "run" / "ckpt_epoch_2.pth"}' in message
    assert '--learning_rate (now 0.5)' in message and '\n' not in message


def test_a_second_ctrl_c_exits_130_with_one_line_and_no_traceback(capsys, tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def main():
        stop = bookkeeping.GracefulStop(str(tmp_path))
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a stop after the step
        time.sleep(0.01)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)  # the second aborts at once
        time.sleep(1)
        raise AssertionError('not interrupted')

    try:
        with pytest.raises(SystemExit) as info:
            runtime.launch(main)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert info.value.code == 130
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: stopped by a second Ctrl-C')
    assert f'already saved in {tmp_path} are intact' in err and '--resume auto' in err
