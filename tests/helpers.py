"""Shared helpers for the end-to-end tests: running the scripts, tiny data, checkpoints.

Scripts write ``./save/...`` relative to their working directory, so every run
gets its own ``cwd`` and the scripts are called by absolute path.

``run_scripts_forked`` runs many short, failing invocations in one Python
process that imports torch once and forks a child per invocation: each child
has its own working directory, stdout/stderr files, exit code and exit
handlers, as a fresh ``python main_*.py ...`` would, for a tenth of a second
instead of several seconds of start-up. Run as a script, this file is that
driver (``python tests/helpers.py cases.json``).
"""

import argparse
import atexit
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ('main_supcon', 'main_linear', 'main_ce')

# Per-channel statistics of the seed README's animals10 commands.
SEED_MEAN = '(0.3837, 0.3704, 0.3072)'
SEED_STD = '(0.3268, 0.3187, 0.3051)'
FAST = ['--num_workers', '0', '--device', 'cpu', '--seed', '0']


def script_env():
    """One intra-op thread (the machine is shared; it is also faster here) and no torchrun."""
    env = dict(os.environ)
    for key in (
        'WORLD_SIZE',
        'LOCAL_RANK',
        'RANK',
        'LOCAL_WORLD_SIZE',
        'MASTER_ADDR',
        'MASTER_PORT',
    ):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return env


def run_script(script, args, cwd, timeout=300):
    """``python <repo>/<script>.py args`` in ``cwd``; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, str(REPO / f'{script}.py')] + [str(a) for a in args],
        cwd=str(cwd),
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def describe(result):
    """Exit code and output of a run, for assertion messages."""
    return (
        f'rc={result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n'
        f'{result.stderr[-3000:]}'
    )


class ForkedResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_scripts_forked(cases, work_dir, timeout=90):
    """Run ``{name: (script, args, cwd)}`` in one driver process; returns {name: ForkedResult}.

    A case still running after ``timeout`` seconds is killed and gets returncode None.
    """
    work_dir = Path(work_dir)
    if not hasattr(os, 'fork'):  # e.g. Windows: one real process per case, just slower
        results = {}
        for name, (script, args, cwd) in cases.items():
            try:
                done = run_script(script, args, cwd, timeout=timeout)
                results[name] = ForkedResult(done.returncode, done.stdout, done.stderr)
            except subprocess.TimeoutExpired:
                results[name] = ForkedResult(None, '', '')
        return results
    spec = []
    for name, (script, args, cwd) in cases.items():
        assert script in SCRIPTS, script
        spec.append(
            {
                'name': name,
                'script': script,
                'args': [str(a) for a in args],
                'cwd': str(cwd),
                'stdout': str(work_dir / f'{name}.out'),
                'stderr': str(work_dir / f'{name}.err'),
                'timeout': timeout,
            }
        )
    spec_path = work_dir / 'cases.json'
    spec_path.write_text(json.dumps(spec))
    driver = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(spec_path)],
        cwd=str(work_dir),
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout * len(spec) + 120,
    )
    assert driver.returncode == 0, describe(driver)
    codes = json.loads((work_dir / 'results.json').read_text())
    return {
        case['name']: ForkedResult(
            codes[case['name']], Path(case['stdout']).read_text(), Path(case['stderr']).read_text()
        )
        for case in spec
    }


def _serve(spec_path):
    """Driver: import the scripts once, then fork one child per case."""
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, str(REPO))
    import importlib

    modules = {script: importlib.import_module(script) for script in SCRIPTS}
    from supcon.system import runtime

    codes = {}
    for case in spec:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _child(case, modules[case['script']], runtime)  # ends with os._exit
            finally:
                os._exit(70)  # never fall back into this loop in the child
        codes[case['name']] = _wait(pid, case['timeout'])
    Path(spec_path).with_name('results.json').write_text(json.dumps(codes))


def _child(case, module, runtime):
    """Be ``python <script>.py args`` as far as the script can tell; never returns."""
    os.setpgid(0, 0)  # its DataLoader workers share its group, for a clean kill on timeout
    os.chdir(case['cwd'])
    for fd, path in ((1, case['stdout']), (2, case['stderr'])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [module.__file__] + case['args']
    code = 0
    try:
        runtime.launch(module.main)
    except SystemExit as exc:  # as the interpreter maps sys.exit(arg) to an exit code
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()  # what the interpreter prints for an uncaught exception
        code = 1
    # Shut down as the interpreter would, minus tearing down the modules: freeing the
    # copy-on-write memory shared with the driver would take seconds per case.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _wait(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


# --------------------------------------------------------------------------- tiny data


def write_image_folder(root, counts, size=16, seed=0):
    """``root/<class>/<i>.png`` random RGB images, ``counts[class]`` of each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f'{i:03d}.png')
    return root


