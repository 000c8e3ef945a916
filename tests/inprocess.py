"""Running a script's ``main()`` in the test process (``call``), as ``python <script>.py``
would, and the one-line error check (conftest.py gives every module one intra-op thread).

Importing torch again per run would cost most of the test time, so uninterrupted runs
and resumes happen here; runs that must be killed or signalled are real subprocesses
(``test_resume.spawn``).
"""

import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from supcon.system import run_lock, runtime

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    code: int
    out: str
    err: str


def call(script, args, cwd):
    """``python <script>.py args`` from ``cwd``, run in this process."""
    module = importlib.import_module(script)
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    argv, here = sys.argv, os.getcwd()
    sys.argv = [str(REPO / f'{script}.py')] + [str(a) for a in args]
    os.chdir(cwd)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runtime.launch(module.main)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return Result(code, out.getvalue(), err.getvalue())


def run(script, args, cwd):
    """``call`` with ``subprocess.run``'s result: ``returncode``, ``stdout``, ``stderr``."""
    result = call(script, args, cwd)
    return subprocess.CompletedProcess(
        [script, *map(str, args)], result.code, result.out, result.err
    )


def save_folder(script, args, cwd):
    return (
        Path(cwd) / importlib.import_module(script).parse_option([str(a) for a in args]).save_folder
    )


def assert_one_line_error(result, *fragments):
    assert result.code == 2, result.out + result.err
    message = result.err.strip()
    assert '\n' not in message and message.startswith('error: '), result.err
    for fragment in fragments:
        assert fragment in message, message


class Forked:
    """``python <script>.py args`` from ``cwd`` in a child forked from this process, which has
    imported torch already (a fresh interpreter spends seconds on that): its own pid, signal
    handlers, working folder and exit code, stdout and stderr merged into ``stdout`` line by line.
    The part of ``subprocess.Popen`` the kill-and-resume tests use: ``stdout``, ``poll``,
    ``wait``, ``kill``, ``send_signal``, ``returncode`` (``-signal`` when killed by one)."""

    def __init__(self, script, args, cwd):
        module = importlib.import_module(script)
        argv = [str(REPO / f'{script}.py')] + [str(a) for a in args]
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 70
            try:
                os.close(read)
                code = _be_the_script(module, argv, cwd, write)
            finally:
                os._exit(code)
        os.close(write)
        self.stdout = io.TextIOWrapper(io.FileIO(read, 'r'), encoding='utf-8')
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, signum):
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def _be_the_script(module, argv, cwd, fd):
    """In the forked child: output to ``fd``, default signal handlers, ``sys.argv``, ``cwd``;
    run the script's main as the interpreter would and return its exit code."""
    import traceback

    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), line_buffering=True)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = argv
    os.chdir(cwd)
    code = 0
    try:
        runtime.launch(importlib.import_module(module.__name__).main)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    run_lock.release()  # what atexit would do; the other atexit functions are pytest's
    sys.stdout.flush()
    sys.stderr.flush()
    return code
