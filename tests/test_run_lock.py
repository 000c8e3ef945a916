"""One live run per save folder (``supcon/system/run_lock.py``): real second processes, ``kill -9``,
a torchrun agent killed under its workers, locks of other hosts and of dead processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import free_port, script_env, write_image_folder
from inprocess import assert_one_line_error, call, save_folder

from supcon.errors import UserError
from supcon.system import run_lock

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    write_image_folder(root / 'train', {'a': 8, 'b': 8}, size=8)
    return root


def args(images, epochs=1000):
    """main_supcon on 16 images at 8x8: about a tenth of a second an epoch, so 1000 epochs
    keep a run alive for as long as a test needs it."""
    return [
        '--dataset',
        'path',
        '--data_folder',
        str(images / 'train'),
        '--mean',
        '(0.5, 0.5, 0.5)',
        '--std',
        '(0.25, 0.25, 0.25)',
        '--size',
        '8',
        '--batch_size',
        '8',
        '--epochs',
        str(epochs),
        '--num_workers',
        '0',
        '--model',
        'resnet18',
        '--device',
        'cpu',
        '--seed',
        '0',
        '--print_freq',
        '1000',
    ]


def start(launcher, script_args, cwd):
    return subprocess.Popen(
        launcher + [str(REPO / 'main_supcon.py')] + script_args,
        cwd=str(cwd),
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, killed as one at the end
    )


def wait_for_lock(path, proc, timeout=180):
    """The lock's contents once a run has taken it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f'the first run ended early:\n{proc.stdout.read()[-3000:]}')
        try:
            holder = json.loads(path.read_text())
            return holder
        except (OSError, ValueError):
            time.sleep(0.1)
    pytest.fail(f'no lock at {path} after {timeout} s')


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def second_run(images, cwd):
    """The same command again, as a real second process."""
    return subprocess.run(
        [sys.executable, str(REPO / 'main_supcon.py')] + args(images),
        cwd=str(cwd),
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


def assert_refused(result, folder, pid):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert lines[0].startswith(
        f'error: another run is writing {folder}: process {pid} on host {HOST} (this one), since'
    ), lines[0]
    assert f'stop it (kill {pid}) or wait for it to end, then start again' in lines[0]
    assert 'Train' not in result.stdout


@pytest.mark.slow
def test_a_live_run_keeps_its_folder_and_a_killed_ones_lock_is_taken_over(images, tmp_path):
    folder = save_folder('main_supcon', args(images), tmp_path)
    relative = os.path.join('.', os.path.relpath(folder, tmp_path))
    first = start([sys.executable], args(images), tmp_path)
    try:
        holder = wait_for_lock(folder / '.lock', first)
        assert (holder['host'], holder['pid']) == (HOST, first.pid)
        os.killpg(first.pid, signal.SIGSTOP)  # alive, holding its lock, leaving the CPU
        refused = second_run(images, tmp_path)
        assert first.poll() is None  # refused while the first run was still running
        assert_refused(refused, relative, first.pid)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # kill -9: no chance to remove its lock
        first.wait()
    assert json.loads((folder / '.lock').read_text())['pid'] == first.pid  # left behind

    result = call('main_supcon', args(images, epochs=1), tmp_path)
    assert result.code == 0, result.out[-2000:] + result.err
    note = (
        f'note: took over {folder / ".lock"} from process {first.pid} on this host, which is no'
        f' longer running (it was killed before it could remove its lock)\n'
    )
    assert result.out.count(note) == 1, result.out
    assert (folder / 'last.pth').exists() and not (folder / '.lock').exists()


@pytest.mark.slow
def test_workers_left_by_a_killed_torchrun_agent_keep_the_folder(images, tmp_path):
    folder = save_folder('main_supcon', args(images), tmp_path)
    relative = os.path.join('.', os.path.relpath(folder, tmp_path))
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2']
    agent = start(launcher + ['--master_port', str(free_port())], args(images), tmp_path)
    workers = []
    try:
        holder = wait_for_lock(folder / '.lock', agent, timeout=240)
        children = Path(f'/proc/{agent.pid}/task/{agent.pid}/children')
        workers = [int(pid) for pid in children.read_text().split()]
        assert holder['pid'] in workers  # rank 0 took it, not the agent
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        time.sleep(1)
        assert all(alive(pid) for pid in workers)  # the workers run on without their agent
        for pid in workers:  # paused, not ended, while the second run starts
            os.kill(pid, signal.SIGSTOP)
        assert_refused(second_run(images, tmp_path), relative, holder['pid'])
        # stopped politely, rank 0 saves and removes its lock on the way out
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 120
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (folder / '.lock').exists()
        assert (folder / 'checkpoint.pth').exists()
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


# --------------------------------------------------------------------------- the lock itself


def write_lock(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / '.lock').write_text(json.dumps(holder))


def test_another_hosts_lock_is_refused_naming_host_and_pid(images, tmp_path):
    folder = save_folder('main_supcon', args(images, epochs=1), tmp_path)
    write_lock(folder, host='gpu-node-7', pid=4242, since='Mon Jan  5 09:00:00 2026')
    result = call('main_supcon', args(images, epochs=1), tmp_path)
    relative = os.path.join('.', os.path.relpath(folder, tmp_path))
    assert_one_line_error(
        result,
        f'another run is writing {relative}: process 4242 on host gpu-node-7, since Mon Jan  5'
        f' 09:00:00 2026',
        f'if it no longer runs there, remove {folder / ".lock"}, then start again',
    )
    assert os.listdir(folder) == ['.lock']  # nothing written, the other run's lock kept


def test_a_lock_whose_pid_was_reused_is_taken_over(tmp_path):
    if run_lock._process_start(os.getppid()) is None:
        pytest.skip('no /proc: process start times are unknown here')
    # the parent process is alive, but it is not the process that wrote this lock
    write_lock(tmp_path, host=HOST, pid=os.getppid(), start=-1)
    note = run_lock.acquire(tmp_path)
    assert note and f'from process {os.getppid()} on this host' in note
    assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()
    run_lock.release(tmp_path)
    assert not (tmp_path / '.lock').exists()


def test_a_dead_process_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    write_lock(tmp_path, host=HOST, pid=dead.pid)
    assert f'from process {dead.pid} on this host' in run_lock.acquire(tmp_path)
    run_lock.release(tmp_path)


def _take_over_slowly(folder, results):
    """A run's acquire() with a long pause between reading the dead lock and removing it."""
    run_lock._BEFORE_REMOVE = lambda: time.sleep(0.5)
    try:
        note = run_lock.acquire(folder)
        results.put(('took', os.getpid(), note))
        time.sleep(2)  # alive while the other run looks at the lock
        run_lock.release(folder)
    except UserError as error:
        results.put(('refused', os.getpid(), str(error)))


@pytest.mark.slow
def test_two_runs_taking_over_one_dead_lock_at_once_leave_one_holder(tmp_path):
    """Once, both read the dead lock, then each removed what was there, the second removing the
    first's fresh lock: two runs in one folder. Now the takeovers queue on a flock."""
    import multiprocessing

    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    write_lock(tmp_path, host=HOST, pid=dead.pid)
    context = multiprocessing.get_context('fork')
    results = context.Queue()
    runs = [context.Process(target=_take_over_slowly, args=(tmp_path, results)) for _ in range(2)]
    for run in runs:
        run.start()
    outcomes = sorted((results.get(timeout=60) for _ in runs), key=lambda o: o[0] != 'took')
    for run in runs:
        run.join(timeout=60)
    (took, winner, note), (refused, _, error) = outcomes
    assert (took, refused) == ('took', 'refused'), outcomes
    # the winner took the dead run's lock over, or found it gone, removed by the other run
    assert note is None or f'from process {dead.pid} on this host' in note
    assert f'another run is writing {tmp_path}: process {winner} on host' in error
    assert sorted(os.listdir(tmp_path)) == []  # the winner released it, no guard file left


def test_a_live_process_lock_is_refused_and_release_never_removes_it(tmp_path):
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        write_lock(tmp_path, host=HOST, pid=sleeper.pid, start=run_lock._process_start(sleeper.pid))
        with pytest.raises(UserError, match=f'process {sleeper.pid} on host'):
            run_lock.acquire(tmp_path)
        run_lock.release(tmp_path)  # not ours: left alone
        assert json.loads((tmp_path / '.lock').read_text())['pid'] == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_that_names_no_process_is_refused(tmp_path):
    (tmp_path / '.lock').write_text('')  # its creator died before writing it
    with pytest.raises(UserError, match='does not say which run holds it; if no run is writing'):
        run_lock.acquire(tmp_path)


def test_the_lock_goes_when_a_run_ends_or_fails(images, tmp_path):
    folder = save_folder('main_supcon', args(images, epochs=1), tmp_path)
    result = call('main_supcon', args(images, epochs=1), tmp_path)
    assert result.code == 0, result.err
    assert sorted(os.listdir(folder)) == ['checkpoint.pth', 'last.pth']
    # fails after the lock was taken (the held-out split is checked with the loader)
    failing = args(images, epochs=1) + ['--val_split', '0.01']
    (tmp_path / 'other').mkdir()
    result = call('main_supcon', failing, tmp_path / 'other')
    assert_one_line_error(result, '--val_split 0.01: it holds out 1 of the 16 training images')
    assert os.listdir(tmp_path / 'other') == []  # neither a lock nor an empty save folder
