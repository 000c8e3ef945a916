"""probe.py: the online probe (--online_probe) and the joint classifier (--ce_weight).

The probe must never touch the encoder's gradient, score the evaluation split as a hand
computation does, step the same on 2 processes as on 1, and resume exactly; --ce_weight's
checkpoints must work with main_linear.py and main_tsne.py.
"""

import argparse
import math
import signal
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import folder_args, read_scalars, write_image_folder
from inprocess import assert_one_line_error, call, save_folder
from test_resume import spawn, tb_folder

from losses import SupConLoss
from networks.from_checkpoint import checkpoint_method
from networks.resnet_big import SupConResNet
from supcon.data import augment, datasets
from supcon.objectives import probe
from supcon.system import checkpoint, runtime

WORLD_SIZE = 2
EPOCHS = 2


def heads_options(**changes):
    values = dict(online_probe=True, probe_lr=0.5, epochs=2, ce_weight=0.0)
    values.update(changes)
    return argparse.Namespace(**values)


class TinyEncoder(torch.nn.Module):
    """Conv + BatchNorm + pooling: an encoder small enough for exact gradient comparisons."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))).mean((2, 3))


def supcon_step(model, images, labels, heads=None):
    """main_supcon.train()'s step on one batch; returns the model's gradients."""
    bsz = labels.shape[0]
    features, encoded = model(images, with_features=True)
    features = torch.stack(torch.split(features, [bsz, bsz]), dim=1)
    loss = SupConLoss(temperature=0.1)(features, labels)
    if heads is not None:
        loss = loss + heads(encoded, labels)
    model.zero_grad(set_to_none=True)
    loss.backward()
    if heads is not None:
        heads.step(1, 0, 4)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return SupConResNet(encoder=(TinyEncoder(), 6), feat_dim=4)


def test_the_probe_never_changes_the_encoders_gradient():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 6, 6, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    rt = runtime.Runtime(device=torch.device('cpu'))

    plain = supcon_step(tiny_model().train(), images, labels)
    heads = probe.ClassifierHeads(heads_options(), rt, 6, 3)
    before = heads.probe.classifier.weight.detach().clone()
    with_probe = supcon_step(tiny_model().train(), images, labels, heads)
    assert plain.keys() == with_probe.keys()
    for name in plain:
        assert torch.equal(plain[name], with_probe[name]), name
    # the probe did learn from that step
    assert not torch.equal(heads.probe.classifier.weight, before)

    # the same comparison sees a classifier whose gradient does reach the encoder
    joint = probe.ClassifierHeads(heads_options(online_probe=False, ce_weight=1.0), rt, 6, 3)
    torch.nn.init.normal_(joint.joint.weight, generator=torch.Generator().manual_seed(1))
    with_ce = supcon_step(tiny_model().train(), images, labels, joint)
    assert not torch.equal(plain['encoder.conv.weight'], with_ce['encoder.conv.weight'])
    assert torch.equal(plain['head.2.weight'], with_ce['head.2.weight'])  # not on the CE path


def test_the_probe_step_is_sgd_with_momentum_on_the_cross_entropy_at_a_cosine_rate():
    """Two steps against the plain formula: g = dCE/dW, v = 0.9 v + g, W -= lr_t v."""
    rt = runtime.Runtime(device=torch.device('cpu'))
    heads = probe.ClassifierHeads(heads_options(probe_lr=0.5, epochs=2), rt, 5, 3)
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias)]
    steps_per_epoch = 4
    for epoch, step in ((1, 0), (1, 3)):
        encoded = torch.randn(8, 5, generator=generator)
        labels = torch.tensor([0, 1, 2, 1])
        heads(encoded, labels)
        heads.step(epoch, step, steps_per_epoch)
        # by hand: softmax cross-entropy over both views' rows
        x, y = encoded.double(), torch.cat([labels, labels])
        p = torch.softmax(x @ weight.T + bias, dim=1)
        p[torch.arange(8), y] -= 1
        grads = [p.T @ x / 8, p.sum(0) / 8]
        done = (epoch - 1) * steps_per_epoch + step
        lr = 0.5 * 0.5 * (1 + math.cos(math.pi * done / (2 * steps_per_epoch)))
        for i, (param, grad) in enumerate(zip((weight, bias), grads)):
            velocity[i] = 0.9 * velocity[i] + grad
            param -= lr * velocity[i]
    assert torch.allclose(heads.probe.classifier.weight.double(), weight, atol=1e-6)
    assert torch.allclose(heads.probe.classifier.bias.double(), bias, atol=1e-6)


def test_unlabelled_images_are_left_out_of_both_classifiers():
    """-1 labels (--labelled_fraction, unlabelled CSV rows): both losses are the plain mean
    cross-entropy over the labelled rows alone, unlabelled rows get no gradient, and a step
    without any label adds an exact zero (not NaN)."""
    rt = runtime.Runtime(device=torch.device('cpu'))
    heads = probe.ClassifierHeads(heads_options(ce_weight=0.5), rt, 6, 3, partial=True)
    generator = torch.Generator().manual_seed(2)
    for classifier in heads.classifiers().values():
        torch.nn.init.normal_(classifier.weight, generator=generator)
    encoded = torch.randn(10, 6, generator=generator, requires_grad=True)  # 2 views x 5 images
    labels = torch.tensor([2, -1, 0, -1, 1])
    term = heads(encoded, labels)
    both = torch.cat([labels, labels])
    keep = both >= 0
    x, y = encoded.detach().double()[keep], both[keep]
    for classifier, value in (
        (heads.joint, term / 0.5),
        (heads.probe.classifier, heads._probe_loss),
    ):
        logits = x @ classifier.weight.detach().double().T + classifier.bias.detach().double()
        plain = (torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y]).mean()
        assert float(value.detach()) == pytest.approx(float(plain), rel=1e-6)
    term.backward()
    assert torch.count_nonzero(encoded.grad[~keep]) == 0 and encoded.grad[keep].abs().sum() > 0
    heads.step(1, 0, 4)  # the probe's gradient: from the labelled rows only, finite
    assert torch.isfinite(heads.probe.classifier.weight).all()

    none = torch.full((5,), -1)
    encoded = torch.randn(10, 6, generator=generator, requires_grad=True)
    term = heads(encoded, none)
    assert float(term.detach()) == 0.0 and float(heads._probe_loss.detach()) == 0.0
    term.backward()
    assert torch.count_nonzero(encoded.grad) == 0


def digits_options(**changes):
    values = dict(
        online_probe=True,
        probe_lr=0.1,
        epochs=1,
        ce_weight=0.5,
        dataset='digits',
        data_folder=None,
        test_folder=None,
        mean=None,
        std=None,
        size=8,
        val_split=0.0,
    )
    values.update(changes)
    return argparse.Namespace(**values)


def fixed_encoder():
    """Pixels -> 10 fixed features: a deterministic 'trained' encoder."""
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))


def test_probe_accuracy_and_loss_match_a_hand_computation(capsys):
    opt = digits_options()
    rt = runtime.Runtime(device=torch.device('cpu'), local_batch_size_val=100)
    train_set = datasets.build_dataset('digits', 'train', None)
    heads = probe.build_heads(opt, rt, SupConResNet(encoder=(fixed_encoder(), 10)), train_set)
    generator = torch.Generator().manual_seed(5)
    for classifier in heads.classifiers().values():
        torch.nn.init.normal_(classifier.weight, std=0.3, generator=generator)
        torch.nn.init.normal_(classifier.bias, std=0.3, generator=generator)
    encoder = fixed_encoder()
    results = heads.evaluate(encoder, epoch=1)
    assert set(results) == {'probe_acc', 'probe_loss', 'ce_acc', 'ce_loss'}

    # by hand: every test image through the same transform, one at a time, numpy arithmetic
    mean, std = datasets.resolve_mean_std('digits', None, None)
    test_set = datasets.build_dataset('digits', 'test', augment.test_transform(8, mean, std))
    assert len(test_set) == 360
    with torch.no_grad():
        x = np.stack([encoder(test_set[i][0][None])[0].numpy() for i in range(len(test_set))])
    y = np.array(test_set.targets)
    for name, classifier in heads.classifiers().items():
        logits = x.astype(np.float64) @ classifier.weight.detach().double().numpy().T
        logits += classifier.bias.detach().double().numpy()
        acc = 100.0 * np.mean(logits.argmax(1) == y)
        shifted = logits - logits.max(1, keepdims=True)
        loss = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(len(y)), y])
        assert results[f'{name}_acc'] == pytest.approx(acc, abs=1e-9)
        assert results[f'{name}_loss'] == pytest.approx(loss, rel=1e-4)
    out = capsys.readouterr().out
    assert f'probe accuracy: {results["probe_acc"]:.2f}\n' in out
    assert f'ce accuracy: {results["ce_acc"]:.2f}\n' in out
    assert 0 < results['probe_acc'] < 100  # the comparison is not trivially all or nothing


def test_with_val_split_the_probe_scores_the_held_out_images():
    opt = digits_options(val_split=0.2)
    rt = runtime.Runtime(device=torch.device('cpu'), local_batch_size_val=500)
    train_set = datasets.build_dataset('digits', 'train', None, val_split=0.2)
    heads = probe.build_heads(opt, rt, SupConResNet(encoder=(fixed_encoder(), 10)), train_set)
    _, labels = heads.evaluation.features(fixed_encoder(), 1)
    held_out = datasets.build_dataset('digits', 'test', None, val_split=0.2)
    assert heads.evaluation.name == 'held-out'
    assert labels.tolist() == list(held_out.targets) and len(labels) == 288


# --------------------------------------------------------------------------- 2 processes


def _two_rank_worker(rank, world, partial=False):
    rt = runtime.Runtime(
        device=torch.device('cpu'), rank=rank, world_size=world, local_batch_size_val=64
    )
    return run_heads(rt, rank, world, partial)


def run_heads(rt, rank, world, partial=False):
    """Three steps of both heads on this rank's share of fixed batches, then the evaluation of
    a fixed encoder on the digits test split. ``partial``: some training images are unlabelled
    (-1), unevenly over the ranks: half at random at step 0, all of rank 1's share at step 1,
    every image at step 2."""
    train_set = datasets.build_dataset('digits', 'train', None)
    if partial:
        train_set = argparse.Namespace(classes=train_set.classes, targets=[-1, *train_set.targets])
    heads = probe.build_heads(
        digits_options(epochs=2), rt, SupConResNet(encoder=(fixed_encoder(), 10)), train_set
    )
    assert heads.partial == partial
    generator = torch.Generator().manual_seed(6)
    joint_grads = []
    bsz = 8
    share = slice(rank * bsz // world, (rank + 1) * bsz // world)
    for step in range(3):
        encoded = torch.randn(2, bsz, 10, generator=generator)  # [view, image, dim]
        labels = torch.randint(0, 10, (bsz,), generator=generator)
        if partial:
            unlabelled = [torch.rand(bsz, generator=generator) < 0.5, torch.arange(bsz) >= 4]
            labels[unlabelled[step] if step < 2 else slice(None)] = -1
        local = encoded[:, share].reshape(-1, 10)  # view-major, as main_supcon stacks them
        heads.joint.zero_grad(set_to_none=True)
        heads(local, labels[share]).backward()
        heads.step(1, step, 4)
        joint_grads.append([p.grad.clone() for p in heads.joint.parameters()])
    features, labels = heads.evaluation.features(fixed_encoder(), 1)
    return {
        'probe': heads.probe.state_dict(),
        'joint_grads': joint_grads,
        'features': features,
        'labels': labels,
        'eval': heads.evaluate(fixed_encoder(), 1),
    }


@pytest.mark.parametrize('partial', [False, True], ids=['labelled', 'partly_labelled'])
def test_two_processes_step_and_evaluate_as_one(gloo_ranks, partial):
    two = gloo_ranks(_two_rank_worker, partial, world=WORLD_SIZE)[0]
    rt = runtime.Runtime(device=torch.device('cpu'), local_batch_size_val=64)
    one = run_heads(rt, 0, 1, partial)
    for name in ('weight', 'bias'):
        assert torch.allclose(
            two['probe']['classifier'][name], one['probe']['classifier'][name], atol=1e-6
        )
        assert not torch.equal(one['probe']['classifier'][name], torch.zeros(1))
    momentum_two = two['probe']['optimizer']['state'][0]['momentum_buffer']
    momentum_one = one['probe']['optimizer']['state'][0]['momentum_buffer']
    assert torch.allclose(momentum_two, momentum_one, atol=1e-6)
    for grads_two, grads_one in zip(two['joint_grads'], one['joint_grads']):
        for a, b in zip(grads_two, grads_one):
            assert torch.allclose(a, b, atol=1e-6)
    # every test image counted once, in data-set order, whatever rank extracted it
    assert len(two['labels']) == 360 and torch.equal(two['labels'], one['labels'])
    assert torch.allclose(two['features'], one['features'], atol=1e-6)
    assert two['eval'] == pytest.approx(one['eval'], abs=1e-6)


# --------------------------------------------------------------------------- the script


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Two classes, 8 training and 4 test images each, 8x8 RGB."""
    root = tmp_path_factory.mktemp('images')
    write_image_folder(root / 'train', {'a': 8, 'b': 8}, size=8, seed=0)
    write_image_folder(root / 'test', {'a': 4, 'b': 4}, size=8, seed=1)
    return root


