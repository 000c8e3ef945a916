"""Checkpoint files: atomic saves, safe loading, wrapper-free keys, RNG state, and choosing
the checkpoint to resume from.

Files are written atomically (a kill never leaves a truncated checkpoint) and
read with ``weights_only=True`` (a checkpoint can never run code). The run that
writes them (resume, per-epoch saves, signals) is ``bookkeeping.Bookkeeper``.
"""

import argparse
import contextlib
import errno
import glob
import os
import random
import re
import tempfile

import numpy as np
import torch

from supcon.errors import UserError
from supcon.system.atomic import atomic_save
from supcon.system.runtime import is_main_process, unwrap

# the look-behind leaves the dot unconsumed, so nested wrappers (module._orig_mod.) all go
_WRAPPER_KEY = re.compile(r'(^|(?<=\.))(module|_orig_mod)\.')


def strip_wrapper_keys(state_dict: dict) -> dict:
    """Drop ``module.``/``_orig_mod.`` segments left by DataParallel, DDP or compile."""
    return {_WRAPPER_KEY.sub(r'\1', key): value for key, value in state_dict.items()}


def bare_state_dict(model: torch.nn.Module) -> dict:
    return strip_wrapper_keys(unwrap(model).state_dict())


def load_bare_state_dict(model: torch.nn.Module, state_dict: dict) -> None:
    """Load wrapper-free keys into a model whose sub-modules may be wrapped."""
    target = unwrap(model)
    actual = {_WRAPPER_KEY.sub(r'\1', key): key for key in target.state_dict()}
    target.load_state_dict({actual.get(key, key): value for key, value in state_dict.items()})


