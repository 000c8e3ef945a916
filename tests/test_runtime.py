"""Tests for runtime.py: launch's one-line errors and exit codes."""

import pytest
import torch
from helpers import runtime_opt

from supcon.system import runtime
from util import UserError

# --------------------------------------------------------------------------- launch


def test_launch_turns_user_error_into_one_line_and_exit_2(capsys):
    def main():
        print('working')
        raise UserError('--thing 3 is wrong; use 4')

    with pytest.raises(SystemExit) as info:
        runtime.launch(main)
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == 'error: --thing 3 is wrong; use 4\n'
    assert captured.out == 'working\n'


def test_launch_keeps_the_last_line_of_a_worker_traceback(capsys):
    def main():
        raise UserError(
            'Caught DataError in DataLoader worker process 0.\nTraceback (most'
            ' recent call last):\n  File "x.py", line 1\ndata.DataError: cannot read'
            ' image a.png'
        )

    with pytest.raises(SystemExit) as info:
        runtime.launch(main)
    assert info.value.code == 2
    assert capsys.readouterr().err == 'error: cannot read image a.png\n'


def test_launch_lets_success_and_bugs_through(capsys):
    calls = []
    runtime.launch(lambda: calls.append(1))
    assert calls == [1] and capsys.readouterr().err == ''

    def buggy():
        raise ValueError('a bug, not a user error')

    with pytest.raises(ValueError):
        runtime.launch(buggy)


# --------------------------------------------------------------------------- setup_runtime


@pytest.fixture
def no_torchrun(monkeypatch):
    for key in (
        'WORLD_SIZE',
        'RANK',
        'LOCAL_RANK',
        'LOCAL_WORLD_SIZE',
        'MASTER_ADDR',
        'MASTER_PORT',
    ):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize('device', ['mps', 'meta', 'cuda:x', 'CPU', 'cpu:0', ''])
def test_only_auto_cpu_cuda_and_cuda_n_are_devices(device, no_torchrun):
    with pytest.raises(UserError) as info:
        runtime.setup_runtime(runtime_opt(device=device))
    assert str(info.value) == (f'--device must be auto, cpu, cuda or cuda:N, got {device!r}')


def test_a_cuda_index_beyond_the_devices_is_refused(no_torchrun):
    with pytest.raises(UserError, match='--device cuda:99: ') as info:
        runtime.setup_runtime(runtime_opt(device='cuda:99'))
    assert '\n' not in str(info.value)


def test_leftover_world_size_1_is_one_process(no_torchrun, capsys):
    for key in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        no_torchrun.setenv(key, '1' if key == 'WORLD_SIZE' else '0')
    opt = runtime_opt()
    with torch.random.fork_rng():
        rt = runtime.setup_runtime(opt)
    assert not rt.distributed and (rt.rank, rt.world_size) == (0, 1)
    assert not torch.distributed.is_initialized() and rt.local_batch_size == 8
    assert vars(opt) == vars(runtime_opt())  # the options are read, never written


@pytest.mark.parametrize(
    'env, words',
    [
        (dict(WORLD_SIZE='2', RANK='0', LOCAL_RANK='0'), 'MASTER_ADDR and MASTER_PORT are not'),
        (
            dict(WORLD_SIZE='2', RANK='0', LOCAL_RANK='0', MASTER_ADDR='localhost'),
            'MASTER_PORT is not',
        ),
        (
            dict(WORLD_SIZE='two', RANK='0', LOCAL_RANK='0'),
            "WORLD_SIZE='two' is not a whole number",
        ),
        (dict(WORLD_SIZE='2', RANK='2', LOCAL_RANK='0'), 'WORLD_SIZE=2, RANK=2'),
        (dict(WORLD_SIZE='2', LOCAL_RANK='0'), 'but RANK, MASTER_ADDR and MASTER_PORT are not'),
    ],
)
def test_torchrun_variables_without_torchrun_are_one_line_errors(no_torchrun, env, words):
    for key, value in env.items():
        no_torchrun.setenv(key, value)
    with pytest.raises(UserError) as info:
        runtime.setup_runtime(runtime_opt())
    message = str(info.value)
    assert words in message and 'torchrun' in message and '\n' not in message
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------- Ctrl-C, divergence


def test_launch_turns_ctrl_c_into_one_line_and_exit_130(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        runtime.launch(main)
    assert info.value.code == 130
    assert capsys.readouterr().err == 'error: interrupted by Ctrl-C\n'
