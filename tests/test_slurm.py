"""SLURM: srun without torchrun, a requeue after SIGUSR1, the submitit launcher.

Every run of the suite: node lists, SLURM's variables and the requeue command are checked
in this process, and two forked processes with SLURM's variables set by hand (gloo on CPU)
must train exactly the run that torchrun's variables give, save on SIGUSR1, issue
``scontrol requeue`` (a fake scontrol on the PATH records it) and, started again as SLURM
would, end with the weights of the uninterrupted run.

With a SLURM up on this machine (tests/slurm/start_local_slurm.sh; .ci/run starts it when it
can be installed) the same runs go through sbatch and srun, a requeue and submitit; without
one those tests skip and say why.
"""

import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import main_supcon
import run_with_submitit
from supcon.data import datasets
from supcon.errors import UserError
from supcon.system import checkpoint, runtime, slurm
from supcon.training import bookkeeping

REPO = Path(__file__).resolve().parents[1]
# 72 training images (a twentieth of digits): 5 steps of 16 (8 a rank) an epoch, 2 epochs
ARGS = [
    '--dataset', 'digits', '--model', 'resnet18', '--size', '8', '--val_split', '0.95',
    '--batch_size', '16', '--epochs', '2', '--learning_rate', '0.01', '--num_workers', '0',
    '--device', 'cpu', '--seed', '1', '--print_freq', '1',
]  # fmt: skip
STEPS = 5
RUN_FOLDER = main_supcon.parse_option(ARGS).save_folder  # relative: ./save/SupCon/...
TORCHRUN_NAMES = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR')
TIMEOUT_S = 300
# Python 3.12 warns about any fork of a threaded process (as in test_distributed.py)
FORK_OK = pytest.mark.filterwarnings('ignore:This process .* is multi-threaded:DeprecationWarning')
needs_fork = pytest.mark.skipif(not hasattr(os, 'fork'), reason='the two ranks are forked')