def script_args(images, **changes):
    return folder_args(images, **{'epochs': EPOCHS, 'model': 'resnet18', **changes})


VARIANTS = {  # the probe on SimCLR (labels only for the probe), the joint term on SupCon
    'probe': {'online_probe': True, 'probe_lr': 0.3, 'method': 'SimCLR'},
    'ce': {'ce_weight': 0.5},
}


def load(path):
    return checkpoint.load_checkpoint(str(path), flag='--resume')


def assert_same_state(a, b, keys):
    """Every tensor under ``keys`` of two checkpoints equal (max abs difference 1e-6)."""
    for key in keys:
        named_a = dict(checkpoint.named_tensors(a[key], key))
        named_b = dict(checkpoint.named_tensors(b[key], key))
        assert named_a.keys() == named_b.keys() and named_a, key
        for name, tensor in named_a.items():
            other = named_b[name]
            if tensor.is_floating_point():
                assert (tensor.double() - other.double()).abs().max() <= 1e-6, name
            else:
                assert torch.equal(tensor, other), name


@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_kill_and_resume_auto_equals_the_uninterrupted_run(images, tmp_path, variant):
    args = script_args(images, **VARIANTS[variant])
    reference_cwd, cwd = tmp_path / 'A', tmp_path / 'B'
    reference_cwd.mkdir()
    cwd.mkdir()
    result = call('main_supcon', args, reference_cwd)
    assert result.code == 0, result.err
    assert result.out.count(f'{"probe" if variant == "probe" else "ce"} accuracy: ') == EPOCHS
    reference = load(save_folder('main_supcon', args, reference_cwd) / 'last.pth')

    # SIGKILL once epoch 1 is saved, then --resume auto
    ckpt_path = save_folder('main_supcon', args, cwd) / 'checkpoint.pth'
    proc = spawn('main_supcon', args, cwd)
    output = []
    for line in proc.stdout:
        output.append(line)
        if 'epoch 1, total time' in line:
            break
    deadline = time.time() + 120
    while not ckpt_path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, ''.join(output)
    result = call('main_supcon', args + ['--resume', 'auto'], cwd)
    assert result.code == 0, result.err
    assert 'continuing at epoch ' in result.out
    resumed = load(save_folder('main_supcon', args, cwd) / 'last.pth')

    extra = ['probe'] if variant == 'probe' else ['ce_classifier']
    assert_same_state(reference, resumed, ['model', 'optimizer'] + extra)
    assert ('probe' in reference) == (variant == 'probe')
    assert ('ce_classifier' in reference) == (variant == 'ce')
    tag = 'probe_acc' if variant == 'probe' else 'ce_acc'
    for run_cwd in (reference_cwd, cwd):
        steps = [s for s, _ in read_scalars(tb_folder('main_supcon', args, run_cwd))[tag]]
        assert steps == list(range(1, EPOCHS + 1))
    # (step, value) pairs: the steps equal, the values to float32 rounding (pytest.approx
    # compares flat sequences only from pytest 9.2 on, so numpy compares the values)
    resumed_scalars, reference_scalars = (
        read_scalars(tb_folder('main_supcon', args, run_cwd))[tag]
        for run_cwd in (cwd, reference_cwd)
    )
    assert [s for s, _ in resumed_scalars] == [s for s, _ in reference_scalars]
    np.testing.assert_allclose(
        [v for _, v in resumed_scalars], [v for _, v in reference_scalars], rtol=1e-6
    )
    if variant == 'ce':
        check_ce_checkpoint_is_usable(
            save_folder('main_supcon', args, reference_cwd), images, tmp_path
        )


