"""--grad_cache M (supcon/objectives/grad_cache.py): a step in chunks of M images is the step of
batch / M processes of M images each.

In this process: the chunked gradient against the same chunks forwarded with autograd as
processes would (float64, --amp, channels_last, the joint classifier's path), the random state
of dropout replayed in the second pass, BatchNorm's running statistics moved once per chunk, the
sampler's shards, the refusals and the run name. On gloo processes (slow): the weights after a
few steps equal those of batch / M processes, for SupCon, SimCLR, the hybrid, partial and
multi-hot labels and --moco (the key encoder and the queue too), in one process and on two;
kill and --resume auto. main_supcon.py --grad_cache against torchrun is in test_distributed.py,
on the run of the script under torchrun that its other tests share.
"""

import argparse
import shutil
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import relative_error
from inprocess import assert_one_line_error, call, save_folder
from test_resume import Runs, max_abs_diff

from losses import SupConLoss
from networks.resnet_big import SupConResNet
from supcon.data.sampling import SeededSampler
from supcon.errors import UserError
from supcon.objectives import grad_cache, probe
from supcon.objectives.moco import MomentumContrast
from supcon.objectives.positives import TAGS as POSITIVES_TAGS
from supcon.objectives.step import TrainingStep
from supcon.system import checkpoint, runtime
from util import AverageMeter

BATCH = 8  # the global batch of every step
CLASSES = 4


class TinyEncoder(nn.Module):
    """Conv + BatchNorm (+ dropout) + pooling: small enough for float64 comparisons."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(F.relu(self.bn(self.conv(x)))).mean((2, 3))


def tiny_model(dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    return SupConResNet(encoder=(TinyEncoder(dropout), 6), feat_dim=4).to(dtype)


def views_of(step, dtype=torch.float64):
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(BATCH, 3, 6, 6, generator=generator).to(dtype) for _ in range(2)]


LABELS = {
    'supcon': torch.tensor([0, 1, 2, 0, 1, 2, 3, 3]),
    'partial': torch.tensor([0, -1, 2, 0, -1, 2, 3, -1]),
    'multilabel': torch.tensor(
        [[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1]] * 2, dtype=torch.float32
    ),
}

CASES = {  # name: (method, labels, --moco, the heads (online probe and --ce_weight 0.5))
    'supcon': ('SupCon', 'supcon', False, False),
    'simclr': ('SimCLR', 'supcon', False, False),
    'hybrid': ('SupCon_hybrid', 'supcon', False, False),
    'partial': ('SupCon', 'partial', False, True),
    'multilabel': ('SupCon', 'multilabel', False, False),
    'moco': ('SupCon', 'supcon', True, False),
}


def make_step(
    model, name='supcon', chunk=0, rank=0, world=1, amp=None, channels_last=False, views=(2, 0)
):
    """main_supcon.set_step for ``model`` (wrapped or bare), case ``name`` of CASES."""
    method, labels, moco, heads = CASES[name]
    opt = argparse.Namespace(
        method=method,
        grad_cache=chunk,
        batch_size=BATCH,
        online_probe=heads,
        probe_lr=0.5,
        epochs=2,
        ce_weight=0.5 if heads else 0.0,
        n_views=views[0],
        small_views=views[1],
        small_size=4 if views[1] else None,
    )
    rt = runtime.Runtime(
        device=torch.device('cpu'),
        rank=rank,
        world_size=world,
        local_batch_size=BATCH // world,
        amp_dtype=amp,
        channels_last=channels_last,
    )
    targets = LABELS[labels]
    train_set = argparse.Namespace(
        classes=[str(c) for c in range(CLASSES)],
        targets=[row.numpy() for row in targets] if targets.dim() == 2 else targets.tolist(),
    )
    meters = {tag: AverageMeter() for tag in POSITIVES_TAGS}
    bare = runtime.unwrap(model)
    key_path = MomentumContrast(bare, 12, momentum=0.9) if moco else None  # 16 keys a step
    classifiers = None
    if heads:
        classifiers = probe.ClassifierHeads(opt, rt, 6, CLASSES, partial=True)
        nn.init.normal_(classifiers.joint.weight, generator=torch.Generator().manual_seed(1))
    criterion = SupConLoss(temperature=0.1, hybrid=method == 'SupCon_hybrid', multilabel='jaccard')
    return TrainingStep(opt, rt, model, criterion, train_set, meters, key_path, classifiers)


def loop_at(index, steps=3):
    return types.SimpleNamespace(epoch=1, step=index, steps=steps, log_views=lambda *a, **k: None)


def mine(tensor, rank, world):
    """This process's images of the global batch: the sampler's shard, every world-th."""
    return tensor[rank::world]


# --------------------------------------------------------------------------- in this process


def as_processes(model, views, labels, n_chunks, criterion, heads=None):
    """The loss of ``n_chunks`` processes, written out: each forwards its own images (every
    n_chunks-th, BatchNorm over them alone, with autograd), the loss sees every process's rows."""
    features, encoded, order = [], [], []
    for j in range(n_chunks):
        images = torch.arange(j, len(labels), n_chunks)
        projected, enc = model(torch.cat([views[0][images], views[1][images]]), with_features=True)
        features.append(torch.stack(projected.split(len(images)), dim=1))
        encoded.append(enc.view(2, len(images), -1))
        order.append(images)
    order = torch.cat(order)
    loss = criterion(torch.cat(features), labels[order])
    if heads is not None:
        loss = loss + heads(torch.cat(encoded, dim=1).flatten(0, 1), labels[order])
    return loss


