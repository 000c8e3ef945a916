"""One training run's bookkeeping: resuming, per-epoch saves, SIGTERM / Ctrl-C, divergence.

``Bookkeeper(opt, rt)`` reads the ``--resume`` checkpoint before anything is built (so the
run's seed is adopted), ``restore`` puts the state back into the model and
optimizer, ``end_epoch``/``save`` write the reference's files (plus a rolling
``checkpoint.pth``), and a signal saves the position inside the epoch before the
script exits. No file it writes holds a NaN or infinite weight.
"""

import argparse
import contextlib
import glob
import math
import os
import shlex
import signal
import sys

import torch

from supcon.data import identity
from supcon.errors import NonFiniteLossError, UserError
from supcon.system import run_lock, slurm
from supcon.system.checkpoint import (
    bare_state_dict,
    checkpoint_position,
    first_nonfinite,
    folder_write_problem,
    load_bare_state_dict,
    load_checkpoint,
    newest_checkpoint,
    plain_options,
    resume_problem,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from supcon.system.runtime import all_reduce_sum, cleanup_runtime, is_main_process, seed_everything
from supcon.training.tb_logger import TBLogger, views_grid

#: save folder (absolute) -> the last checkpoint a Bookkeeper in this process saved or resumed from
_LAST_GOOD = {}


def last_good_checkpoint(folder):
    """The last checkpoint saved in ``folder`` by this process's run, else the furthest one."""
    return _LAST_GOOD.get(os.path.abspath(folder)) or newest_checkpoint(folder, quiet=True)


def diverged_advice(opt, last_good):
    """The end of a divergence error: what was kept and what to change."""
    kept = (
        f'the last good checkpoint is {last_good}'
        if last_good
        else 'no checkpoint was saved before it'
    )
    return f'{kept}; lower --learning_rate (now {opt.learning_rate}) or add --warm and start again'


def check_finite(loss, epoch, step, opt):
    """Stop at a NaN or infinite loss (the weights it came from are never saved)."""
    if not math.isfinite(loss):
        last_good = last_good_checkpoint(opt.save_folder)
        raise NonFiniteLossError(
            f'loss is {loss} at epoch {epoch}, step {step}: training diverged and nothing was'
            f' saved from it; {diverged_advice(opt, last_good)}'
        )


class Bookkeeper:
    """Resuming, per-epoch checkpoints and TensorBoard for one training run.

    The run's own ``checkpoint.pth`` is refreshed after every epoch (and on a
    signal), so a crash loses at most one epoch; ``ckpt_epoch_{N}.pth`` and
    ``last.pth`` are written as the reference does.
    """

    def __init__(self, opt, rt, meters=None, fixed=()):
        """Find and read the ``--resume`` checkpoint; call before building loaders.

        ``fixed`` names the options that define the run (``supcon.capabilities.FIXED``): a
        resume with another value is refused in one line. The checkpoint's seed is adopted
        here into ``rt.seed`` (when --seed is not given), so data order and augmentation
        continue exactly where the run stopped.
        """
        self.opt, self.rt = opt, rt
        self.fixed = tuple(fixed)
        self.meters = meters or {}
        self.model = self.optimizer = self.scaler = None
        self.modules = {}  # more state saved next to the model, e.g. {'moco': ...}
        self.extra = {}
        self.start_epoch = 1
        self.start_step = 0
        self.stop = GracefulStop(opt.save_folder)
        self._writer = None
        self._notes = set()
        self._trained = self._views_logged = False
        self._ckpt, self._ckpt_path = None, None
        # what the training data are, recorded in every checkpoint and checked on resume
        self.data_fingerprint = identity.fingerprint(opt)
        self._claim_folder()  # before any work: an epoch trained but not saved is lost
        self._remove_stale_temporaries()  # left by a kill during a save; never loaded
        _LAST_GOOD.pop(os.path.abspath(opt.save_folder), None)
        if opt.resume is None:
            return
        path = opt.resume
        if path == 'auto':
            path = newest_checkpoint(opt.save_folder)
            if path is None:
                if is_main_process():
                    print(
                        f'--resume auto: no checkpoint in {opt.save_folder} yet; starting a'
                        f' fresh run'
                    )
                return
        self._ckpt, self._ckpt_path = load_checkpoint(path, flag='--resume'), path
        problem = resume_problem(self._ckpt)
        if problem:
            raise UserError(f'--resume {path}: {problem[0]}; {problem[1]}')
        self._check_same_run(self._ckpt.get('opt', {}), path)
        self.last_good = path

    @property
    def last_good(self):
        """The last checkpoint this run saved or resumed from (all hold finite weights)."""
        return _LAST_GOOD.get(os.path.abspath(self.opt.save_folder))

    @last_good.setter
    def last_good(self, path):
        _LAST_GOOD[os.path.abspath(self.opt.save_folder)] = path

    def _claim_folder(self):
        """Refuse a save folder that cannot be written or that another live run is writing
        (its ``.lock``, ``run_lock.py``); else rank 0 takes the lock. All ranks fail together.
        """
        folder = self.opt.save_folder
        error = taken_over = None
        if is_main_process():
            problem = folder_write_problem(folder)
            if problem:
                error = UserError(
                    f'cannot write checkpoints to {folder} ({problem}): make it'
                    f' writable, or start the script from a folder you can write to'
                    f' (it saves under ./save/ there)'
                )
            else:
                try:
                    taken_over = run_lock.acquire(folder)
                except UserError as exc:
                    error = exc
        if self.rt.distributed:
            flag = torch.tensor([float(error is not None)], device=self.rt.device)
            if all_reduce_sum(flag).item() and error is None:  # printed by rank 0 alone
                error = UserError(f'the main process cannot use {folder}')
        if error is not None:
            raise error
        if taken_over:
            self.note_once('lock', taken_over)

    def note_once(self, key, message):
        """Print ``message`` on the main process the first time ``key`` comes up in this run."""
        if key not in self._notes:
            self._notes.add(key)
            if is_main_process():
                print(f'note: {message}', flush=True)

    def restore(self, model, optimizer, scaler=None, **modules):
        """Attach what is trained and restore its state; returns the first epoch to run."""
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.modules = {name: m for name, m in modules.items() if m is not None}
        ckpt, path = self._ckpt, self._ckpt_path
        if ckpt is None:
            return self.start_epoch
        try:
            load_bare_state_dict(self.model, ckpt['model'])
        except RuntimeError:
            raise UserError(
                f'--resume {path}: its weights do not fit this model; resume with'
                f' the options it was trained with'
            ) from None
        if 'optimizer' in ckpt:
            try:
                self.optimizer.load_state_dict(ckpt['optimizer'])
            except (ValueError, KeyError, TypeError, RuntimeError):
                raise UserError(
                    f'--resume {path}: its optimizer state does not fit this'
                    f' model and optimizer; resume with the options it was trained'
                    f' with'
                ) from None
        if self.scaler is not None and ckpt.get('scaler'):
            self.scaler.load_state_dict(ckpt['scaler'])
        set_rng_state(ckpt.get('rng'))
        for name, meter in self.meters.items():
            if name in ckpt.get('meters', {}):
                meter.load_state_dict(ckpt['meters'][name])
        self.extra = dict(ckpt.get('extra', {}))
        for name, module in self.modules.items():
            if name not in ckpt:
                raise UserError(
                    f'--resume {path} has no {name} state; resume with the options it'
                    f' was trained with'
                )
            module.load_state_dict(ckpt[name])
        epoch, step = checkpoint_position(ckpt)
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
        rt = self.rt
        if not rt.seed_given and saved.get('seed') is not None:
            rt.seed = int(saved['seed'])
            seed_everything(rt.seed + rt.rank)
        current = self.options()
        identity.check_resume(saved, self.data_fingerprint, self.opt, path)
        for key in self.fixed:
            if key in saved and key in current and saved[key] != current[key]:
                now, then = current[key], saved[key]
                if isinstance(then, bool):  # a switch such as --cosine
                    raise UserError(
                        f'--resume {path}: the run was trained'
                        f' {"with" if then else "without"} --{key}; resume'
                        f' {"with" if then else "without"} it or start a new run'
                        f' (another --trial)'
                    )
                if isinstance(then, (list, tuple)):  # --lr_decay_epochs
                    now, then = ','.join(map(str, now)), ','.join(map(str, then))
                raise UserError(
                    f'--resume {path}: --{key} {now} differs from the'
                    f' run\'s {then}; resume with --{key} {then} or start'
                    f' a new run (another --trial)'
                )

    def _remove_stale_temporaries(self):
        if is_main_process():
            for tmp in glob.glob(os.path.join(self.opt.save_folder, '.*.tmp')):
                with contextlib.suppress(OSError):
                    os.remove(tmp)

    def begin_epoch(self, epoch, sampler):
        """Point the sampler at this epoch's order and past the steps a resumed epoch did."""
        self._trained = True
        sampler.set_epoch(epoch)
        sampler.set_start(
            self.start_step * self.rt.local_batch_size if epoch == self.start_epoch else 0
        )

    def epoch_start_step(self, epoch):
        """Steps of ``epoch`` already done before a mid-epoch resume (else 0)."""
        start = self.start_step if epoch == self.start_epoch else 0
        if not start:
            for meter in self.meters.values():
                meter.reset()
        return start

    # -- saving
    def options(self):
        """The run's options as checkpoints record them: the parsed flags and the runtime's."""
        return {
            **plain_options(self.opt),
            **self.rt.recorded(),
            'data_fingerprint': self.data_fingerprint,
        }

    def state(self, epoch, step=0):
        return {
            'model': bare_state_dict(self.model),
            'optimizer': self.optimizer.state_dict(),
            'epoch': epoch,
            'step': step,
            # a Namespace, as the reference writes it: ckpt['opt'].model works in users' tools
            'opt': argparse.Namespace(**self.options()),
            'scaler': self.scaler.state_dict()
            if self.scaler is not None and self.scaler.is_enabled()
            else None,
            'rng': rng_state(),
            'meters': {name: m.state_dict() for name, m in self.meters.items()} if step else {},
            'extra': self.extra,
            **{name: m.state_dict() for name, m in self.modules.items()},
        }

    def checked_state(self, epoch, step=0):
        """``state`` after checking that it holds no NaN or infinite tensor.

        The loss is checked before each optimizer step, so the update of an epoch's last
        step is checked only here: a diverged state is refused (on every rank, as they all
        hold the same weights) and never written over a good file.
        """
        state = self.state(epoch, step)
        bad = first_nonfinite(state)
        if bad is not None:
            where = f'epoch {epoch + 1}, step {step}' if step else f'epoch {epoch}'
            raise NonFiniteLossError(
                f'training diverged: after {where} the weights hold NaN or infinite values'
                f' ({bad}), so nothing was saved from it; '
                f'{diverged_advice(self.opt, last_good_checkpoint(self.opt.save_folder))}'
            )
        return state

    def save(self, name, epoch, step=0):
        path = os.path.join(self.opt.save_folder, name)
        state = self.checked_state(epoch, step)
        if is_main_process():
            print('==> Saving...', flush=True)
        save_checkpoint(state, path)
        self.last_good = path
        return path

    def end_epoch(self, epoch):
        """Refresh the run's checkpoint; keep a numbered one every save_freq epochs."""
        state = self.checked_state(epoch)
        if not is_main_process():
            return
        print('==> Saving...', flush=True)
        path = os.path.join(self.opt.save_folder, 'checkpoint.pth')
        save_checkpoint(state, path)
        self.last_good = path
        if epoch % self.opt.save_freq == 0:
            save_checkpoint(state, os.path.join(self.opt.save_folder, f'ckpt_epoch_{epoch}.pth'))

    def interrupted(self, epoch, step):
        """Save the position after a signal and exit non-zero with how to resume."""
        path = self.save('checkpoint.pth', epoch - 1, step)
        if is_main_process():
            stopped = f'stopped by {self.stop.name} at epoch {epoch}, step {step}; saved {path}.'
            # SIGUSR1 under SLURM: the job goes back in the queue, and resumes by itself
            requeued = slurm.requeue(self.stop.signum)
            command = shlex.join(
                [sys.argv[0]] + without_resume(sys.argv[1:]) + ['--resume', 'auto']
            )
            launcher = slurm.launcher() or (
                'torchrun <the same torchrun options>' if self.rt.distributed else 'python'
            )
            print(
                f'{stopped} {requeued}'
                if requeued
                else f'{stopped} Continue with: {launcher} {command}',
                flush=True,
            )
        self.close()
        cleanup_runtime()
        sys.exit(128 + self.stop.signum)

    # -- logging
    @property
    def logger(self):
        if self._writer is None:
            self._writer = TBLogger(self.opt.tb_folder, purge_step=self.start_epoch)
        return self._writer

    def log_step(self, name, value, epoch, step, steps_per_epoch):
        """A scalar at the global step of ``step`` (0-based) of ``epoch``, under ``step/``."""
        first = (self.start_epoch - 1) * steps_per_epoch + self.start_step + 1
        global_step = (epoch - 1) * steps_per_epoch + step + 1
        self.logger.log_step_value(name, value, global_step, purge_step=first)

    def log_views(self, images, epoch, views=1):
        """The grid of the run's first training batch under ``views`` (step 1), once per run
        (``images`` and ``views`` as ``tb_logger.views_grid`` takes them):
        a run resumed in epoch 1 writes it again (its purge hid the first one), a later one
        does not."""
        if epoch != 1 or self._views_logged or not is_main_process():
            return
        self._views_logged = True
        from supcon.data.datasets import resolve_mean_std

        mean, std = resolve_mean_std(self.opt.dataset, self.opt.mean, self.opt.std)
        self.logger.log_image('views', views_grid(images, mean, std, views=views), 1)

    def log_hparams(self, metrics):
        """The options and the ``metrics`` tags for the HPARAMS tab, at the last epoch. Only a
        process that trained writes it, so resuming a finished run adds no second record;
        ``--resume`` is left out, so a resumed run's record is an uninterrupted one's."""
        if self._trained:
            options = {k: v for k, v in self.options().items() if k != 'resume'}
            self.logger.log_hparams(options, metrics, self.opt.epochs)
            self.logger.flush()

    def close(self):
        """Close TensorBoard and let another run write the save folder (its lock goes)."""
        if self._writer is not None:
            self._writer.close()
        run_lock.release(self.opt.save_folder)


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
    """SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and Ctrl-C ask the loop to stop
    after the current step; a second Ctrl-C aborts."""

    def __init__(self, save_folder=None):
        self.signum = 0
        self.save_folder = save_folder
        try:
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)
            signal.signal(signal.SIGUSR1, self._handle)
        except (ValueError, AttributeError):  # not the main thread; no SIGUSR1 (Windows)
            pass

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            kept = f' in {self.save_folder}' if self.save_folder else ''
            raise KeyboardInterrupt(
                f'stopped by a second Ctrl-C without saving the current'
                f' position; the checkpoints already saved{kept} are'
                f' intact: continue from them with --resume auto'
            )
        if self.signum:  # e.g. the SIGTERM SLURM sends once the job is requeued: one stop
            return
        self.signum = signum
        if is_main_process():
            print(f'\n{self.name} received: finishing the current step, then saving', flush=True)

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else ''

    @property
    def requested(self):
        return bool(self.signum)
