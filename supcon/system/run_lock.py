"""One live run per save folder: the ``.lock`` file rank 0 takes before anything is written.

Two runs writing one folder overwrite each other's checkpoints: a ``--resume auto`` run and
the workers that a ``kill -9`` of the torchrun agent left running, for one. ``acquire``
creates ``<folder>/.lock`` with ``O_CREAT | O_EXCL``, so of two runs starting together
exactly one creates it, and writes its host and process id into it. The lock goes when the
run ends (``Bookkeeper.close``, ``runtime.launch`` after an error, or interpreter exit). A lock
left on this host by a process that is gone (``kill -9``) is taken over; one from another
host cannot be checked from here and is refused, naming the host and process to look at.
Two runs taking over the same dead lock at once do it one after the other (``_takeover``), so
that the second finds the first's lock, alive, instead of removing it.
"""

import atexit
import contextlib
import fcntl
import json
import os
import socket
import time

from supcon.errors import UserError

LOCK_NAME = '.lock'

#: lock path -> (the text this process wrote into it, the folders it created for it)
_HELD = {}


def _process_start(pid):
    """When process ``pid`` started (clock ticks since boot; Linux), or None if unknown.

    Stored with the pid so that a pid the system has since given to another process does
    not keep a dead run's lock alive.
    """
    try:
        with open(f'/proc/{pid}/stat') as f:
            # the command name (field 2) may hold spaces: count fields after its ')'
            return int(f.read().rsplit(')', 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder):
    """Whether the process a lock on this host names still runs."""
    pid = holder['pid']
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    start = holder.get('start')
    return start is None or _process_start(pid) in (None, start)


def _read_holder(path):
    """(raw text, {'host', 'pid', ...}) of a lock file; the dict is None while it says no host
    and pid (just created, not yet written); (None, None) when the file is gone."""
    try:
        with open(path) as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(raw)
        if isinstance(holder.get('host'), str) and isinstance(holder.get('pid'), int):
            return raw, holder
    except (ValueError, AttributeError):
        pass
    return raw, None


#: called between reading a lock file and removing it (tests widen that window with it)
_BEFORE_REMOVE = None


@contextlib.contextmanager
def _takeover(path):
    """Serialise takeovers of the lock ``path`` among the processes of this host (only they take
    a lock over: another host's is refused) with an exclusive ``flock`` on its folder, which
    leaves no file behind and which the kernel releases when its holder dies."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _remove_if_unchanged(path, raw):
    """Remove the lock file if it still holds ``raw`` (another run may have replaced it);
    whether it did."""
    current, _ = _read_holder(path)
    if current != raw:
        return False
    if _BEFORE_REMOVE is not None:
        _BEFORE_REMOVE()
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def acquire(folder):
    """Take ``folder``'s lock (creating the folder); returns a note if a dead run's was taken over.

    Raises ``UserError`` when a live run holds it, or when the file never says who does.
    """
    created, missing = [], os.path.abspath(folder)  # absolute: still right after a chdir
    while not os.path.exists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.path.abspath(folder), LOCK_NAME)
    host, pid = socket.gethostname(), os.getpid()
    text = json.dumps(
        {'host': host, 'pid': pid, 'start': _process_start(pid), 'since': time.ctime()}
    )
    note = None
    for _ in range(10):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raw, holder = _read_holder(path)
            if holder is None:
                time.sleep(0.1)  # gone, or being written by its creator: look again
                continue
            ours = holder['host'] == host and holder['pid'] == pid  # an earlier run of ours
            if not ours and (holder['host'] != host or _alive(holder)):
                here = holder['host'] == host
                check = (
                    f'stop it (kill {holder["pid"]}) or wait for it to end'
                    if here
                    else f'if it no longer runs there, remove {path}'
                )
                raise UserError(
                    f'another run is writing {folder}: process {holder["pid"]} on host'
                    f' {holder["host"]}{" (this one)" if here else ""}, since'
                    f' {holder.get("since", "?")} (its {LOCK_NAME}); {check}, then start again'
                ) from None
            if ours:
                _remove_if_unchanged(path, raw)
                continue
            with _takeover(path):
                # under the guard the file is still the dead run's, or gone, or the newer lock
                # of a takeover before ours (which stays)
                if _remove_if_unchanged(path, raw):
                    note = (
                        f'took over {path} from process {holder["pid"]} on this host, which is'
                        f' no longer running (it was killed before it could remove its lock)'
                    )
            continue
        with os.fdopen(fd, 'w') as f:
            f.write(text)
        _HELD[path] = text, created
        return note
    raise UserError(
        f'{path} exists but does not say which run holds it; if no run is writing {folder},'
        f' remove it and start again'
    )


@atexit.register  # also after sys.exit; a kill -9 leaves the lock to be taken over
def release(folder=None):
    """Remove the locks this process holds (``folder``'s, or all), never another run's, and
    the folders taken for them that stayed empty (a run that failed before saving)."""
    paths = [os.path.join(os.path.abspath(folder), LOCK_NAME)] if folder else list(_HELD)
    for path in paths:
        text, created = _HELD.pop(path, (None, []))
        if text is None or json.loads(text)['pid'] != os.getpid():  # a forked child's copy
            continue
        _remove_if_unchanged(path, text)
        for empty in created:  # deepest first; stops at the first that holds something
            try:
                os.rmdir(empty)
            except OSError:
                break