def chunked_gradients(step, model, views, labels):
    batch = step.views(views, labels, loop_at(0))
    out = step.forward(model, batch)
    loss = step.loss(out, batch)
    model.zero_grad(set_to_none=True)
    step.backward(loss, out)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('how', ['float64', 'ce_weight', 'amp', 'channels_last'])
def test_the_chunked_gradient_is_that_of_the_chunks_as_processes(how):
    dtype = torch.float64 if how in ('float64', 'ce_weight') else torch.float32
    name = 'partial' if how == 'ce_weight' else 'supcon'
    amp = torch.bfloat16 if how == 'amp' else None
    model = tiny_model(dtype=dtype)
    if how == 'channels_last':
        model = model.to(memory_format=torch.channels_last)
    step = make_step(model, name, chunk=2, amp=amp, channels_last=how == 'channels_last')
    views, labels = views_of(0, dtype), LABELS[CASES[name][1]]
    loss, grads = chunked_gradients(step, model, views, labels)

    reference = tiny_model(dtype=dtype)
    heads = make_step(reference, name).heads
    with runtime.autocast(step.rt):
        expected = as_processes(reference, views, labels, 4, step.criterion, heads)
    reference.zero_grad(set_to_none=True)
    expected.backward()
    tolerance = dict(float64=1e-10, ce_weight=1e-6, amp=1e-2, channels_last=1e-4)[how]
    assert float(loss) == pytest.approx(float(expected.detach()), rel=tolerance)
    assert relative_error(grads, {n: p.grad for n, p in reference.named_parameters()}) < tolerance
    if how == 'ce_weight':  # the joint classifier's gradient reached the encoder
        plain = tiny_model()
        as_processes(plain, views, labels, 4, step.criterion).backward()
        assert not torch.allclose(plain.encoder.conv.weight.grad, grads['encoder.conv.weight'])


