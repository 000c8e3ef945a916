"""Checkpoints and the resume/save bookkeeping of a run.

Files are written atomically (a kill never leaves a truncated checkpoint) and
read with ``weights_only=True`` (a checkpoint can never run code). ``Run``
holds one training run's resume state, its per-epoch saves and the SIGTERM /
Ctrl-C handling that saves the position before exiting.
"""
import argparse
import contextlib
import glob
import os
import random
import re
import shlex
import signal
import sys
import tempfile

import numpy as np
import torch

from options import plain_options
from runtime import cleanup_runtime, is_main_process, seed_everything, unwrap
from tb_logger import TBLogger
from util import UserError


# the look-behind leaves the dot unconsumed, so nested wrappers (module._orig_mod.) all go
_WRAPPER_KEY = re.compile(r'(^|(?<=\.))(module|_orig_mod)\.')


def strip_wrapper_keys(state_dict):
    """Drop ``module.``/``_orig_mod.`` segments left by DataParallel, DDP or compile."""
    return {_WRAPPER_KEY.sub(r'\1', key): value for key, value in state_dict.items()}


def bare_state_dict(model):
    return strip_wrapper_keys(unwrap(model).state_dict())


def load_bare_state_dict(model, state_dict):
    """Load wrapper-free keys into a model whose sub-modules may be wrapped."""
    target = unwrap(model)
    actual = {_WRAPPER_KEY.sub(r'\1', key): key for key in target.state_dict()}
    target.load_state_dict({actual.get(key, key): value for key, value in state_dict.items()})



# --------------------------------------------------------------------------- files


def save_checkpoint(state, path):
    """Write atomically: a temporary file, flushed and synced, then renamed.

    A kill at any moment leaves either the previous file or the new one, never
    a truncated checkpoint. Only the main process writes.
    """
    if not is_main_process():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                               dir=folder)
    try:
        # mkstemp makes the file private (0600); give it what torch.save's open() would
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, 'wb') as f:
            torch.save(state, f)
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


def load_checkpoint(path, flag='--ckpt', mmap=False):
    """Load with ``weights_only=True``; accepts the reference's checkpoints.

    The reference stores its options as an ``argparse.Namespace``: it is the one
    class allowed besides tensors and plain containers, and is turned into a dict.
    ``mmap=True`` maps the file instead of reading it, for a cheap look at the options.
    """
    if not path or not os.path.isfile(path):
        raise UserError(f'{flag} {path}: no such file; pass the path of a .pth file written'
                        f' by main_supcon.py, main_ce.py or main_linear.py')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated zip, random bytes, forbidden pickled code
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f'{flag} {path} is not a readable checkpoint ({reason}); it may be'
                        f' truncated or not written by these scripts: pass another file')
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise UserError(f'{flag} {path} is not a SupContrast checkpoint (it has no model'
                        f' weights under "model"); pass a .pth written by these scripts')
    if isinstance(ckpt.get('opt'), argparse.Namespace):
        ckpt['opt'] = vars(ckpt['opt'])
    ckpt.setdefault('opt', {})
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
    np.random.set_state({'bit_generator': 'MT19937',
                         'state': {'key': state['numpy_key'].numpy().astype(np.uint32),
                                   'pos': state['numpy_pos']},
                         'has_gauss': state['numpy_gauss'][0],
                         'gauss': state['numpy_gauss'][1]})
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, IndexError):
            torch.cuda.set_rng_state_all(state['cuda'])



# --------------------------------------------------------------------------- runs