# --------------------------------------------------------------------------- files


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` to ``path`` atomically (``atomic.atomic_save``); only rank 0 writes.

    A kill at any moment leaves either the previous file or the new one. A full disk or
    an unwritable folder becomes one ``UserError`` line saying what was kept.
    """
    if not is_main_process():
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_save(state, path)
    except OSError as exc:  # full disk, quota, I/O error: the old file is intact
        raise UserError(_write_error(exc, path)) from None


def _write_error(exc, path):
    """One line for an OSError while saving ``path``: what happened, what is kept, the fix."""
    folder = os.path.dirname(os.path.abspath(path))
    kept = (
        f'the previous {os.path.basename(path)} is intact'
        if os.path.isfile(path)
        else 'no checkpoint was half-written'
    )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = 'no space left on device' if exc.errno == errno.ENOSPC else 'disk quota exceeded'
        return (
            f'{what} while saving {path}; {kept}: free some space, then continue with --resume auto'
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f'cannot write checkpoints to {folder} ({exc.strerror or exc}): make it'
            f' writable, or start the script from a folder you can write to (it saves'
            f' under ./save/ there)'
        )
    return (
        f'cannot save {path} ({exc.strerror or exc}); {kept}: fix the folder, then continue'
        f' with --resume auto'
    )


def folder_write_problem(folder: str) -> str | None:
    """Why files cannot be created in ``folder`` (which may not exist yet), or None.

    Tries a temporary file in the deepest folder that exists and removes it again, so
    a run learns before its first epoch that it could not save; creates nothing.
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f'{existing} is a file, not a folder'
    try:
        fd, probe = tempfile.mkstemp(prefix='.write_test.', suffix='.tmp', dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return f'{existing}: {exc.strerror or exc}'
    return None


def file_write_problem(path: str) -> str | None:
    """Why the file ``path`` could not be written (a folder, read-only, an unwritable
    folder), or None; creates nothing."""
    if os.path.isdir(path):
        return 'it is a directory'
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return 'the file is read-only'
    return folder_write_problem(os.path.dirname(os.path.abspath(path)))


def named_tensors(obj, prefix=''):
    """(dotted name, tensor) of every tensor inside nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from named_tensors(value, f'{prefix}.{key}' if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from named_tensors(value, f'{prefix}.{i}' if prefix else str(i))


def first_nonfinite(obj):
    """The name of the first floating-point tensor in ``obj`` holding NaN or inf, else None.

    One reduction per tensor and one host sync per device, so it is cheap before every save.
    """
    by_device = {}
    for name, tensor in named_tensors(obj):
        if tensor.is_floating_point() or tensor.is_complex():
            by_device.setdefault(tensor.device, []).append((name, tensor))
    for items in by_device.values():
        finite = torch.stack([torch.isfinite(t).all() for _, t in items])
        if not bool(finite.all()):
            return items[int((~finite).nonzero()[0])][0]
    return None


def checkpoint_position(ckpt):
    """(epoch, step) a training checkpoint records, or None when it records none."""

    def whole(value):
        if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point():
            value = value.item()
        return (
            value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
        )

    epoch, step = whole(ckpt.get('epoch')), whole(ckpt.get('step', 0))
    return None if epoch is None or step is None else (epoch, step)


def _read_error(exc, path, flag):
    """One line for a file torch.load refused; never suggests loading it unsafely."""
    text = str(exc)
    found = re.search(r'GLOBAL ([\w.]+)', text)
    if found:
        return (
            f'{flag} {path} holds pickled code or objects other than weights'
            f' ({found.group(1)}), so it was refused: checkpoints are loaded without running'
            f' anything they contain; pass a checkpoint of tensors written by these scripts'
            f' or the reference'
        )
    if 'Weights only load failed' in text:
        reason = 'not a file of tensors as torch.save writes them'
    else:
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        reason = first.split('. ')[0].rstrip('.')
        if len(reason) > 160:
            reason = reason[:160].rsplit(' ', 1)[0] + ' ...'
        if 'weights_only' in reason:
            reason = type(exc).__name__
    return (
        f'{flag} {path} is not a readable checkpoint ({reason}); it may be truncated or not'
        f' written by these scripts: pass another file'
    )


def load_checkpoint(path: str, flag: str = '--ckpt', mmap: bool = False) -> dict:
    """Load with ``weights_only=True``; accepts the reference's checkpoints.

    The reference stores its options as an ``argparse.Namespace``: it is the one
    class allowed besides tensors and plain containers, and is turned into a dict.
    ``mmap=True`` maps the file instead of reading it, for a cheap look at the options.
    """
    if path and os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith('.pth'))
        example = f', e.g. {os.path.join(path, inside[-1])}' if inside else ''
        raise UserError(
            f'{flag} {path} is a directory, not a checkpoint file; pass a .pth file{example}'
        )
    if not path or not os.path.isfile(path):
        raise UserError(
            f'{flag} {path}: no such file; pass the path of a .pth file written'
            f' by main_supcon.py, main_ce.py or main_linear.py'
        )
    try:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not (mmap and 'mmap can only be used' in str(exc)):
                raise
            # a file in torch's legacy (pre-1.6, not zip) format: read it instead of mapping it
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, forbidden pickled code
        raise UserError(_read_error(exc, path, flag)) from None
    if (
        isinstance(ckpt, dict)
        and not isinstance(ckpt.get('model'), dict)
        and isinstance(ckpt.get('state_dict'), dict)
    ):
        ckpt = dict(ckpt, model=ckpt['state_dict'])  # the usual name outside SupContrast
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {'model': ckpt}  # a bare state dict
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise UserError(
            f'{flag} {path} is not a SupContrast checkpoint (it has no model'
            f' weights under "model"); pass a .pth written by these scripts'
        )
    if not all(
        isinstance(key, str) and torch.is_tensor(value) for key, value in ckpt['model'].items()
    ):
        raise UserError(
            f'{flag} {path} is not a SupContrast checkpoint (its "model" entry holds'
            f' other things than named tensors); pass a .pth written by these scripts'
        )
    if isinstance(ckpt.get('opt'), argparse.Namespace):
        ckpt['opt'] = vars(ckpt['opt'])
    if ckpt.get('opt') is None:
        ckpt['opt'] = {}
    if not isinstance(ckpt['opt'], dict):
        raise UserError(
            f'{flag} {path} stores its options ("opt") as a'
            f' {type(ckpt["opt"]).__name__}, not the dict or Namespace these scripts'
            f' and the reference write; pass a checkpoint written by them'
        )
    ckpt['model'] = strip_wrapper_keys(ckpt['model'])
    return ckpt


def rng_state():
    np_state = np.random.get_state(legacy=False)
    state = {
        'python': random.getstate(),
        'numpy_key': torch.from_numpy(np_state['state']['key'].astype(np.int64)),
        'numpy_pos': int(np_state['state']['pos']),
        'numpy_gauss': (int(np_state['has_gauss']), float(np_state['gauss'])),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    if not state:
        return
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        {
            'bit_generator': 'MT19937',
            'state': {
                'key': state['numpy_key'].numpy().astype(np.uint32),
                'pos': state['numpy_pos'],
            },
            'has_gauss': state['numpy_gauss'][0],
            'gauss': state['numpy_gauss'][1],
        }
    )
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state['cuda'])


def resume_problem(ckpt):
    """(what is wrong, what to do) when ``ckpt`` cannot be continued from, else None."""
    if checkpoint_position(ckpt) is None:
        return (
            'it records no epoch to continue from (no whole number under "epoch")',
            'pass a checkpoint.pth, ckpt_epoch_N.pth or last.pth written by this script',
        )
    bad = first_nonfinite(ckpt)
    if bad is not None:
        return (
            f'it holds NaN or infinite values ({bad}): it was saved from a diverged run',
            'resume from an earlier checkpoint of the run',
        )
    return None


def newest_checkpoint(folder: str, quiet: bool = False) -> str | None:
    """The checkpoint of a run folder that is furthest in training, or None.

    Files are ranked by the (epoch, step) they record, not by their time stamps (a copy
    or ``touch`` changes those); ties go to the newer file. Unreadable files, files
    without an epoch and files with NaN or infinite values are skipped with a note.
    The files are mapped rather than read, and only the chosen one is read in full.
    """

    def skip(path, why):
        if not quiet and is_main_process():
            print(f'note: --resume auto skips {path}: {why}')

    candidates = []
    for path in glob.glob(os.path.join(folder, '*.pth')):
        try:
            ckpt = load_checkpoint(path, flag='--resume', mmap=True)
            mtime = os.path.getmtime(path)
        except (UserError, OSError):
            skip(path, 'not a readable checkpoint')
            continue
        position = checkpoint_position(ckpt)
        if position is None:
            skip(path, 'it records no epoch')
            continue
        candidates.append((position, mtime, path, ckpt))
    candidates.sort(key=lambda item: item[:3], reverse=True)
    for _, _, path, ckpt in candidates:
        problem = resume_problem(ckpt)
        if problem:
            skip(path, problem[0])
            continue
        return path
    return None


def plain_options(opt):
    """The options as a dict of plain values, safe for ``weights_only`` loading."""
    plain = {}
    for key, value in vars(opt).items():
        if isinstance(value, torch.device):
            value = str(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            plain[key] = value
        elif isinstance(value, (list, tuple)) and all(
            isinstance(v, (bool, int, float, str)) for v in value
        ):
            plain[key] = list(value)
    return plain