def check_ce_checkpoint_is_usable(folder, images, tmp_path):
    """The extra classifier lives beside the model: it stays a SupCon checkpoint to every
    reader of networks/from_checkpoint.py."""
    path = folder / 'last.pth'
    ckpt = load(path)
    assert checkpoint_method(ckpt) == 'SupCon'
    assert not any(key.startswith(('fc.', 'ce_classifier')) for key in ckpt['model'])
    assert set(ckpt['ce_classifier']) == {'weight', 'bias'}
    assert folder.name.endswith('_ce0.5')
    linear = script_args(images, ckpt=path, epochs=1, model=None, learning_rate=0.1)
    result = call('main_linear', linear, tmp_path)
    assert result.code == 0, result.err
    assert 'final accuracy: ' in result.out
    out = tmp_path / 'tsne.png'
    tsne = [
        '--ckpt', path, '--dataset', 'path', '--data_folder', images / 'train',
        '--test_folder', images / 'test', '--mean', '(0.5,0.5,0.5)', '--std', '(0.25,0.25,0.25)',
        '--size', 8, '--num_workers', 0, '--device', 'cpu', '--out', out, '--perplexity', 3,
    ]  # fmt: skip
    result = call('main_tsne', tsne, tmp_path)
    assert result.code == 0, result.err
    assert out.is_file()


