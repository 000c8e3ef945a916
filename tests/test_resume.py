"""Never lose a run: kill and resume, signals, atomic checkpoints, the NaN guard, seeds.

Every script runs on a 16-image folder at 8x8 with resnet18 on one CPU thread.
Uninterrupted runs and resumes call the script's ``main()`` in this process
(importing torch again per run would cost most of the test time); the runs that
are killed or signalled are processes of their own, forked from this one (one
SIGTERM test starts a fresh interpreter with the script's path).
"""

import argparse
import importlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import folder_args
from inprocess import Forked, assert_one_line_error, call, save_folder

import util
from supcon.system import checkpoint
from supcon.training import bookkeeping

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ('main_supcon', 'main_ce', 'main_linear')
# more runs of the kill-and-resume test: 'script+name' adds these options to the script's
VARIANTS = {
    # the queue wraps each epoch; the loader's crops keep at least 0.7 of the image, no colour
    'main_supcon+moco': {
        'moco': True,
        'moco_k': 12,
        'moco_m': 0.9,
        'aug': 'crop',
        'crop_scale': 0.7,
    },
    'main_supcon+gpu_aug': {'gpu_aug': True, 'crop_scale': 0.5},
    'main_ce+gpu_aug': {'gpu_aug': True, 'crop_scale': 0.5},
    # the encoder trains too: its weights, BatchNorm statistics and momentum resume exactly
    'main_linear+finetune': {'finetune': True, 'encoder_lr': 0.005},
}
EPOCHS = 3
STEPS_PER_EPOCH = 4  # 16 training images, --batch_size 4
LOSS_TAG = {'main_supcon': 'loss', 'main_ce': 'train_loss', 'main_linear': 'train_loss'}
SUBPROCESS_TIMEOUT_S = 240


# --------------------------------------------------------------------------- helpers