@pytest.mark.parametrize('full, small', [(4, 0), (2, 2), (1, 3)])
def test_more_views_and_small_views_chunk_as_processes(full, small):
    """--n_views / --small_views under --grad_cache 2: each size is its own forward pass of a
    chunk, and the gradient is that of 4 processes forwarding their images' views size by size."""
    model = tiny_model()
    step = make_step(model, chunk=2, views=(full, small))
    generator = torch.Generator().manual_seed(7)
    sides = [6] * full + [4] * small
    views = [torch.randn(BATCH, 3, s, s, generator=generator, dtype=torch.float64) for s in sides]
    labels = LABELS['supcon']
    loss, grads = chunked_gradients(step, model, views, labels)

    reference = tiny_model()
    features, order = [], []
    for j in range(BATCH // 2):
        images = torch.arange(j, BATCH, BATCH // 2)
        projected = [reference(torch.cat([v[images] for v in views[:full]]))]
        if small:
            projected.append(reference(torch.cat([v[images] for v in views[full:]])))
        per_view = torch.cat(projected).split(len(images))  # view-major, full ones first
        features.append(torch.stack(per_view, dim=1))
        order.append(images)
    expected = step.criterion(torch.cat(features), labels[torch.cat(order)])
    expected.backward()
    assert len(views) == full + small and step.layout.total == full + small
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-10)
    assert relative_error(grads, {n: p.grad for n, p in reference.named_parameters()}) < 1e-10


def test_the_gradient_scaler_scales_both_passes_once_and_unscales_once():
    """float16 --amp's scaler (on CPU here): the chunks' gradients carry the scale once, and the
    optimizer step, unscaled once, is plain SGD on the batch's gradient."""
    model = tiny_model()
    step = make_step(model, chunk=2)
    step.scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    views, labels = views_of(0), LABELS['supcon']
    _, grads = chunked_gradients(step, model, views, labels)
    reference = tiny_model()
    as_processes(reference, views, labels, 4, step.criterion).backward()
    want = {n: p.grad for n, p in reference.named_parameters()}
    assert relative_error({n: g / 1024 for n, g in grads.items()}, want) < 1e-10

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    step.optimizer_step(torch.optim.SGD(model.parameters(), lr=0.1), batch=None)
    stepped = {n: start[n] - 0.1 * g for n, g in want.items()}
    assert relative_error(dict(model.named_parameters()), stepped, start) < 1e-10


def test_dropout_draws_the_same_in_both_passes():
    """The second pass replays each chunk's random state: the gradient is that of the masks the
    loss saw, and the generator continues as after one forward pass."""
    model = tiny_model(dropout=0.5)
    step = make_step(model, chunk=2)
    views, labels = views_of(0), LABELS['supcon']
    torch.manual_seed(7)
    _, grads = chunked_gradients(step, model, views, labels)
    after = torch.rand(3)

    reference = tiny_model(dropout=0.5)
    torch.manual_seed(7)
    loss = as_processes(reference, views, labels, 4, step.criterion)
    expected_after = torch.rand(3)
    loss.backward()
    assert torch.equal(after, expected_after)
    assert relative_error(grads, {n: p.grad for n, p in reference.named_parameters()}) < 1e-10


def test_batchnorm_running_statistics_move_once_per_chunk():
    model = tiny_model()
    step = make_step(model, chunk=2)
    views, labels = views_of(0), LABELS['supcon']
    chunked_gradients(step, model, views, labels)

    reference = tiny_model()  # each chunk's images through BatchNorm once, in train mode
    with torch.no_grad():
        for j in range(4):
            images = torch.arange(j, BATCH, 4)
            reference(torch.cat([views[0][images], views[1][images]]))
    bn, want = model.encoder.bn, reference.encoder.bn
    assert int(bn.num_batches_tracked) == 4
    assert torch.allclose(bn.running_mean, want.running_mean, rtol=0, atol=1e-12)
    assert torch.allclose(bn.running_var, want.running_var, rtol=0, atol=1e-12)
    assert not torch.allclose(bn.running_mean, tiny_model().encoder.bn.running_mean)


@pytest.mark.parametrize('world, chunks', [(1, 4), (2, 2), (2, 3)])
def test_a_processs_chunk_is_the_batch_of_another_process(world, chunks):
    """SeededSampler shards with stride: chunk j of rank r's batch is the batch of rank
    r + world * j of world * chunks processes, the last, shorter batch included (when the data
    divides by the processes, so that neither sampler pads)."""
    per_chunk = 2
    n_images = 5 * world * chunks  # 2.5 batches
    local = per_chunk * chunks
    for rank in range(world):
        sampler = SeededSampler(n_images, shuffle=True, seed=3, rank=rank, world_size=world)
        sampler.set_epoch(2)
        mine_ = sampler.rank_indices()
        batches = [mine_[i : i + local] for i in range(0, len(mine_), local)]
        assert len(batches[-1]) < local
        for j in range(chunks):
            other = SeededSampler(
                n_images, shuffle=True, seed=3, rank=rank + world * j, world_size=world * chunks
            )
            other.set_epoch(2)
            theirs = other.rank_indices()
            for k, batch in enumerate(batches):
                chunk = [batch[i] for i in grad_cache.strided_chunks(len(batch), chunks)[j]]
                assert chunk == theirs[k * per_chunk : (k + 1) * per_chunk], (rank, j, k)


def test_refusals_and_run_name():
    def options(**changes):
        values = dict(grad_cache=2, batch_size=8, syncBN=False)
        values.update(changes)
        return argparse.Namespace(**values)

    grad_cache.check_options(options(), 'supcon')
    for changes, message in (
        (dict(grad_cache=3), '--grad_cache 3 does not divide --batch_size 8'),
        (dict(grad_cache=-1), '--grad_cache must be 0 (off) or a number of images'),
        (dict(syncBN=True), '--grad_cache cannot combine with --syncBN'),
    ):
        with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
            grad_cache.check_options(options(**changes), 'supcon')
    rt = runtime.Runtime(device=torch.device('cpu'), world_size=4, local_batch_size=2)
    with pytest.raises(UserError, match=r'--grad_cache 4 does not divide the 2 images of each'):
        grad_cache.GradCache.build(options(grad_cache=4), rt)
    assert grad_cache.GradCache.build(options(grad_cache=0), rt) is None
    assert grad_cache.run_name(options(), 'supcon') == ['gc2']
    assert grad_cache.run_name(options(grad_cache=0), 'supcon') == []


def test_the_script_refuses_in_one_line_and_names_the_run(tmp_path):
    import main_supcon

    args = ['--dataset', 'digits', '--batch_size', '8', '--device', 'cpu']
    name = main_supcon.parse_option(args + ['--grad_cache', '4']).model_name
    assert name == main_supcon.parse_option(args).model_name + '_gc4'
    for extra, fragment in (
        (['--grad_cache', '3'], '--grad_cache 3 does not divide --batch_size 8'),
        (['--grad_cache', '4', '--syncBN'], 'cannot combine with --syncBN'),
    ):
        assert_one_line_error(call('main_supcon', args + extra, tmp_path), fragment)
    assert not list(tmp_path.rglob('*.pth'))


# --------------------------------------------------------------------------- on gloo processes

STEPS = 3  # the --moco queue (12 rows, 16 keys a step) wraps at every step


def train(name, chunk=0, rank=0, world=1):
    """STEPS steps of case ``name`` on this process's share of each global batch; the trained
    weights (parameters: BatchNorm's running statistics are rank 0's alone under DDP), and the
    key encoder, queue and classifiers where the case has them."""
    model = tiny_model()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    step = make_step(model, name, chunk, rank, world)
    extra = [p for module in step.trained_by_the_run_optimizer() for p in module.parameters()]
    optimizer = torch.optim.SGD(
        list(model.parameters()) + extra, lr=0.5, momentum=0.9, weight_decay=1e-4
    )
    labels = LABELS[CASES[name][1]]
    model.train()
    for index in range(STEPS):
        views = [mine(v, rank, world) for v in views_of(index)]
        batch = step.views(views, mine(labels, rank, world), loop_at(index, STEPS))
        out = step.forward(model, batch)
        loss = step.loss(out, batch)
        optimizer.zero_grad(set_to_none=True)
        step.backward(loss, out)
        step.optimizer_step(optimizer, batch)

    def parameters(module):
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    state = {'model': parameters(runtime.unwrap(model))}
    if step.moco is not None:
        state['key'] = {n: p.clone() for n, p in step.moco.key_encoder.model.named_parameters()}
        state['queue'] = {k: v.clone() for k, v in step.moco.queue.state_dict().items()}
    if step.heads is not None:
        state['probe'] = parameters(step.heads.probe.classifier)
        state['joint'] = parameters(step.heads.joint)
    return state


def _worker(rank, world, chunk):
    return {name: train(name, chunk, rank, world) for name in CASES}


# DataLoader forks the same way; Python 3.12 warns about any fork of a threaded process
FORK_OK = pytest.mark.filterwarnings('ignore:This process .* is multi-threaded:DeprecationWarning')


@pytest.fixture(scope='module')
def trained(gloo_ranks):
    """The same global batches of 8 on 4 processes of 2 images, on 1 process with
    --grad_cache 2 and on 2 processes with --grad_cache 2."""
    with torch.random.fork_rng():
        return {
            'processes': gloo_ranks(_worker, 0, world=4)[0],
            'one': {name: train(name, chunk=2) for name in CASES},
            'two': gloo_ranks(_worker, 2, world=2)[0],
        }


@pytest.mark.slow
@FORK_OK
@pytest.mark.parametrize('where', ['one', 'two'])
@pytest.mark.parametrize('name', list(CASES))
def test_chunks_train_as_batch_over_m_processes(trained, name, where):
    want, got = trained['processes'][name], trained[where][name]
    start = {n: p.detach() for n, p in tiny_model().named_parameters()}
    # the classifiers' cross-entropy is float32, the rest float64
    tolerance = 1e-5 if CASES[name][3] else 1e-9
    assert relative_error(got['model'], want['model'], start) < tolerance
    if 'key' in want:  # the key encoder (shuffle-BN over the chunks) and the queue's order
        assert relative_error(got['key'], want['key'], start) < tolerance
        assert int(got['queue']['ptr']) == int(want['queue']['ptr']) == (STEPS * 16) % 12
        assert torch.equal(got['queue']['labels'], want['queue']['labels'])
        torch.testing.assert_close(got['queue']['features'], want['queue']['features'])
    if 'probe' in want:
        for head in ('probe', 'joint'):
            for key in want[head]:
                torch.testing.assert_close(got[head][key], want[head][key], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- the script: kill and resume


class GradCacheRuns(Runs):
    """test_resume's runs of main_supcon.py, with --grad_cache 2 (2 chunks of the batch of 4)
    and --moco (the queue of 12 wraps every epoch)."""

    def args(self, script, **changes):
        options = dict(grad_cache=2, moco=True, moco_k=12, moco_m=0.9)
        return super().args(script, **dict(options, **changes))


@pytest.fixture(scope='module')
def runs(tmp_path_factory, images):
    root = tmp_path_factory.mktemp('runs')
    yield GradCacheRuns(root, images)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_kill_after_epoch_1_and_resume_auto_equals_uninterrupted_run(runs):
    _, reference = runs.reference('main_supcon')
    cwd, result = runs.killed_and_resumed('main_supcon')
    assert 'resumed from ' in result.out and 'continuing at epoch ' in result.out
    resumed = save_folder('main_supcon', runs.args('main_supcon'), cwd) / 'last.pth'
    assert resumed.parent.name.endswith('_moco_k12_m0.9_gc2')
    assert max_abs_diff(reference, resumed) <= 1e-6
    a, b = (checkpoint.load_checkpoint(str(path))['moco'] for path in (reference, resumed))
    assert a.keys() == b.keys() and int(a['queue.count']) == 12
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow
def test_resuming_with_another_chunk_size_is_refused(runs, tmp_path):
    _, reference = runs.reference('main_supcon')
    args = runs.args('main_supcon', grad_cache=4) + ['--resume', str(reference)]
    result = call('main_supcon', args, tmp_path)
    assert_one_line_error(result, '--grad_cache 4 differs from the run\'s 2')
