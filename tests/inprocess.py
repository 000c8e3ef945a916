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
import sys
from dataclasses import dataclass
from pathlib import Path

from supcon.system import runtime

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