def spawn(script, args, cwd, fork=True):
    """The script as a process of its own, stdout and stderr merged, line-buffered text: forked
    from this one (``inprocess.Forked``), or with ``fork=False`` a fresh interpreter."""
    if fork:
        return Forked(script, args, cwd)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(
        [sys.executable, str(REPO / f'{script}.py')] + [str(a) for a in args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    watchdog = threading.Timer(SUBPROCESS_TIMEOUT_S, proc.kill)  # never hang the test run
    watchdog.daemon = True
    watchdog.start()
    return proc


def tb_folder(script, args, cwd):
    return (
        Path(cwd) / importlib.import_module(script).parse_option([str(a) for a in args]).tb_folder
    )


def weights(path):
    return checkpoint.load_checkpoint(str(path), flag='--resume')['model']


def max_abs_diff(path_a, path_b):
    a, b = weights(path_a), weights(path_b)
    assert a.keys() == b.keys()
    diff = 0.0
    for key in a:
        if a[key].is_floating_point():
            diff = max(diff, (a[key].double() - b[key].double()).abs().max().item())
        elif not torch.equal(a[key], b[key]):
            diff = float('inf')
    return diff


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


class Runs:
    """Runs shared by several tests, each made once per module."""

    def __init__(self, root, images):
        self.root, self.images = root, images
        self._pretrained = None
        self._references = {}
        self._resumed = {}

    def args(self, script, **changes):
        """The command line of ``script`` (or of a ``script+variant`` of VARIANTS)."""
        script, _, variant = script.partition('+')
        changes = dict(VARIANTS.get(f'{script}+{variant}', {}), **changes) if variant else changes
        if script == 'main_linear':
            options = {'ckpt': self.pretrained()}
        else:
            options = {'model': 'resnet18'}
        return folder_args(self.images, **{'epochs': EPOCHS, **options, **changes})

    def pretrained(self):
        """One epoch of SupCon pretraining, the encoder main_linear evaluates."""
        if self._pretrained is None:
            cwd = self.root / 'pretrain'
            cwd.mkdir()
            args = self.args('main_supcon', epochs=1)
            result = call('main_supcon', args, cwd)
            assert result.code == 0, result.err
            self._pretrained = save_folder('main_supcon', args, cwd) / 'last.pth'
        return self._pretrained

    def reference(self, script):
        """(cwd, last.pth) of the uninterrupted run."""
        if script not in self._references:
            cwd = self.root / f'{script}_A'
            cwd.mkdir()
            args = self.args(script)
            result = call(script.partition('+')[0], args, cwd)
            assert result.code == 0, result.err
            self._references[script] = (
                cwd,
                save_folder(script.partition('+')[0], args, cwd) / 'last.pth',
            )
        return self._references[script]

    def killed_and_resumed(self, script):
        """SIGKILL right after epoch 1 was saved, then ``--resume auto``: (cwd, resume output)."""
        if script not in self._resumed:
            cwd = self.root / f'{script}_B'
            cwd.mkdir()
            args = self.args(script)
            ckpt_path = save_folder(script.partition('+')[0], args, cwd) / 'checkpoint.pth'
            proc = spawn(script.partition('+')[0], args, cwd)
            output = []
            for line in proc.stdout:
                output.append(line)
                if 'epoch 1, total time' in line:  # main_linear: 'Train epoch 1, total time'
                    break
            # the line comes before end_epoch's save: wait for the file (renamed in whole)
            deadline = time.time() + 120
            while not ckpt_path.exists() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.02)
            proc.kill()
            proc.wait()
            proc.stdout.close()
            assert proc.returncode == -signal.SIGKILL, ''.join(output)
            assert checkpoint.load_checkpoint(str(ckpt_path), '--resume')['epoch'] >= 1
            result = call(script.partition('+')[0], args + ['--resume', 'auto'], cwd)
            assert result.code == 0, result.err
            self._resumed[script] = cwd, result
        return self._resumed[script]


@pytest.fixture(scope='module')
def runs(tmp_path_factory, images):
    root = tmp_path_factory.mktemp('runs')
    yield Runs(root, images)
    shutil.rmtree(root, ignore_errors=True)  # ~90 MB a resnet18 checkpoint


# --------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS + tuple(VARIANTS))
def test_kill_after_epoch_1_and_resume_auto_equals_uninterrupted_run(runs, script):
    _, reference = runs.reference(script)
    cwd, result = runs.killed_and_resumed(script)
    args = runs.args(script)
    assert 'resumed from ' in result.out and 'continuing at epoch ' in result.out
    resumed = save_folder(script.partition('+')[0], args, cwd) / 'last.pth'
    diff = max_abs_diff(reference, resumed)
    print(f'{script}: kill-and-resume max abs weight diff {diff:g}')
    assert diff <= 1e-6
    if script.endswith('+moco'):  # the key encoder and the queue continue exactly too
        a, b = (checkpoint.load_checkpoint(str(path))['moco'] for path in (reference, resumed))
        assert a.keys() == b.keys() and int(a['queue.count']) == 12
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_tensorboard_after_kill_and_resume_has_one_event_per_epoch(runs, script):
    reference_cwd, _ = runs.reference(script)
    cwd, _ = runs.killed_and_resumed(script)
    args = runs.args(script)
    resumed = scalars(tb_folder(script, args, cwd), LOSS_TAG[script])
    assert [step for step, _ in resumed] == list(range(1, EPOCHS + 1))
    assert resumed == scalars(tb_folder(script, args, reference_cwd), LOSS_TAG[script])


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_the_position_and_resumes_exactly(runs, tmp_path):
    script = 'main_supcon'
    _, reference = runs.reference(script)
    args = runs.args(script, print_freq=1)
    proc = spawn(script, args, tmp_path, fork=False)  # a user's SIGTERM reaches a fresh one
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith('Train: [1]['):
            proc.send_signal(signal.SIGTERM)
            break
    output.append(proc.stdout.read())
    proc.wait()
    proc.stdout.close()
    output = ''.join(output)
    assert proc.returncode == 128 + signal.SIGTERM, output
    hints = [line for line in output.splitlines() if line.startswith('stopped by SIGTERM')]
    assert len(hints) == 1, output
    command = shlex.split(hints[0].split('Continue with: ', 1)[1])
    assert command == ['python', str(REPO / f'{script}.py')] + [str(a) for a in args] + [
        '--resume',
        'auto',
    ]
    ckpt = checkpoint.load_checkpoint(
        str(save_folder(script, args, tmp_path) / 'checkpoint.pth'), '--resume'
    )
    assert ckpt['epoch'] == 0 and 0 < ckpt['step'] <= STEPS_PER_EPOCH

    # print_freq and num_workers may change on resume
    result = call(
        script, runs.args(script, num_workers=1, print_freq=2) + ['--resume', 'auto'], tmp_path
    )
    assert result.code == 0, result.err
    assert f'continuing at epoch 1, step {ckpt["step"] + 1}' in result.out
    assert max_abs_diff(reference, save_folder(script, args, tmp_path) / 'last.pth') == 0
    resumed = scalars(tb_folder(script, args, tmp_path), 'loss')
    assert [step for step, _ in resumed] == list(range(1, EPOCHS + 1))
    assert resumed == scalars(tb_folder(script, args, runs.reference(script)[0]), 'loss')


def test_ctrl_c_stops_after_the_step_and_a_second_one_aborts(capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = bookkeeping.GracefulStop()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop.requested and stop.name == 'SIGINT'
        assert 'finishing the current step' in capsys.readouterr().out
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------- atomic checkpoints


class Killed(BaseException):
    """Stands in for the process dying in the middle of a write."""


def test_a_save_killed_half_way_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    checkpoint.save_checkpoint({'model': {'w': torch.arange(4.0)}, 'epoch': 1}, str(path))
    before = path.read_bytes()
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise Killed

    monkeypatch.setattr(util.torch, 'save', half_save)
    with pytest.raises(Killed):
        checkpoint.save_checkpoint({'model': {'w': torch.zeros(4)}, 'epoch': 2}, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(weights(path)['w'], torch.arange(4.0))
    assert os.listdir(tmp_path) == ['checkpoint.pth']  # no temporary left behind


def test_checkpoints_are_readable_like_any_file_the_user_writes(tmp_path):
    """mkstemp creates 0600 files; a checkpoint gets the permissions torch.save would give."""
    path = tmp_path / 'checkpoint.pth'
    checkpoint.save_checkpoint({'model': {}}, str(path))
    plain = tmp_path / 'plain'
    plain.write_bytes(b'')
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


@pytest.mark.slow
def test_truncated_and_stale_files_are_skipped_and_a_named_one_is_refused(runs, tmp_path):
    script = 'main_supcon'
    args = runs.args(script, epochs=2, save_freq=1)
    folder = save_folder(script, args, tmp_path)

    # --resume auto with nothing saved yet: a fresh run, and it says so
    result = call(script, args + ['--resume', 'auto'], tmp_path)
    assert result.code == 0, result.err
    assert 'no checkpoint in' in result.out and 'starting a fresh run' in result.out
    finished = weights(folder / 'last.pth')

    # checkpoint.pth (epoch 2) cut short, newer than the good ckpt_epoch_1.pth
    (folder / 'last.pth').unlink()
    (folder / 'ckpt_epoch_2.pth').unlink()
    data = (folder / 'checkpoint.pth').read_bytes()
    (folder / 'checkpoint.pth').write_bytes(data[: len(data) // 2])
    stale = folder / '.checkpoint.pth.k1ll3d.tmp'  # what a kill during a save leaves
    stale.write_bytes(data[:1000])
    assert checkpoint.newest_checkpoint(str(folder)) == str(folder / 'ckpt_epoch_1.pth')

    result = call(script, args + ['--resume', folder / 'checkpoint.pth'], tmp_path)
    assert_one_line_error(result, 'checkpoint.pth', 'not a readable checkpoint')
    foreign = tmp_path / 'foreign.pth'
    torch.save(torch.zeros(3), foreign)
    result = call(script, args + ['--resume', foreign], tmp_path)
    assert_one_line_error(result, 'foreign.pth', 'not a SupContrast checkpoint')

    result = call(script, args + ['--resume', 'auto'], tmp_path)
    assert result.code == 0, result.err
    assert 'note: --resume auto skips' in result.out  # the truncated checkpoint.pth
    assert 'ckpt_epoch_1.pth: continuing at epoch 2' in result.out
    assert not stale.exists()
    resumed = weights(folder / 'last.pth')
    assert all(torch.equal(finished[key], resumed[key]) for key in finished)


def test_a_fresh_start_removes_stale_temporaries(runs, tmp_path):
    script = 'main_supcon'
    args = runs.args(script, epochs=1, batch_size=16)
    folder = save_folder(script, args, tmp_path)
    folder.mkdir(parents=True)
    stale = folder / '.checkpoint.pth.abc123.tmp'
    stale.write_bytes(b'half a checkpoint')
    assert checkpoint.newest_checkpoint(str(folder)) is None
    result = call(script, args, tmp_path)
    assert result.code == 0, result.err
    assert not stale.exists()


# --------------------------------------------------------------------------- NaN guard


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    runs, tmp_path, monkeypatch
):
    script = 'main_ce'
    module = importlib.import_module(script)
    args = runs.args(script)
    ckpt_path = save_folder(script, args, tmp_path) / 'checkpoint.pth'
    state = {'diverged': False, 'saved': None}
    real_end_epoch, real_set_model = bookkeeping.Bookkeeper.end_epoch, module.set_model

    def end_epoch(self, epoch):
        real_end_epoch(self, epoch)
        state['saved'] = ckpt_path.read_bytes()
        state['diverged'] = True  # from epoch 2 on the loss is NaN

    def set_model(opt, rt, num_classes):
        model, criterion = real_set_model(opt, rt, num_classes)

        def diverging(output, labels):
            loss = criterion(output, labels)
            return loss * float('nan') if state['diverged'] else loss

        return model, diverging

    monkeypatch.setattr(bookkeeping.Bookkeeper, 'end_epoch', end_epoch)
    monkeypatch.setattr(module, 'set_model', set_model)
    result = call(script, args, tmp_path)
    assert_one_line_error(result, 'error: loss is nan at epoch 2, step 1')
    assert ckpt_path.read_bytes() == state['saved']
    assert checkpoint.load_checkpoint(str(ckpt_path), '--resume')['epoch'] == 1
    assert all(v.isfinite().all() for v in weights(ckpt_path).values() if v.is_floating_point())
    assert sorted(os.listdir(ckpt_path.parent)) == ['checkpoint.pth']


@pytest.mark.slow
def test_a_diverging_run_saves_only_finite_files_and_resume_auto_takes_the_furthest(runs, tmp_path):
    """At lr 1e6 the weights become infinite in an epoch's last step, after its loss was
    checked: that state must never be written (an older version saved it as epoch 4)."""
    script = 'main_supcon'
    args = runs.args(script, epochs=8, batch_size=16, learning_rate=1e6, save_freq=2)
    folder = save_folder(script, args, tmp_path)
    result = call(script, args, tmp_path)
    assert_one_line_error(
        result,
        'training diverged',
        'nothing was saved from it',
        'the last good checkpoint is ',
        'checkpoint.pth; lower --learning_rate',
    )
    files = sorted(folder.glob('*.pth'))
    assert len(files) >= 2, result.out
    positions = {}
    for path in files:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, weights_only=True)
        for name, tensor in checkpoint.named_tensors(state):
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f'{path.name}: {name}'
        positions[path.name] = state['epoch']

    # `touch` the oldest file: --resume auto must still take the furthest one
    last = max(positions.values())
    future = time.time() + 60
    os.utime(folder / 'ckpt_epoch_2.pth', (future, future))
    result = call(
        script,
        runs.args(script, epochs=last, batch_size=16, learning_rate=1e6, save_freq=2)
        + ['--resume', 'auto'],
        tmp_path,
    )
    assert result.code == 0, result.err
    assert f'checkpoint.pth: all {last} epochs are done already' in result.out, result.out


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    'change', [('batch_size', 8), ('method', 'SimCLR'), ('crop_scale', 0.5), ('aug', 'crop')]
)
def test_resuming_with_an_option_that_changes_the_run_is_refused(runs, tmp_path, change):
    script = 'main_supcon'
    _, reference = runs.reference(script)
    key, value = change
    result = call(script, runs.args(script, **{key: value}) + ['--resume', reference], tmp_path)
    assert_one_line_error(result, f'--{key} {value} differs', f'resume with --{key}')


def test_resuming_a_finished_run_does_not_train_again(runs, tmp_path):
    script = 'main_supcon'
    _, reference = runs.reference(script)
    args = runs.args(script, print_freq=1, num_workers=1)  # may differ on resume
    folder = save_folder(script, args, tmp_path)
    folder.mkdir(parents=True)
    shutil.copy(reference, folder / 'last.pth')
    result = call(script, args + ['--resume', 'auto'], tmp_path)
    assert result.code == 0, result.err
    assert f'all {EPOCHS} epochs are done already' in result.out
    assert 'Train:' not in result.out and 'total time' not in result.out
    assert max_abs_diff(reference, folder / 'last.pth') == 0


# --------------------------------------------------------------------------- seeds


@pytest.mark.slow
def test_seed_makes_runs_repeatable_with_and_without_workers(runs, tmp_path):
    script = 'main_supcon'
    results = {}
    for name, seed, workers in (
        ('first', 3, 0),
        ('again', 3, 0),
        ('workers', 3, 2),
        ('other', 4, 0),
    ):
        cwd = tmp_path / name
        cwd.mkdir()
        args = runs.args(script, epochs=1, seed=seed, num_workers=workers)
        result = call(script, args, cwd)
        assert result.code == 0, result.err
        results[name] = save_folder(script, args, cwd) / 'last.pth'
    assert max_abs_diff(results['first'], results['again']) == 0
    assert max_abs_diff(results['first'], results['workers']) == 0
    assert max_abs_diff(results['first'], results['other']) > 0