def clean_env(**extra):
    """This process's environment less any torchrun or SLURM variable, one thread."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in TORCHRUN_NAMES + ('MASTER_PORT', 'TORCHELASTIC_RUN_ID')
        and not key.startswith('SLURM_')
    }
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **extra)
    return env


def free_job_id():
    """A job id whose rendezvous port (slurm.master_port) is free on the loopback now."""
    for job_id in range(os.getpid() % 1000 * 17, 10**6, 7919):
        with socket.socket() as sock:
            try:
                sock.bind(('127.0.0.1', slurm.master_port(str(job_id))))
            except OSError:
                continue
        return str(job_id)
    raise AssertionError('no free port in the rendezvous range')


def text_of(path):
    return path.read_text() if path.exists() else ''


def max_abs_diff(path_a, path_b):
    a = checkpoint.load_checkpoint(str(path_a))['model']
    b = checkpoint.load_checkpoint(str(path_b))['model']
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# --------------------------------------------------------------------------- node lists


@pytest.mark.parametrize(
    'text, hosts',
    [
        ('node[01-03,7]', ['node01', 'node02', 'node03', 'node7']),
        ('a[1-2],b3', ['a1', 'a2', 'b3']),
        ('gpu-[001-002]x', ['gpu-001x', 'gpu-002x']),
        ('n[8-10]', ['n8', 'n9', 'n10']),
        ('n[08-10]', ['n08', 'n09', 'n10']),
        ('r[1-2]c[3-4]', ['r1c3', 'r1c4', 'r2c3', 'r2c4']),
        ('vm', ['vm']),
        ('x1,y[2],z', ['x1', 'y2', 'z']),
    ],
)
def test_node_lists_expand_as_scontrol_show_hostnames(text, hosts):
    assert slurm.expand_hostlist(text) == hosts


@pytest.mark.parametrize('text', ['n[1-2', 'n]1[', 'n[a-b]', 'n[3-1]', 'n[[1]]'])
def test_malformed_node_lists_are_refused(text):
    with pytest.raises(ValueError):
        slurm.expand_hostlist(text)


def scontrol_answers():
    """True when ``scontrol show hostnames`` runs here (it needs a slurm.conf)."""
    if shutil.which('scontrol') is None:
        return False
    try:
        done = subprocess.run(
            ['scontrol', 'show', 'hostnames', 'a[1-2]'], capture_output=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.split() == [b'a1', b'a2']


@pytest.mark.skipif(not scontrol_answers(), reason='no working scontrol on this machine')
def test_node_lists_expand_as_the_real_scontrol_does():
    # gpu-[001-002]x is left out: Slurm 22.05's scontrol calls a suffix after brackets invalid
    for text in ('node[01-03,7]', 'a[1-2],b3', 'n[8-10]', 'n[08-10],m[9-11,010]', 'r[1-2]c[3-4]'):
        done = subprocess.run(
            ['scontrol', 'show', 'hostnames', text], capture_output=True, text=True, timeout=20
        )
        assert slurm.expand_hostlist(text) == done.stdout.split(), text


def test_tasks_per_node_and_the_port():
    assert [slurm.tasks_on_node('2(x3),1', n) for n in range(4)] == [2, 2, 2, 1]
    with pytest.raises(ValueError):
        slurm.tasks_on_node('2(x3),1', 4)
    assert slurm.master_port('12345') == slurm.PORT_BASE + 12345 % slurm.PORT_SPAN
    assert slurm.master_port('7_3') == slurm.PORT_BASE + 73  # an array task's id
    ports = {slurm.master_port(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(10000 <= p < 30000 for p in ports)


# --------------------------------------------------------------------------- SLURM's variables


def slurm_task(rank, ntasks=2, job_id='12345', **extra):
    """What srun sets for task ``rank`` of a one-node step (the names the code reads)."""
    env = {
        'SLURM_JOB_ID': job_id,
        'SLURM_PROCID': str(rank),
        'SLURM_LOCALID': str(rank),
        'SLURM_NTASKS': str(ntasks),
        'SLURM_NNODES': '1',
        'SLURM_NODEID': '0',
        'SLURM_JOB_NODELIST': 'localhost',
        'SLURM_TASKS_PER_NODE': str(ntasks),
        'SLURM_STEP_ID': '0',
    }
    env.update(extra)
    return env


def test_slurm_variables_become_torchrun_variables():
    env = slurm_task(
        5,
        ntasks=16,
        SLURM_LOCALID='5',
        SLURM_NODEID='0',
        SLURM_NNODES='2',
        SLURM_JOB_NODELIST='gpu-[007-008]',
        SLURM_TASKS_PER_NODE='8(x2)',
    )
    assert slurm.torchrun_variables(env) == {
        'WORLD_SIZE': '16',
        'RANK': '5',
        'LOCAL_RANK': '5',
        'LOCAL_WORLD_SIZE': '8',
        'MASTER_ADDR': 'gpu-007',
        'MASTER_PORT': str(10000 + 12345 % 20000),
    }
    # the step's own node list and task count come first; a MASTER_ADDR/PORT set is kept
    env.update(
        SLURM_STEP_NODELIST='gpu-008', SLURM_STEP_NUM_TASKS='8', SLURM_STEP_TASKS_PER_NODE='8'
    )
    got = slurm.torchrun_variables(env)
    assert (got['MASTER_ADDR'], got['WORLD_SIZE']) == ('gpu-008', '8')
    got = slurm.torchrun_variables(dict(env, MASTER_ADDR='10.0.0.1', MASTER_PORT='2222'))
    assert (got['MASTER_ADDR'], got['MASTER_PORT']) == ('10.0.0.1', '2222')
    # one GPU bound to each task (--gpus-per-task=1): the task's device is its only one
    assert slurm.torchrun_variables(dict(env, CUDA_VISIBLE_DEVICES='5'))['LOCAL_RANK'] == '0'
    assert (
        slurm.torchrun_variables(dict(env, CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7'))['LOCAL_RANK']
        == '5'
    )


def test_loader_workers_share_the_cpus_only_with_tasks_that_share_them(monkeypatch):
    env = slurm_task(3, ntasks=8, SLURM_TASKS_PER_NODE='8', SLURM_CPUS_PER_TASK='10')
    monkeypatch.setattr(slurm, 'cpus_seen', lambda: 10)  # bound: the task's own 10 CPUs
    assert slurm.torchrun_variables(env)['LOCAL_WORLD_SIZE'] == '1'
    monkeypatch.setattr(slurm, 'cpus_seen', lambda: 80)  # all 8 tasks see the node's 80
    assert slurm.torchrun_variables(env)['LOCAL_WORLD_SIZE'] == '8'


def test_one_task_a_batch_script_and_no_slurm_are_one_process(capsys):
    assert slurm.torchrun_variables({}) is None
    assert slurm.torchrun_variables(slurm_task(0, ntasks=1)) is None
    batch = {k: v for k, v in slurm_task(0).items() if k != 'SLURM_STEP_ID'}
    assert slurm.torchrun_variables(batch) is None  # the batch script itself, not a task
    note = capsys.readouterr().out
    assert note.startswith('note: this is the batch script of a SLURM job of 2 tasks')
    assert 'srun python' in note and note.count('\n') == 1


@pytest.mark.parametrize(
    'change, fragment',
    [
        ({'SLURM_PROCID': 'x'}, "SLURM_PROCID='x' is not a whole number"),
        ({'SLURM_PROCID': '2'}, 'SLURM_NTASKS=2, SLURM_PROCID=2'),
        ({'SLURM_JOB_NODELIST': 'n[1-'}, 'SLURM_JOB_NODELIST: unbalanced brackets'),
        ({'SLURM_JOB_NODELIST': ''}, 'set MASTER_ADDR'),
    ],
)
def test_impossible_slurm_variables_are_one_line_errors(change, fragment):
    with pytest.raises(UserError) as info:
        slurm.torchrun_variables(dict(slurm_task(1), **change))
    assert fragment in str(info.value) and '\n' not in str(info.value)


def setenv(monkeypatch, env):
    """Exactly ``env``'s torchrun and SLURM variables, all undone after the test, also those
    ``torchrun_environment`` exports (set once here, the undo deletes them)."""
    for key in TORCHRUN_NAMES + ('MASTER_PORT',):
        monkeypatch.setenv(key, 'unset')
        monkeypatch.delenv(key)
    for key in [k for k in os.environ if k.startswith('SLURM_')]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_runtime_takes_slurm_variables_and_torchrun_wins(monkeypatch):
    setenv(monkeypatch, slurm_task(1, job_id='777'))
    assert runtime.torchrun_environment() == (2, 1, 1)
    # exported for the env:// rendezvous of init_process_group
    assert (os.environ['MASTER_ADDR'], os.environ['MASTER_PORT']) == ('localhost', '10777')
    assert os.environ['RANK'] == '1' and os.environ['LOCAL_WORLD_SIZE'] == '2'
    torchrun = dict(
        WORLD_SIZE='4', RANK='3', LOCAL_RANK='1', MASTER_ADDR='127.0.0.1', MASTER_PORT='29500'
    )
    setenv(monkeypatch, dict(slurm_task(1), **torchrun))
    assert runtime.torchrun_environment() == (4, 3, 1)
    assert os.environ['MASTER_PORT'] == '29500'
    setenv(monkeypatch, slurm_task(0, ntasks=1))
    assert runtime.torchrun_environment() == (1, 0, 0) and 'WORLD_SIZE' not in os.environ
    setenv(monkeypatch, slurm_task(1, job_id='778'))
    runtime.torchrun_environment()  # exports again: the undo must remove these too


def test_nothing_exported_outlives_the_test_before():
    assert not [k for k in TORCHRUN_NAMES + ('MASTER_PORT',) if k in os.environ]


def test_a_restarted_job_resumes_auto_unless_told_otherwise(monkeypatch):
    setenv(monkeypatch, {})
    assert main_supcon.parse_option(ARGS).resume is None
    monkeypatch.setenv('SLURM_RESTART_COUNT', '0')
    assert main_supcon.parse_option(ARGS).resume is None
    monkeypatch.setenv('SLURM_RESTART_COUNT', '2')
    assert main_supcon.parse_option(ARGS).resume == 'auto'
    assert main_supcon.parse_option(ARGS + ['--resume', 'x.pth']).resume == 'x.pth'


# --------------------------------------------------------------------------- requeue


def fake_scontrol(folder, exit_code=0):
    """A ``scontrol`` that appends its arguments to ``folder/scontrol.log``."""
    folder.mkdir(exist_ok=True)
    log = folder / 'scontrol.log'
    script = folder / 'scontrol'
    script.write_text(
        f'#!/bin/sh\necho "$@" >> "{log}"\n'
        + (f'echo "scontrol: error: Invalid job id" >&2\nexit {exit_code}\n' if exit_code else '')
    )
    script.chmod(0o755)
    return log


def test_requeue_runs_scontrol_or_says_what_to_run(tmp_path):
    log = fake_scontrol(tmp_path / 'bin')
    env = {'SLURM_JOB_ID': '42', 'PATH': str(tmp_path / 'bin')}
    message = slurm.requeue(signal.SIGUSR1, env)
    assert log.read_text() == 'requeue 42\n'
    assert message == 'requeued SLURM job 42: it continues from here by itself (--resume auto)'
    # SIGTERM is scancel's: no requeue; outside SLURM nothing to do
    assert slurm.requeue(signal.SIGTERM, env) is None
    assert slurm.requeue(signal.SIGUSR1, {'PATH': str(tmp_path / 'bin')}) is None
    assert log.read_text() == 'requeue 42\n'
    (tmp_path / 'empty').mkdir()
    message = slurm.requeue(signal.SIGUSR1, dict(env, PATH=str(tmp_path / 'empty')))
    assert message.startswith('scontrol is not on the PATH, so SLURM job 42 was not requeued')
    assert '`scontrol requeue 42`' in message and '\n' not in message
    fake_scontrol(tmp_path / 'failing', exit_code=1)
    message = slurm.requeue(signal.SIGUSR1, dict(env, PATH=str(tmp_path / 'failing')))
    assert message.startswith('`scontrol requeue 42` failed (scontrol: error: Invalid job id)')


def test_requeue_survives_the_sigterm_slurm_sends_the_job(tmp_path):
    """SLURM answers a requeue with SIGTERM to every process of the job, scontrol included; a
    fake scontrol that gets it before it exits 0 still reports its success."""
    folder = tmp_path / 'bin'
    folder.mkdir()
    script = folder / 'scontrol'
    script.write_text(
        f'#!{sys.executable}\nimport os, signal, sys, time\n'
        'os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.2)\nsys.exit(0)\n'
    )
    script.chmod(0o755)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    message = slurm.requeue(signal.SIGUSR1, {'SLURM_JOB_ID': '42', 'PATH': str(folder)})
    assert message == 'requeued SLURM job 42: it continues from here by itself (--resume auto)'
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before  # the caller's mask kept
    # the same process without the blocked signal: killed by it, as scontrol was under SLURM
    done = subprocess.run([str(script)], capture_output=True)
    assert done.returncode == -signal.SIGTERM


def test_sigusr1_asks_for_a_stop_and_a_later_signal_keeps_the_first(capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        stop = bookkeeping.GracefulStop()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert stop.requested and stop.name == 'SIGUSR1'
        os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends once the job is requeued
        time.sleep(0.01)
        assert stop.name == 'SIGUSR1'
        assert capsys.readouterr().out.count('received: finishing the current step') == 1
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------- two forked ranks


def start_rank(env, args, cwd, log):
    """A forked child that is ``python main_supcon.py args`` in ``cwd`` with ``env``."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        target = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, 1)
        os.dup2(target, 2)
        sys.stdout = sys.stderr = open(1, 'w', buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        torch.set_num_threads(1)
        sys.argv = [str(REPO / 'main_supcon.py')] + args
        code = 0
        try:
            runtime.launch(main_supcon.main)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
    finally:
        os._exit(code)


def run_ranks(envs, cwd, signal_at=None):
    """Two ranks of main_supcon.py; ``signal_at=(condition, signum)`` signals both once
    ``condition(rank 0's output)`` holds. Returns (exit codes, rank 0's output)."""
    cwd.mkdir(parents=True, exist_ok=True)
    logs = [cwd / f'rank{rank}.log' for rank in range(len(envs))]
    pids = [start_rank(env, ARGS, cwd, str(log)) for env, log in zip(envs, logs)]
    codes, deadline = {}, time.monotonic() + TIMEOUT_S
    while len(codes) < len(pids) and time.monotonic() < deadline:
        if signal_at and signal_at[0](text_of(logs[0])):
            for pid in pids:
                os.kill(pid, signal_at[1])
            signal_at = None
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    for pid in set(pids) - set(codes):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    output = logs[0].read_text()
    assert len(codes) == len(pids), 'timed out:\n' + output[-3000:]
    return [codes[pid] for pid in pids], output


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """(last.pth, rank 0's output) of two ranks started with torchrun's variables."""
    cwd = tmp_path_factory.mktemp('torchrun_vars')
    datasets.build_dataset('digits', 'train', None)  # cached once here, not in every fork
    port = slurm.master_port(free_job_id())
    envs = [
        clean_env(
            WORLD_SIZE='2',
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE='2',
            MASTER_ADDR='127.0.0.1',
            MASTER_PORT=str(port),
        )
        for rank in range(2)
    ]
    codes, output = run_ranks(envs, cwd)
    assert codes == [0, 0], output[-3000:]
    return cwd / RUN_FOLDER / 'last.pth', output


@pytest.mark.slow
@FORK_OK
@needs_fork
def test_two_tasks_with_slurm_variables_are_one_run_of_two_ranks(reference, tmp_path):
    job_id = free_job_id()
    envs = [clean_env(**slurm_task(rank, job_id=job_id)) for rank in range(2)]
    codes, output = run_ranks(envs, tmp_path)
    assert codes == [0, 0], output[-3000:]
    assert '  world_size: 2\n' in output and output.count('epoch 2, total time') == 1
    assert max_abs_diff(reference[0], tmp_path / RUN_FOLDER / 'last.pth') == 0


@pytest.mark.slow
@FORK_OK
@needs_fork
def test_sigusr1_saves_requeues_and_the_restarted_job_ends_as_uninterrupted(reference, tmp_path):
    """SIGUSR1 (a requeue), then SLURM's SIGTERM, each followed by the restart SLURM makes:
    the end has the weights of the uninterrupted run."""
    job_id = free_job_id()
    log = fake_scontrol(tmp_path / 'bin')
    path = str(tmp_path / 'bin') + os.pathsep + os.environ.get('PATH', '')
    folder = tmp_path / RUN_FOLDER

    def envs(restarts):
        extra = {'SLURM_RESTART_COUNT': str(restarts)} if restarts else {}
        return [clean_env(PATH=path, **slurm_task(r, job_id=job_id, **extra)) for r in range(2)]

    codes, output = run_ranks(envs(0), tmp_path, signal_at=(first_step, signal.SIGUSR1))
    assert codes == [128 + signal.SIGUSR1] * 2, output[-3000:]
    ckpt = checkpoint.load_checkpoint(str(folder / 'checkpoint.pth'))
    epoch, step = ckpt['epoch'] + 1, ckpt['step']  # stopped after `step` steps of `epoch`
    assert 1 <= step <= STEPS
    assert stops(output) == [
        f'stopped by SIGUSR1 at epoch {epoch}, step {step}; saved {RUN_FOLDER}/checkpoint.pth.'
        f' requeued SLURM job {job_id}: it continues from here by itself (--resume auto)'
    ]
    assert log.read_text() == f'requeue {job_id}\n'  # rank 0 alone, once

    codes, output = run_ranks(envs(1), tmp_path, signal_at=(step_after_resume, signal.SIGTERM))
    assert codes == [128 + signal.SIGTERM] * 2, output[-3000:]
    assert f'continuing at epoch {epoch}, step {step + 1}' in output
    ckpt = checkpoint.load_checkpoint(str(folder / 'checkpoint.pth'))
    assert (ckpt['epoch'] + 1, ckpt['step']) > (epoch, step)
    (stopped,) = stops(output)
    assert stopped.startswith(f'stopped by SIGTERM at epoch {ckpt["epoch"] + 1}, step ')
    assert 'Continue with: srun <the same srun options> python' in stopped
    assert log.read_text() == f'requeue {job_id}\n'  # SIGTERM: no requeue of its own

    codes, output = run_ranks(envs(2), tmp_path)
    assert codes == [0, 0], output[-3000:]
    assert f'continuing at epoch {ckpt["epoch"] + 1}, step {ckpt["step"] + 1}' in output
    assert max_abs_diff(reference[0], folder / 'last.pth') == 0


def first_step(output):
    return 'Train: [1][1/' in output


def step_after_resume(output):
    """A step printed after the run resumed: its signal handlers are in place."""
    return 'Train: [' in output.partition('resumed from')[2]


def stops(output):
    return [line for line in output.splitlines() if line.startswith('stopped by')]


# --------------------------------------------------------------------------- run_with_submitit


@pytest.mark.slow
def test_submitit_help_needs_no_slurm(tmp_path):
    env = clean_env(PATH=str(tmp_path))  # no sbatch, no scontrol
    done = subprocess.run(
        [sys.executable, str(REPO / 'run_with_submitit.py'), '--help'],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = ' '.join(done.stdout.split())
    for flag in ('--nodes', '--ngpus', '--timeout', '--partition', '--job_dir', '--script'):
        assert flag in text
    assert 'Flags not listed here go to the script' in text


def test_submitit_splits_flags_and_refuses_without_sbatch(monkeypatch, tmp_path, capsys):
    opt, rest = run_with_submitit.parse_option(['--nodes', '2', '--script', 'main_ce'] + ARGS)
    assert (opt.nodes, opt.ngpus, opt.script, rest) == (2, 8, 'main_ce', ARGS)
    with pytest.raises(UserError, match='--script main_tsne.py: choose one of main_supcon.py'):
        run_with_submitit.script_name('main_tsne.py')
    (tmp_path / 'empty').mkdir()
    monkeypatch.setenv('PATH', str(tmp_path / 'empty'))
    monkeypatch.setattr(sys, 'argv', ['run_with_submitit.py', '--ngpus', '0'] + ARGS)
    with pytest.raises(SystemExit) as info:
        runtime.launch(run_with_submitit.main)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count('\n') == 1
    assert err.startswith('error: sbatch is not on the PATH') and 'python main_supcon.py' in err
    # the script's own flags are checked before anything is submitted
    monkeypatch.setattr(sys, 'argv', ['run_with_submitit.py', '--learning_rate', '-1'])
    with pytest.raises(SystemExit) as info:
        runtime.launch(run_with_submitit.main)
    assert info.value.code == 2 and '--learning_rate' in capsys.readouterr().err


def test_submitit_checkpoint_hook_resubmits_with_resume_auto():
    pytest.importorskip('submitit')
    trainer = run_with_submitit.Trainer('main_supcon', ARGS + ['--resume', 'old.pth'], '/x')
    delayed = trainer.checkpoint()
    again = delayed.function
    assert isinstance(again, run_with_submitit.Trainer) and again is not trainer
    assert again.args == ARGS + ['--resume', 'auto'] and again.cwd == '/x'
    assert (again.script, trainer.args[-1]) == ('main_supcon', 'old.pth')
    assert pickle.loads(pickle.dumps(again)).args == again.args


# --------------------------------------------------------------------------- a real SLURM


def slurm_up():
    """Why the real-SLURM tests cannot run here, or '' when a node takes jobs."""
    if shutil.which('sbatch') is None or shutil.which('sinfo') is None:
        return 'no SLURM on this machine (tests/slurm/start_local_slurm.sh starts one)'
    try:
        done = subprocess.run(
            ['sinfo', '-h', '-o', '%t'], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f'sinfo did not answer ({exc})'
    if done.returncode or not re.search(r'idle|mix|alloc', done.stdout):
        return f'SLURM has no node taking jobs ({(done.stderr or done.stdout).strip()[:200]})'
    return ''


@pytest.fixture(scope='session')
def real_slurm():
    """Skips, with the reason, where no SLURM node takes jobs. Asked when a real-SLURM test
    runs, not at collection: a stopped controller keeps sinfo waiting for seconds."""
    down = slurm_up()
    if down:
        pytest.skip(down)


needs_slurm = pytest.mark.usefixtures('real_slurm')


def job_state(job_id):
    """(state, restarts) of a job, from ``scontrol show job``."""
    text = subprocess.run(
        ['scontrol', 'show', 'job', '-o', job_id], capture_output=True, text=True, timeout=30
    ).stdout
    state = re.search(r'JobState=(\S+)', text)
    restarts = re.search(r'Restarts=(\d+)', text)
    return (state.group(1) if state else 'GONE'), int(restarts.group(1)) if restarts else 0


def wait_for(condition, what, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f'timed out waiting for {what}')


def release_after_requeue(job_id, restarts):
    """Wait for the requeued job, then let it start now: SLURM holds one for ~2 minutes."""
    wait_for(lambda: job_state(job_id) == ('PENDING', restarts), f'job {job_id} requeued')
    subprocess.run(['scontrol', 'update', f'JobId={job_id}', 'StartTime=now'], check=True)


def finished(job_id):
    state, _ = job_state(job_id)
    return state if state in ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'GONE') else ''


def sbatch(folder, log):
    """An sbatch job of 2 tasks, 1 CPU each, running main_supcon.py with srun; its id."""
    script = folder / 'job.sh'
    script.write_text(
        '#!/bin/bash\n'
        '#SBATCH --ntasks=2\n#SBATCH --cpus-per-task=1\n#SBATCH --time=10\n'
        f'#SBATCH --output={log}\n#SBATCH --open-mode=append\n#SBATCH --signal=USR1@60\n'
        f'cd {folder}\n'
        f'srun {sys.executable} {REPO / "main_supcon.py"} {" ".join(ARGS)}\n'
    )
    done = subprocess.run(
        ['sbatch', '--parsable', str(script)],
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=str(REPO)),
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(';')[0]


@needs_slurm
def test_sbatch_job_signalled_and_requeued_ends_as_uninterrupted(reference, tmp_path):
    """An sbatch job of two tasks trains as two ranks. SIGUSR1: the job requeues itself; then
    ``scontrol requeue``: SLURM requeues it; each time the job starts again and continues from
    the position it saved, and it ends as torchrun's uninterrupted two ranks did."""
    log = tmp_path / 'job.out'
    job_id = sbatch(tmp_path, log)
    wait_for(lambda: first_step(text_of(log)), 'step 1')
    subprocess.run(['scancel', '--signal=USR1', job_id], check=True)
    release_after_requeue(job_id, 1)
    wait_for(lambda: step_after_resume(text_of(log)), 'a step after the first resume')
    subprocess.run(['scontrol', 'requeue', job_id], check=True)
    release_after_requeue(job_id, 2)
    assert wait_for(lambda: finished(job_id), f'job {job_id}') == 'COMPLETED', text_of(log)
    events = [
        line
        for line in log.read_text().splitlines()
        if line.startswith(('stopped by', 'resumed from', 'saved'))
    ]
    print(f'sbatch job {job_id}:\n' + '\n'.join(events))
    assert len(events) == 5, events
    # every start (the first and two requeued ones) was one run of two ranks
    assert log.read_text().count('  world_size: 2\n') == 3, text_of(log)
    first = re.match(
        r'stopped by SIGUSR1 at epoch (\d), step (\d+); saved (\S+)\. (.*)$', events[0]
    )
    assert first and first.group(3) == f'{RUN_FOLDER}/checkpoint.pth', events[0]
    assert first.group(4) == (
        f'requeued SLURM job {job_id}: it continues from here by itself (--resume auto)'
    )
    epoch, step = int(first.group(1)), int(first.group(2))
    assert events[1].endswith(f'continuing at epoch {epoch}, step {step + 1}')
    second = re.match(r'stopped by SIGTERM at epoch (\d), step (\d+);', events[2])
    assert second and (int(second.group(1)), int(second.group(2))) > (epoch, step), events[2]
    assert events[3].endswith(
        f'continuing at epoch {second.group(1)}, step {int(second.group(2)) + 1}'
    )
    assert events[4] == f'saved {RUN_FOLDER}/last.pth'
    assert max_abs_diff(reference[0], tmp_path / RUN_FOLDER / 'last.pth') == 0


@needs_slurm
def test_run_with_submitit_submits_and_its_checkpoint_hook_resumes(reference, tmp_path):
    pytest.importorskip('submitit')
    done = subprocess.run(
        [sys.executable, str(REPO / 'run_with_submitit.py'), '--ngpus', '0']
        + ['--ntasks_per_node', '2', '--cpus_per_task', '1', '--timeout', '10']
        + ['--job_dir', str(tmp_path / 'jobs' / '%j')]
        + ARGS,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    job_id = re.match(
        r'submitted job (\d+): 1 node\(s\) x 2 task\(s\) of main_supcon.py', done.stdout
    )
    assert job_id, done.stdout
    job_id = job_id.group(1)
    log = tmp_path / 'jobs' / job_id / f'{job_id}_0_log.out'
    ckpt = tmp_path / RUN_FOLDER / 'checkpoint.pth'
    wait_for(ckpt.exists, 'the checkpoint of epoch 1')
    # submitit's own signal: its handler calls Trainer.checkpoint and requeues
    subprocess.run(['scancel', '--signal=USR2', job_id], check=True)
    release_after_requeue(job_id, 1)
    assert wait_for(lambda: finished(job_id), f'job {job_id}') == 'COMPLETED', text_of(log)
    output = log.read_text()
    events = [line for line in output.splitlines() if line.startswith(('resumed from', 'saved'))]
    print(f'submitit job {job_id}:\n' + '\n'.join(events))
    assert len(events) == 2 and events[1] == f'saved {RUN_FOLDER}/last.pth', events
    assert events[0].endswith(f'{RUN_FOLDER}/checkpoint.pth: continuing at epoch 2')
    submitit_log = text_of(log.with_name(f'{job_id}_0_log.err'))
    assert 'Caught signal SIGUSR2' in submitit_log, submitit_log[-2000:]
    # what Trainer.checkpoint handed submitit is what the requeued job ran
    from submitit.core.utils import DelayedSubmission

    again = DelayedSubmission.load(log.with_name(f'{job_id}_submitted.pkl'))
    assert again.function.args == ARGS + ['--resume', 'auto']
    with open(tmp_path / 'jobs' / job_id / f'{job_id}_0_result.pkl', 'rb') as handle:
        assert pickle.load(handle) == ('success', None)
    assert max_abs_diff(reference[0], tmp_path / RUN_FOLDER / 'last.pth') == 0