def write_cifar10(data_folder, n_train, n_test, seed=0):
    """CIFAR-10 in its real layout (cifar-10-batches-py/, five data batches, test_batch and
    batches.meta, pickled as Python 2 wrote them) with ``n_train`` training images."""
    from test_cifar import (
        CIFAR10_NAMES,
        py2_pickle,
    )  # the writer test_cifar.py checks cifar.py with

    rng = np.random.default_rng(seed)
    folder = Path(data_folder) / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    sizes = [len(part) for part in np.array_split(np.arange(n_train), 5)]
    for name, n in [(f'data_batch_{i + 1}', n) for i, n in enumerate(sizes)] + [
        ('test_batch', n_test)
    ]:
        content = {
            b'batch_label': name.encode(),
            b'data': rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b'labels': [int(v) for v in rng.integers(0, 10, size=n)],
            b'filenames': [b'x.png'] * n,
        }
        (folder / name).write_bytes(py2_pickle(content))
    meta = {b'label_names': [n.encode() for n in CIFAR10_NAMES], b'num_vis': 3072}
    (folder / 'batches.meta').write_bytes(py2_pickle(meta))
    return folder


def reference_options(**overrides):
    """The ``argparse.Namespace`` the reference main_supcon.py pickles into checkpoints."""
    opt = dict(
        print_freq=10,
        save_freq=50,
        batch_size=256,
        num_workers=16,
        epochs=1000,
        learning_rate=0.5,
        lr_decay_epochs=[700, 800, 900],
        lr_decay_rate=0.1,
        weight_decay=1e-4,
        momentum=0.9,
        model='resnet18',
        dataset='cifar10',
        mean=None,
        std=None,
        data_folder='./datasets/',
        size=32,
        method='SupCon',
        temp=0.1,
        cosine=True,
        syncBN=False,
        warm=False,
        trial='0',
        model_path='./save/SupCon/cifar10_models',
        tb_path='./save/SupCon/cifar10_tensorboard',
    )
    opt.update(overrides)
    return argparse.Namespace(**opt)


def save_reference_checkpoint(path, model='resnet18', seed=0, record_model=True, **opt_overrides):
    """A checkpoint saved the reference way: whole Namespace, ``encoder.module.`` keys.

    ``record_model=False`` leaves ``model`` out of the options, as in checkpoints whose
    options were edited or lost. Returns the bare state dict (keys without ``module.``)
    of the saved SupConResNet.
    """
    import torch

    from networks.resnet_big import SupConResNet

    torch.manual_seed(seed)
    net = SupConResNet(name=model)
    # The reference wraps the encoder in DataParallel whenever a GPU is present.
    state = {
        (f'encoder.module.{k[len("encoder.") :]}' if k.startswith('encoder.') else k): v
        for k, v in net.state_dict().items()
    }
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    opt = reference_options(model=model, **opt_overrides)
    if not record_model:
        del opt.model
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({'opt': opt, 'model': state, 'optimizer': optimizer.state_dict(), 'epoch': 3}, path)
    return net.state_dict()


def save_our_checkpoint(path, model='resnet18', seed=0):
    """A checkpoint as main_supcon.py writes it (plain-dict opt, bare keys)."""
    import torch

    from networks.resnet_big import SupConResNet
    from supcon.system import checkpoint

    torch.manual_seed(seed)
    net = SupConResNet(name=model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    opt = checkpoint.plain_options(reference_options(model=model))
    checkpoint.save_checkpoint(
        {'model': net.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': 1, 'opt': opt},
        str(path),
    )
    return net.state_dict()


def saved_files(root, pattern='*.pth'):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob(pattern))


def read_scalars(tb_folder):
    """{tag: [(step, value), ...]} of the one TensorBoard run in ``tb_folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(Path(tb_folder).glob('events.out.tfevents.*'))
    assert events, f'no events file in {tb_folder}'
    acc = EventAccumulator(str(tb_folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


if __name__ == '__main__':
    _serve(sys.argv[1])


def free_port():
    """A TCP port free on the loopback interface now (for a gloo process group)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def runtime_opt(**changes):
    """The options runtime.setup_runtime reads, as a training script parses them on a CPU."""
    values = dict(
        device='cpu',
        batch_size=8,
        batch_size_val=4,
        num_workers=0,
        amp=False,
        amp_dtype='auto',
        channels_last=None,
        compile=False,
        seed=0,
        syncBN=False,
    )
    values.update(changes)
    return argparse.Namespace(**values)


def folder_args(root, **options):
    """The command line of a run on the image folders ``root``/train and ``root``/test at the
    tests' small settings, updated by ``options``: True is a switch, None or False leaves the
    flag out, anything else is its value."""
    values = {
        'dataset': 'path',
        'data_folder': root / 'train',
        'test_folder': root / 'test',
        'mean': '(0.5,0.5,0.5)',
        'std': '(0.25,0.25,0.25)',
        'size': 8,
        'batch_size': 4,
        'epochs': 1,
        'learning_rate': 0.01,
        'num_workers': 0,
        'device': 'cpu',
        'seed': 1,
        'print_freq': 100,
    }
    values.update(options)
    args = []
    for key, value in values.items():
        if value is True:
            args.append(f'--{key}')
        elif value is not None and value is not False:
            args += [f'--{key}', str(value)]
    return args


def relative_error(got, want, start=None):
    """|got - want| / |want - start| over all floating tensors (start: zero), e.g. the error of
    the weights relative to the training's change of them."""
    import torch

    got, want = ({k: v.detach().double() for k, v in d.items()} for d in (got, want))
    keys = [k for k in want if want[k].is_floating_point()]
    diff = torch.cat([(got[k] - want[k]).reshape(-1) for k in keys]).norm()
    base = [want[k] - (start[k].detach().double() if start else 0) for k in keys]
    scale = torch.cat([b.reshape(-1) for b in base]).norm()
    assert scale > 0
    return float(diff / scale)
