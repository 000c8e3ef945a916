"""torchrun / DDP: exact equivalence with one process, and the three scripts under torchrun
(main_supcon.py's one run there also serves the online probe's and the joint classifier's
checks and the comparison with --grad_cache).

Two gloo processes on CPU stand in for GPUs. The SyncBatchNorm case needs CUDA (PyTorch's
SyncBatchNorm does not run on CPU); on a machine with one GPU both processes share it.
"""

import argparse
import glob
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from helpers import folder_args, free_port, relative_error, runtime_opt, write_image_folder
from inprocess import call, run, save_folder
from PIL import Image

import util
from losses import SupConLoss
from supcon.data.sampling import SeededDataset, build_loader
from supcon.evaluation import classify
from supcon.system import checkpoint, runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_SIZE = 2
BATCH = 8  # global batch of the one-step tests: 4 samples x 2 views per rank
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])  # every rank holds positives of the other's anchors


# ---------------------------------------------------------------- one SGD step, 1 vs 2 processes


class TinyNet(nn.Module):
    """Conv encoder + projection head, small enough for float64; BatchNorm optional."""

    def __init__(self, bn):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.head = nn.Sequential(
            nn.Linear(6, 8), nn.BatchNorm1d(8) if bn else nn.Identity(), nn.ReLU(), nn.Linear(8, 5)
        )

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return F.normalize(self.head(x), dim=1)


CASES = {  # name: (BatchNorm, SupCon labels)
    'supcon': (False, True),
    'simclr': (False, False),
    'supcon_syncbn': (True, True),
    'simclr_syncbn': (True, False),
    'supcon_moco': (False, True),
    'simclr_moco': (False, False),
}


def make_case(name):
    bn, _ = CASES[name]
    torch.manual_seed(sorted(CASES).index(name))
    model = TinyNet(bn).double()
    view1, view2 = torch.randn(2, BATCH, 3, 6, 6, dtype=torch.float64)
    return model.state_dict(), view1, view2


