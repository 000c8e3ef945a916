"""What every test module shares (pytest finds this file itself; nothing imports it).

- ``one_thread`` (every module): one intra-op thread, as the scripts' subprocesses get
  (``OMP_NUM_THREADS=1``): fast on shared cores, and the same arithmetic here and there.
- ``remove_checkpoints`` (every test): a test's checkpoints (``*.pth`` under its ``tmp_path``, 45 to
  90 MB each for a ResNet-18) are deleted when it ends; the suite once filled 20 GB of /tmp with
  them. Those of a module's fixtures go when the module ends, the rest when the session ends.
  pyproject.toml keeps only failed tests' folders at the end (``tmp_path_retention_policy``).
- ``images`` (session): one tiny image folder, two classes of 8 training and 2 test 8x8 RGB images.
- ``digits_checkpoints`` (session): trained digits checkpoints of each kind (``trained_models.py``).
- ``gloo_ranks`` (session): ``gloo_ranks(fn, *args, world=2)`` runs ``fn(rank, world, *args)`` on
  ``world`` processes joined in a gloo group and returns every rank's return value.

Modules with ``slow`` tests are collected first (``pytest_collection_modifyitems``), each module's
tests kept together and in order. Under ``-n`` the processes steal work (``pytest_configure``):
each starts with half of the tests in that order, and one that runs out takes half of what the
other has not started, so neither waits idle at the end (xdist's default ``--dist load`` hands
out fixed shares up front, which left one process idle for the last 40 s). An explicit
``--dist`` is kept.

The tests' folders (``tmp_path``) live in memory, under /dev/shm, where it is a tmpfs with
room (``pytest_configure``): the scripts write and fsync checkpoints of 45 MB, which on this
machine's disk cost about 15 % of the suite's time. ``--basetemp``, ``TMPDIR`` or
``PYTEST_DEBUG_TEMPROOT`` given by the user are kept. The xdist processes and every process a
test starts keep the memory they free for their next allocation rather than handing it back to
the system and faulting it in again (glibc's malloc tunables, ``MALLOC_TUNING``): 5 % of the
time of test_resume.py, most of it the kernel's. A ``GLIBC_TUNABLES`` of the user's is kept.

The tiers: ``python -m pytest -q tests`` runs everything; ``-m "not slow"`` leaves out the tests
that start processes (torchrun, gloo ranks, real subprocesses), the developer's quick loop.
"""

import datetime
import os
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port
from PIL import Image


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def remove_checkpoints(tmp_path):
    yield
    for path in tmp_path.rglob('*.pth'):
        path.unlink()


SESSION_FOLDERS = ('trained_models',)  # tmp_path_factory folders of session fixtures with .pth


@pytest.fixture(scope='module', autouse=True)
def remove_module_checkpoints(tmp_path_factory):
    """The checkpoints in the folders a module's fixtures made are deleted when the module ends
    (the session's trained models are kept): they held 5 GB of /dev/shm at once otherwise."""
    root = tmp_path_factory.getbasetemp()
    before = set(root.iterdir())
    yield
    for folder in set(root.iterdir()) - before:
        if folder.is_dir() and not folder.name.startswith(SESSION_FOLDERS):
            for path in folder.rglob('*.pth'):
                path.unlink()


@pytest.fixture(scope='session', autouse=True)
def remove_session_checkpoints(tmp_path_factory):
    """And every checkpoint left when the session ends: pytest keeps the folders of a session
    with a failed test (three sessions' worth), which in /dev/shm is memory."""
    yield
    for path in tmp_path_factory.getbasetemp().rglob('*.pth'):
        path.unlink()


@pytest.fixture(scope='session')
def images(tmp_path_factory):
    """Two classes, 8 training and 2 test images each, 8x8 RGB (read-only: copy to change)."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for split, count in (('train', 8), ('test', 2)):
        for name in ('a', 'b'):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='session')
def digits_checkpoints(tmp_path_factory):
    """{'encoder', 'linear', 'ce': path, 'final': main_linear.py's printed final accuracy}."""
    from trained_models import build_digits_checkpoints

    return build_digits_checkpoints(tmp_path_factory.mktemp('trained_models'))


def _rank(rank, world, port, fn, args, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        'gloo',
        init_method=f'tcp://127.0.0.1:{port}',
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.save(fn(rank, world, *args), f'{out_dir}/rank{rank}.pt')
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope='session')
def gloo_ranks(tmp_path_factory):
    """``gloo_ranks(fn, *args, world=2, start_method='fork')``: ``[fn(r, world, *args) for r]``,
    each on its own process of a gloo group (one intra-op thread each). ``fn`` is a module-level
    function; its results must load with ``torch.load(weights_only=True)`` (tensors, numbers,
    strings, lists, tuples, dicts). ``fork`` starts fast; ``spawn`` for CUDA."""

    def run(fn, *args, world=2, start_method='fork'):
        out_dir = tmp_path_factory.mktemp('gloo')
        mp.start_processes(
            _rank,
            args=(world, free_port(), fn, args, str(out_dir)),
            nprocs=world,
            join=True,
            start_method=start_method,
        )
        return [torch.load(out_dir / f'rank{r}.pt', weights_only=True) for r in range(world)]

    return run


def pytest_collection_modifyitems(session, config, items):
    """Modules with ``slow`` tests first; tests of a module together, in their order."""
    modules = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item)

    def quick(name):
        return not any(item.get_closest_marker('slow') for item in modules[name])

    order = sorted(modules, key=quick)  # stable: alphabetical within each group
    items[:] = [item for name in order for item in modules[name]]


MEMORY_TEMP_ROOT = '/dev/shm'
# no mmap for blocks under 32 MiB (glibc's largest threshold), and no trimming of the heap
MALLOC_TUNING = 'glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967295'
MEMORY_TEMP_FREE_GIB = 8  # the suite's folders peaked at 3.2 GiB at a time


def pytest_configure(config):
    if hasattr(config, 'workerinput'):  # an xdist process: the controller decided
        return
    args = list(config.invocation_params.args) + os.environ.get('PYTEST_ADDOPTS', '').split()
    if config.getoption('dist', 'no') == 'load' and not any(a.startswith('--dist') for a in args):
        config.option.dist = 'worksteal'
    if (
        config.option.basetemp is None
        and not {'TMPDIR', 'PYTEST_DEBUG_TEMPROOT'} & set(os.environ)
        and _is_tmpfs(MEMORY_TEMP_ROOT)
        and os.access(MEMORY_TEMP_ROOT, os.W_OK)
        and shutil.disk_usage(MEMORY_TEMP_ROOT).free >= MEMORY_TEMP_FREE_GIB * 2**30
    ):
        # pytest's own setting for the root of tmp_path; the xdist processes inherit it
        os.environ['PYTEST_DEBUG_TEMPROOT'] = MEMORY_TEMP_ROOT
    os.environ.setdefault('GLIBC_TUNABLES', MALLOC_TUNING)  # read by processes started from now


def _is_tmpfs(path):
    try:
        with open('/proc/mounts') as mounts:
            return any(line.split()[1:3] == [path, 'tmpfs'] for line in mounts)
    except OSError:  # not Linux
        return False