class Run:
    """Resuming, per-epoch checkpoints and TensorBoard for one training run.

    The run's own ``checkpoint.pth`` is refreshed after every epoch (and on a
    signal), so a crash loses at most one epoch; ``ckpt_epoch_{N}.pth`` and
    ``last.pth`` are written as the reference does.
    """

    #: Options that define the run: resuming with another value is refused.
    FIXED = ('model', 'dataset', 'method', 'batch_size', 'size', 'stem', 'head', 'feat_dim',
             'temp', 'ckpt', 'seed', 'learning_rate', 'cosine', 'num_classes', 'weight_decay',
             'momentum', 'lr_decay_rate', 'lr_decay_epochs', 'warm')

    def __init__(self, opt, meters=None):
        """Find and read the ``--resume`` checkpoint; call before building loaders.

        The checkpoint's seed is adopted here (when --seed is not given), so data
        order and augmentation continue exactly where the run stopped.
        """
        self.opt = opt
        self.meters = meters or {}
        self.model = self.optimizer = self.scaler = None
        self.extra = {}
        self.start_epoch = 1
        self.start_step = 0
        self.stop = GracefulStop()
        self._writer = None
        self._ckpt, self._ckpt_path = None, None
        self._remove_stale_temporaries()  # left by a kill during a save; never loaded
        if opt.resume is None:
            return
        path = opt.resume
        if path == 'auto':
            path = newest_checkpoint(opt.save_folder)
            if path is None:
                if is_main_process():
                    print(f'--resume auto: no checkpoint in {opt.save_folder} yet; starting a'
                          f' fresh run')
                return
        self._ckpt, self._ckpt_path = load_checkpoint(path, flag='--resume'), path
        self._check_same_run(self._ckpt.get('opt', {}), path)

    def restore(self, model, optimizer, scaler=None):
        """Attach what is trained and restore its state; returns the first epoch to run."""
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        ckpt, path = self._ckpt, self._ckpt_path
        if ckpt is None:
            return self.start_epoch
        try:
            load_bare_state_dict(self.model, ckpt['model'])
        except RuntimeError:
            raise UserError(f'--resume {path}: its weights do not fit this model; resume with'
                            f' the options it was trained with') from None
        if 'optimizer' in ckpt:
            self.optimizer.load_state_dict(ckpt['optimizer'])
        if self.scaler is not None and ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt.get('rng'))
        for name, meter in self.meters.items():
            if name in ckpt.get('meters', {}):
                meter.load_state_dict(ckpt['meters'][name])
        self.extra = dict(ckpt.get('extra', {}))
        epoch, step = int(ckpt['epoch']), int(ckpt.get('step', 0))
        # a mid-epoch checkpoint records the last complete epoch and the steps done since
        self.start_epoch, self.start_step = epoch + 1, step
        self._ckpt = None
        if is_main_process():
            if self.start_epoch > self.opt.epochs:
                print(f'resumed from {path}: all {self.opt.epochs} epochs are done already')
            else:
                where = f'epoch {self.start_epoch}' + (f', step {step + 1}' if step else '')
                print(f'resumed from {path}: continuing at {where}')
        return self.start_epoch

    def _check_same_run(self, saved, path):
        opt = self.opt
        if not opt.seed_given and saved.get('seed') is not None:
            opt.seed = int(saved['seed'])
            seed_everything(opt.seed + opt.rank)
        for key in self.FIXED:
            if key in saved and hasattr(opt, key) and saved[key] != getattr(opt, key):
                now, then = getattr(opt, key), saved[key]
                if isinstance(then, bool):  # a switch such as --cosine
                    raise UserError(f'--resume {path}: the run was trained'
                                    f' {"with" if then else "without"} --{key}; resume'
                                    f' {"with" if then else "without"} it or start a new run'
                                    f' (another --trial)')
                if isinstance(then, (list, tuple)):  # --lr_decay_epochs
                    now, then = ','.join(map(str, now)), ','.join(map(str, then))
                raise UserError(f'--resume {path}: --{key} {now} differs from the'
                                f' run\'s {then}; resume with --{key} {then} or start'
                                f' a new run (another --trial)')

    def _remove_stale_temporaries(self):
        if is_main_process():
            for tmp in glob.glob(os.path.join(self.opt.save_folder, '.*.tmp')):
                with contextlib.suppress(OSError):
                    os.remove(tmp)

    def begin_epoch(self, epoch, sampler):
        """Point the sampler at this epoch's order and past the steps a resumed epoch did."""
        sampler.set_epoch(epoch)
        sampler.set_start(self.start_step * self.opt.local_batch_size
                          if epoch == self.start_epoch else 0)

    def epoch_start_step(self, epoch):
        """Steps of ``epoch`` already done before a mid-epoch resume (else 0)."""
        start = self.start_step if epoch == self.start_epoch else 0
        if not start:
            for meter in self.meters.values():
                meter.reset()
        return start

    # -- saving
    def state(self, epoch, step=0):
        return {
            'model': bare_state_dict(self.model),
            'optimizer': self.optimizer.state_dict(),
            'epoch': epoch,
            'step': step,
            'opt': plain_options(self.opt),
            'scaler': self.scaler.state_dict() if self.scaler is not None and
            self.scaler.is_enabled() else None,
            'rng': rng_state(),
            'meters': {name: m.state_dict() for name, m in self.meters.items()} if step else {},
            'extra': self.extra,
        }

    def save(self, name, epoch, step=0):
        path = os.path.join(self.opt.save_folder, name)
        save_checkpoint(self.state(epoch, step), path)
        return path

    def end_epoch(self, epoch):
        """Refresh the run's checkpoint; keep a numbered one every save_freq epochs."""
        if not is_main_process():
            return
        state = self.state(epoch)
        save_checkpoint(state, os.path.join(self.opt.save_folder, 'checkpoint.pth'))
        if epoch % self.opt.save_freq == 0:
            save_checkpoint(state, os.path.join(self.opt.save_folder,
                                                f'ckpt_epoch_{epoch}.pth'))

    def interrupted(self, epoch, step):
        """Save the position after a signal and exit non-zero with how to resume."""
        path = self.save('checkpoint.pth', epoch - 1, step)
        if is_main_process():
            command = shlex.join([sys.argv[0]] + without_resume(sys.argv[1:])
                                 + ['--resume', 'auto'])
            launcher = ('torchrun <the same torchrun options>' if self.opt.distributed
                        else 'python')
            print(f'stopped by {self.stop.name} at epoch {epoch}, step {step}; saved {path}.'
                  f' Continue with: {launcher} {command}', flush=True)
        self.close()
        cleanup_runtime()
        sys.exit(128 + self.stop.signum)

    # -- logging
    @property
    def logger(self):
        if self._writer is None:
            self._writer = TBLogger(self.opt.tb_folder, purge_step=self.start_epoch)
        return self._writer

    def close(self):
        if self._writer is not None:
            self._writer.close()


def newest_checkpoint(folder):
    """The most recently written loadable checkpoint of a run folder, or None."""
    paths = [p for p in glob.glob(os.path.join(folder, '*.pth'))]
    for path in sorted(paths, key=os.path.getmtime, reverse=True):
        try:
            load_checkpoint(path, flag='--resume')
        except UserError:
            if is_main_process():
                print(f'note: --resume auto skips {path}: not a readable checkpoint')
            continue
        return path
    return None


def without_resume(args):
    """Command-line arguments less any ``--resume X`` / ``--resume=X``."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == '--resume':
            skip = True
        elif not arg.startswith('--resume='):
            kept.append(arg)
    return kept


class GracefulStop:
    """SIGTERM/Ctrl-C ask the loop to stop after the current step; a second Ctrl-C aborts."""

    def __init__(self):
        self.signum = 0
        try:
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. under a test runner's thread)
            pass

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if is_main_process():
            print(f'\n{self.name} received: finishing the current step, then saving',
                  flush=True)

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ''

    @property
    def requested(self):
        return bool(self.signum)