def sgd_steps(model, view1, view2, labels, steps=2):
    """main_supcon's step: the model runs once on cat([view1, view2]) of the (local) batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    criterion = SupConLoss(temperature=0.1)
    model.train()
    bsz = view1.shape[0]
    for _ in range(steps):  # the second step also exercises momentum
        features = model(torch.cat([view1, view2], dim=0))
        f1, f2 = torch.split(features, [bsz, bsz], dim=0)
        features = torch.cat([f1.unsqueeze(1), f2.unsqueeze(1)], dim=1)
        loss = criterion(features, labels) if labels is not None else criterion(features)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {k: v.detach().cpu().clone() for k, v in checkpoint.bare_state_dict(model).items()}


def moco_steps(model, view1, view2, labels, steps=3, queue_size=12):
    """main_supcon.py --moco's step through moco.MomentumContrast: queries from the model, keys
    from its moving average (shuffled across ranks), contrasted with the labelled queue, then
    EMA and enqueue.

    Returns the model's weights, the key encoder's weights and the queue's rows and labels.
    A queue of 12 rows takes 8 keys a step: it fills, then wraps around.
    """
    from supcon.objectives.moco import MomentumContrast

    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    criterion = SupConLoss(temperature=0.1)
    bare = model.module if hasattr(model, 'module') else model
    bare.feat_dim = 5  # the queue's width (SupConResNet has it; this small model does not)
    moco = MomentumContrast(bare, queue_size, momentum=0.9)  # queue rows kept in float32
    rt = runtime.Runtime(device=torch.device('cpu'))
    model.train()
    bsz = view1.shape[0]
    queue_labels_of = labels if labels is not None else torch.zeros(bsz, dtype=torch.long)
    for step in range(steps):
        images = torch.cat([view1, view2], dim=0)
        features = model(images)
        features = torch.stack(torch.split(features, [bsz, bsz], dim=0), dim=1)
        loss = moco(criterion, images, features, queue_labels_of, labels, rt, shuffle_seed=step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        moco.step_done(bare)
    rows, row_labels = moco.queue.contents()
    return {
        'model': {k: v.detach().cpu().clone() for k, v in bare.state_dict().items()},
        'key': {
            k: v.detach().cpu().clone() for k, v in moco.key_encoder.model.state_dict().items()
        },
        'queue': rows.cpu(),
        'queue_labels': row_labels.cpu(),
        'ptr': int(moco.queue.ptr),
    }


def _worker(rank, world, names, device_name):
    """One-step cases on ``device_name``, then (on CPU) distributed evaluation."""
    device = torch.device(device_name)
    results = {}
    for name in names:
        bn, supervised = CASES[name]
        state, view1, view2 = make_case(name)
        model = TinyNet(bn).double()
        model.load_state_dict(state)
        if bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None
        )
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        labels = LABELS[half].to(device) if supervised else None
        steps = moco_steps if name.endswith('_moco') else sgd_steps
        results[name] = steps(model, view1[half].to(device), view2[half].to(device), labels)
        if name.endswith('_moco'):  # every rank's queue, to compare
            queues = [None] * world
            dist.all_gather_object(queues, (results[name]['queue'], results[name]['queue_labels']))
            results[name]['queues'] = queues
    if device.type == 'cpu':
        result, indices = _validate(rank, world)
        shares = [None] * world
        dist.all_gather_object(shares, indices)
        results['validate'] = {'result': result, 'shares': shares}
    return results


def run_two_ranks(gloo_ranks, names, device):
    # fork skips re-importing torch in the children (CPU only: a forked child cannot use CUDA)
    start_method = 'fork' if device == 'cpu' else 'spawn'
    return gloo_ranks(_worker, names, device, world=WORLD_SIZE, start_method=start_method)[0]


# DataLoader forks the same way; Python 3.12 warns about any fork of a threaded process
FORK_OK = pytest.mark.filterwarnings('ignore:This process .* is multi-threaded:DeprecationWarning')


@pytest.fixture(scope='module')
def cpu_ranks(gloo_ranks):
    return run_two_ranks(gloo_ranks, ['supcon', 'simclr', 'supcon_moco', 'simclr_moco'], 'cpu')


def check_one_step_equivalence(ddp, names, device):
    for name in names:
        bn, supervised = CASES[name]
        state, view1, view2 = make_case(name)
        model = TinyNet(bn).double().to(device)
        model.load_state_dict(state)
        single = sgd_steps(
            model, view1.to(device), view2.to(device), LABELS.to(device) if supervised else None
        )
        params = {k for k, _ in model.named_parameters()}
        weights = {k: v for k, v in single.items() if k in params}
        assert relative_error(ddp[name], weights, state) < 1e-6, name
        if bn:
            buffers = {k: v for k, v in single.items() if k not in params}
            assert any('running_var' in k for k in buffers)
            assert relative_error(ddp[name], buffers, state) < 1e-6, name
            for key in buffers:
                if not buffers[key].is_floating_point():  # num_batches_tracked
                    assert torch.equal(ddp[name][key], buffers[key]), key


@FORK_OK
def test_one_step_ddp_equals_single_process_supcon_and_simclr(cpu_ranks):
    check_one_step_equivalence(cpu_ranks, ['supcon', 'simclr'], 'cpu')


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="PyTorch's SyncBatchNorm runs only on CUDA"
)
def test_one_step_ddp_syncbn_equals_single_process_batchnorm(gloo_ranks):
    names = ['supcon_syncbn', 'simclr_syncbn']
    check_one_step_equivalence(run_two_ranks(gloo_ranks, names, 'cuda:0'), names, 'cuda:0')


# ---------------------------------------------------------------- distributed evaluation

N_TEST = 11  # not divisible by the 2 ranks


def _validation_case():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(N_TEST, 4, generator=generator)
    labels = torch.randint(0, 6, (N_TEST,), generator=generator)
    torch.manual_seed(4)
    classifier = nn.Linear(4, 6)
    dataset = torch.utils.data.TensorDataset(features, labels)
    return dataset, classifier


def _validate(rank, world_size):
    dataset, classifier = _validation_case()
    loader, sampler = build_loader(
        dataset, 2, shuffle=False, seed=0, rank=rank, world_size=world_size, pad=False
    )
    opt = argparse.Namespace(print_freq=1000)
    rt = runtime.Runtime(device=torch.device('cpu'), rank=rank, world_size=world_size)
    classifier.eval()
    return (
        classify.validate(loader, classifier, nn.CrossEntropyLoss(), opt, rt, num_classes=6),
        sampler.rank_indices(),
    )


@FORK_OK
def test_distributed_validate_counts_each_sample_once(cpu_ranks):
    got = cpu_ranks['validate']
    shares = got['shares']
    assert sorted(i for share in shares for i in share) == list(range(N_TEST))
    assert sorted(len(share) for share in shares) == [5, 6]
    (loss, top1, top5), _ = _validate(0, 1)
    d_loss, d_top1, d_top5 = got['result']
    assert d_top1 == pytest.approx(top1, rel=1e-12) and d_top5 == pytest.approx(top5, rel=1e-12)
    assert d_loss == pytest.approx(loss, rel=1e-6)
    # 11 samples: each accuracy is a whole number of samples out of 11
    assert round(top1 * N_TEST / 100, 6) == round(top1 * N_TEST / 100)


# ---------------------------------------------------------------- set-up checks in one process


def _torchrun_env(monkeypatch, world_size):
    for key, value in dict(
        WORLD_SIZE=world_size,
        LOCAL_RANK=0,
        RANK=0,
        LOCAL_WORLD_SIZE=world_size,
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT=29500,
    ).items():
        monkeypatch.setenv(key, str(value))


def test_syncbn_without_torchrun_prints_a_note(monkeypatch, capsys):
    for key in ('WORLD_SIZE', 'LOCAL_RANK', 'RANK'):
        monkeypatch.delenv(key, raising=False)
    opt = runtime_opt(syncBN=True)
    with torch.random.fork_rng():
        rt = runtime.setup_runtime(opt)
    assert not rt.distributed and rt.local_batch_size == 8
    assert 'note: --syncBN has no effect without torchrun' in capsys.readouterr().out


def test_odd_global_batch_and_cpu_syncbn_fail_before_the_process_group(monkeypatch):
    _torchrun_env(monkeypatch, 2)
    with pytest.raises(util.UserError, match=r'--batch_size 7 does not divide by the 2 processes'):
        runtime.setup_runtime(runtime_opt(batch_size=7))
    with pytest.raises(util.UserError, match=r'--syncBN needs CUDA'):
        runtime.setup_runtime(runtime_opt(syncBN=True))
    assert not dist.is_initialized()


@pytest.mark.parametrize('batch', [2, 4, 6, 8, 16])
def test_steps_per_epoch_and_warmup_do_not_depend_on_world_size(batch):
    """Same global batch -> same steps per epoch on every rank, so warm-up and schedule match."""
    for num_samples in range(batch, 70):
        data = list(range(num_samples))
        single = len(build_loader(data, batch, shuffle=True, seed=0)[0])
        for rank in range(WORLD_SIZE):
            loader, sampler = build_loader(
                data, batch // WORLD_SIZE, shuffle=True, seed=0, rank=rank, world_size=WORLD_SIZE
            )
            assert len(loader) == single, (num_samples, rank)
    # each global step of 2 ranks covers exactly the single process's batch
    data = list(range(32))
    single = list(build_loader(data, batch, shuffle=True, seed=5)[1].rank_indices())
    shards = [
        build_loader(data, batch // 2, shuffle=True, seed=5, rank=r, world_size=2)[1].rank_indices()
        for r in range(2)
    ]
    for step in range(32 // batch):
        local = slice(step * batch // 2, (step + 1) * batch // 2)
        assert sorted(shards[0][local] + shards[1][local]) == sorted(
            single[step * batch : (step + 1) * batch]
        )
    assert isinstance(build_loader(data, 2, shuffle=True, seed=0)[0].dataset, SeededDataset)


# ---------------------------------------------------------------- the scripts under torchrun


def _write_images(folder, counts, seed):
    rng = np.random.default_rng(seed)
    for label, count in enumerate(counts):
        os.makedirs(os.path.join(folder, f'class{label}'), exist_ok=True)
        for i in range(count):
            base = np.array([80 * label, 255 - 80 * label, 128], dtype=float)
            pixels = np.clip(base + rng.normal(0, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f'class{label}', f'{i:03d}.png'))


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny')
    _write_images(str(root / 'train'), [8, 8, 8], seed=0)  # 24 images: 3 full steps of 8
    _write_images(str(root / 'test'), [4, 4, 3], seed=1)  # 11: not divisible by 2
    return root


def data_args(root, batch=8):
    return [
        '--dataset',
        'path',
        '--data_folder',
        str(root / 'train'),
        '--test_folder',
        str(root / 'test'),
        '--mean',
        '(0.5, 0.5, 0.5)',
        '--std',
        '(0.25, 0.25, 0.25)',
        '--size',
        '8',
        '--batch_size',
        str(batch),
        '--batch_size_val',
        '4',
        '--epochs',
        '1',
        '--num_workers',
        '0',
        '--device',
        'cpu',
        '--seed',
        '1',
    ]


def _env():
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            'WORLD_SIZE',
            'RANK',
            'LOCAL_RANK',
            'LOCAL_WORLD_SIZE',
            'MASTER_ADDR',
            'MASTER_PORT',
        )
    }
    env['OMP_NUM_THREADS'] = '1'
    env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
    return env


def torchrun(script, args, cwd, rdzv=False):
    """``torchrun --nproc_per_node 2`` as the README shows it (or its multi-machine form)."""
    port = free_port()
    launcher = [sys.executable, '-m', 'torch.distributed.run']
    if rdzv:  # README's multi-machine command, on one machine
        launcher += [
            '--nnodes',
            '1',
            '--nproc_per_node',
            str(WORLD_SIZE),
            '--rdzv_backend',
            'c10d',
            '--rdzv_id',
            'supcon',
            '--rdzv_endpoint',
            f'127.0.0.1:{port}',
        ]
    else:
        launcher += ['--nproc_per_node', str(WORLD_SIZE), '--master_port', str(port)]
    return subprocess.run(
        launcher + [os.path.join(REPO, script)] + args,
        cwd=str(cwd),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_run(proc, cwd, expect_best):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.count('epoch 1, total time') == 1, out
    assert out.count('options:') == 1, out
    assert out.count('best accuracy:') == (1 if expect_best else 0), out
    checkpoints = glob.glob(os.path.join(str(cwd), 'save', '**', '*.pth'), recursive=True)
    assert sorted(os.path.basename(p) for p in checkpoints) == ['checkpoint.pth', 'last.pth']
    for path in checkpoints:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location='cpu', weights_only=True)['model']
        assert not [k for k in state if 'module.' in k or '_orig_mod.' in k], list(state)[:5]
    events = glob.glob(
        os.path.join(str(cwd), 'save', '**', 'events.out.tfevents.*'), recursive=True
    )
    assert len(events) == 1, events  # rank 0 alone writes TensorBoard
    return {os.path.basename(p): p for p in checkpoints}


@pytest.fixture(scope='module')
def twenty(tmp_path_factory):
    """Two classes of 10 training images (batches of 8, 8 and a shorter 4) and 4 test images
    each."""
    root = tmp_path_factory.mktemp('twenty')
    write_image_folder(root / 'train', {'a': 10, 'b': 10}, size=8, seed=0)
    write_image_folder(root / 'test', {'a': 4, 'b': 4}, size=8, seed=1)
    return root


def supcon_args(root):
    """main_supcon.py with both classifier heads: the online probe and the joint term."""
    options = dict(batch_size=8, learning_rate=0.05, online_probe=True, ce_weight=0.5)
    return folder_args(root, model='resnet18', **options)


@pytest.fixture(scope='module')
def supcon_run(twenty, tmp_path_factory):
    """main_supcon.py under torchrun's multi-machine (rendezvous) form, one run for the tests
    below: what the run prints and saves, both heads, --grad_cache against it, main_linear.py on
    its encoder (starting torchrun costs as much as the run)."""
    cwd = tmp_path_factory.mktemp('supcon')
    proc = torchrun('main_supcon.py', supcon_args(twenty), cwd, rdzv=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, cwd


@pytest.mark.slow
def test_main_supcon_under_torchrun_rendezvous(supcon_run):
    proc, cwd = supcon_run
    check_run(proc, cwd, expect_best=False)


@pytest.mark.slow
def test_main_supcon_with_both_heads_under_torchrun(supcon_run):
    """One line per evaluation, every test image scored once, both heads' state saved by
    rank 0."""
    proc, cwd = supcon_run
    assert proc.stdout.count('probe accuracy: ') == 1 and proc.stdout.count('ce accuracy: ') == 1
    assert '(classifiers on 8 test images' in proc.stdout  # 2 classes x 4, over 2 ranks
    (path,) = glob.glob(os.path.join(str(cwd), 'save', '**', 'last.pth'), recursive=True)
    ckpt = checkpoint.load_checkpoint(path)
    assert ckpt['opt']['world_size'] == 2
    assert set(ckpt['probe']) == {'classifier', 'optimizer'} and 'weight' in ckpt['ce_classifier']
    assert not torch.equal(ckpt['probe']['classifier']['weight'], torch.zeros(1))


@pytest.mark.slow
def test_the_script_with_grad_cache_equals_torchrun_on_batch_over_m_processes(
    supcon_run, twenty, tmp_path
):
    """main_supcon.py --batch_size 8 --grad_cache 4 against torchrun's 2 processes of 4 images,
    on the real sampler, the last, shorter batch (4 images) included; the error is measured
    against the difference from one process without --grad_cache (BatchNorm over 8)."""
    args = supcon_args(twenty)
    weights = {}
    for name, extra in (('chunks', ['--grad_cache', '4']), ('plain', [])):
        (tmp_path / name).mkdir()
        result = call('main_supcon', args + extra, tmp_path / name)
        assert result.code == 0, result.err
        assert 'epoch 1, total time' in result.out
        weights[name] = save_folder('main_supcon', args + extra, tmp_path / name) / 'last.pth'
    weights['processes'] = save_folder('main_supcon', args, supcon_run[1]) / 'last.pth'
    weights = {k: checkpoint.load_checkpoint(str(v))['model'] for k, v in weights.items()}
    # BatchNorm's running statistics are rank 0's alone
    names = [k for k, v in weights['processes'].items() if v.is_floating_point()]
    weights = {k: {n: w[n] for n in names if 'running' not in n} for k, w in weights.items()}
    error = relative_error(weights['chunks'], weights['processes'])
    without = relative_error(weights['plain'], weights['processes'])
    print(f'relative to torchrun: --grad_cache {error:.3g}, without it {without:.3g}')
    assert error < 1e-2 * without, (error, without)


@pytest.mark.slow
def test_main_ce_under_torchrun(tiny_data, tmp_path):
    proc = torchrun('main_ce.py', data_args(tiny_data) + ['--model', 'resnet18'], tmp_path)
    check_run(proc, tmp_path, expect_best=True)
    assert proc.stdout.count(' * Acc@1') == 1


def _acc_line(out):
    lines = [line for line in out.splitlines() if line.startswith(' * Acc@1')]
    assert len(lines) == 1, out
    return lines[0]


@pytest.mark.slow
def test_main_linear_under_torchrun_matches_one_process(supcon_run, tiny_data, tmp_path):
    proc, cwd = supcon_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = glob.glob(os.path.join(str(cwd), 'save', '**', 'last.pth'), recursive=True)[0]
    args = data_args(tiny_data) + ['--ckpt', ckpt]
    (tmp_path / 'ddp').mkdir()
    (tmp_path / 'one').mkdir()
    ddp = torchrun('main_linear.py', args, tmp_path / 'ddp')
    saved = check_run(ddp, tmp_path / 'ddp', expect_best=True)
    one = run('main_linear', args, tmp_path / 'one')  # in this process: one thread, as a rank
    assert one.returncode == 0, one.stderr[-3000:]
    # same global batch, seeded sampler, exact gradient averaging: the same classifier...
    want = checkpoint.load_checkpoint(
        glob.glob(os.path.join(str(tmp_path / 'one'), 'save', '**', 'last.pth'), recursive=True)[0]
    )['model']
    got = checkpoint.load_checkpoint(saved['last.pth'])['model']
    assert sorted(got) == ['fc.bias', 'fc.weight']
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    # ...and the same accuracy over all 11 test images, each counted once
    assert _acc_line(ddp.stdout) == _acc_line(one.stdout)
    best = re.findall(r'best accuracy: ([\d.]+)', ddp.stdout)
    assert best == re.findall(r'best accuracy: ([\d.]+)', one.stdout)
    assert math.isclose(float(best[0]) * 11 / 100, round(float(best[0]) * 11 / 100), abs_tol=0.01)


@FORK_OK
@pytest.mark.parametrize('name', ['supcon_moco', 'simclr_moco'])
def test_moco_steps_on_two_ranks_equal_one_process(cpu_ranks, name):
    """Keys and labels are gathered before they are enqueued: both ranks hold the same queue,
    and three steps (the queue fills and wraps) equal one process on the whole batch. The
    net has no BatchNorm, so shuffling the keys across ranks must not change them."""
    _, supervised = CASES[name]
    got = cpu_ranks[name]
    (rows0, labels0), (rows1, labels1) = got['queues']
    assert torch.equal(rows0, rows1) and torch.equal(labels0, labels1)
    state, view1, view2 = make_case(name)
    model = TinyNet(False).double()
    model.load_state_dict(state)
    single = moco_steps(model, view1, view2, LABELS if supervised else None)
    assert got['ptr'] == single['ptr'] == (3 * 2 * BATCH) % 12
    assert relative_error(got['model'], single['model'], state) < 1e-6
    assert relative_error(got['key'], single['key'], state) < 1e-6
    torch.testing.assert_close(got['queue'], single['queue'], rtol=1e-6, atol=1e-6)
    assert torch.equal(got['queue_labels'], single['queue_labels'])