@pytest.mark.slow
def test_the_probe_trains_the_same_encoder_as_a_run_without_it(images, tmp_path):
    """Whole runs with and without --online_probe: bit-identical encoder, head and optimizer."""
    results = {}
    for name, extra in (('plain', {}), ('probe', {'online_probe': True})):
        cwd = tmp_path / name
        cwd.mkdir()
        args = script_args(images, epochs=1, **extra)
        result = call('main_supcon', args, cwd)
        assert result.code == 0, result.err
        results[name] = load(save_folder('main_supcon', args, cwd) / 'last.pth')
    # --online_probe does not go into the run name: both runs wrote the same folder name
    for key in ('model', 'optimizer'):
        a = dict(checkpoint.named_tensors(results['plain'][key]))
        b = dict(checkpoint.named_tensors(results['probe'][key]))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), key
    assert 'probe' in results['probe'] and 'probe' not in results['plain']


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    'changes, fragments',
    [
        ({'ce_weight': -1}, ['--ce_weight must be a finite number >= 0']),
        ({'probe_lr': 0.1}, ['--probe_lr only acts with --online_probe']),
        ({'probe_every': 2}, ['--probe_every only acts with --online_probe or --ce_weight']),
        ({'online_probe': True, 'probe_lr': 0}, ['--probe_lr must be a finite number > 0']),
        ({'online_probe': True, 'probe_every': 0}, ['--probe_every must be a positive']),
        ({'online_probe': True, 'test_folder': None}, ['--online_probe', '--test_folder']),
    ],
)
def test_bad_values_are_refused_in_one_line(images, tmp_path, changes, fragments):
    result = call('main_supcon', script_args(images, **changes), tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / 'save').exists()


