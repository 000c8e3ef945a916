"""The one atomic write behind every file the project saves (checkpoints, ``util.save_model``,
main_retrieval.py's results).

A temporary file in the target's folder, flushed and synced, then renamed over the
target: a kill at any moment leaves the previous file or the new one, never a
truncated one. Errors are raised as they come (``OSError``); callers word them.
"""

import contextlib
import os
import tempfile

import torch


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically; the folder must exist."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write(path: str, write) -> None:
    """``write(f)`` into a binary file that becomes ``path`` atomically; the folder must exist.

    On any failure the temporary file is removed and the exception re-raised.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        # mkstemp makes the file private (0600); give it what torch.save's open() would
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