def test_run_names_and_resuming_with_another_probe_lr(images, tmp_path):
    plain = main_supcon_option(images)
    assert not plain.online_probe and plain.ce_weight == 0 and plain.probe_every is None
    ce = main_supcon_option(images, ce_weight=0.5)
    assert ce.model_name == plain.model_name + '_ce0.5' and ce.probe_every == 1
    probed = main_supcon_option(images, online_probe=True)
    assert probed.model_name == plain.model_name and probed.probe_lr == probe.PROBE_LR

    args = script_args(images, epochs=1, online_probe=True, probe_lr=0.3)
    result = call('main_supcon', args, tmp_path)
    assert result.code == 0, result.err
    again = script_args(images, epochs=2, online_probe=True, probe_lr=0.03)
    result = call('main_supcon', again + ['--resume', 'auto'], tmp_path)
    assert_one_line_error(result, '--probe_lr 0.03 differs', 'resume with --probe_lr 0.3')
    without = script_args(images, epochs=2)
    result = call('main_supcon', without + ['--resume', 'auto'], tmp_path)
    assert_one_line_error(result, 'trained with --online_probe', 'resume with it')


def main_supcon_option(images, **changes):
    import main_supcon

    return main_supcon.parse_option([str(a) for a in script_args(images, **changes)])


def test_rows_carry_their_own_view_labels():
    """heads() repeats the batch's labels for the second view (rows are view-major)."""
    rt = runtime.Runtime(device=torch.device('cpu'))
    heads = probe.ClassifierHeads(heads_options(online_probe=False, ce_weight=1.0), rt, 2, 2)
    with torch.no_grad():
        heads.joint.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    encoded = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 5.0]])
    right = heads(encoded, torch.tensor([0, 1]))
    wrong = heads(encoded, torch.tensor([1, 0]))
    assert float(right.detach()) == pytest.approx(math.log(1 + math.exp(-5)), rel=1e-5)
    assert float(wrong.detach()) == pytest.approx(5 + math.log(1 + math.exp(-5)), rel=1e-5)
