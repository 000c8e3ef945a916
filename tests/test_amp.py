"""Mixed precision, channels_last and torch.compile: util's precision helpers and the scripts under
--amp.

The scripts run for one epoch on a 16-image folder at 8x8 with resnet18 on one CPU thread (2 steps
of 8), in the test process (``inprocess.call``). Compiling resnet18 on CPU took about 1.5 minutes
here (cold inductor cache), so the test that does it is marked slow and runs only with RUN_SLOW=1;
by default a small conv net goes through the same prepare_model path (about 30 s cold, a few
seconds once inductor's cache is warm).
"""

import argparse
import copy
import glob
import math
import os
import re

import pytest
import torch
import torch.nn as nn
from helpers import write_image_folder
from inprocess import call

import util
from losses import SupConLoss
from networks.resnet_big import SupConResNet
from supcon.system import checkpoint, runtime

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
DEVICES = ['cpu', pytest.param('cuda', marks=CUDA)]
LOSS_VALUE = re.compile(r'loss (\S+) \(')


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def runtime_options(argv, device='cpu'):
    """The runtime flags as the scripts parse them, resolved as setup_runtime resolves them."""
    parser = argparse.ArgumentParser()
    runtime.add_runtime_arguments(parser)
    opt = parser.parse_args(argv)
    device = torch.device(device)
    amp_dtype, channels_last = runtime.resolve_precision(opt, device)
    return runtime.Runtime(
        device=device, amp_dtype=amp_dtype, channels_last=channels_last, compile=opt.compile
    )


# ---------------------------------------------------------------- resolve_precision, make_scaler


def test_cpu_amp_is_bfloat16_with_channels_last_on():
    opt = runtime_options(['--amp'])
    assert (opt.amp_dtype, opt.channels_last) == (torch.bfloat16, True)
    assert opt.recorded()['amp_dtype'] == 'bfloat16'  # what checkpoints record
    assert runtime_options(['--amp', '--amp_dtype', 'bfloat16']).amp_dtype == torch.bfloat16


def test_channels_last_is_off_without_amp_and_explicit_choices_win():
    opt = runtime_options([])
    assert opt.amp_dtype is None and opt.channels_last is False
    assert runtime_options(['--amp', '--no-channels_last']).channels_last is False
    assert runtime_options(['--channels_last']).channels_last is True


def test_cpu_float16_is_a_user_error():
    with pytest.raises(util.UserError, match='--amp_dtype float16 is for CUDA'):
        runtime_options(['--amp', '--amp_dtype', 'float16'])
    # without --amp the dtype is never used, so it is not an error
    assert runtime_options(['--amp_dtype', 'float16']).amp_dtype is None


@pytest.mark.parametrize('argv', [[], ['--amp']])
def test_scaler_is_disabled_on_cpu(argv):
    assert not runtime.make_scaler(runtime_options(argv)).is_enabled()


@CUDA
def test_cuda_float16_gets_an_enabled_scaler_and_bfloat16_none():
    opt = runtime_options(['--amp', '--amp_dtype', 'float16'], 'cuda')
    assert opt.amp_dtype == torch.float16 and runtime.make_scaler(opt).is_enabled()
    opt = runtime_options(['--amp', '--amp_dtype', 'bfloat16'], 'cuda')
    assert not runtime.make_scaler(opt).is_enabled()
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert runtime_options(['--amp'], 'cuda').amp_dtype == expected


# --------------------------------------------------------------------------- autocast dtypes


@pytest.mark.parametrize('device', DEVICES)
def test_autocast_model_output_is_half_and_loss_float32(device):
    opt = runtime_options(['--amp', '--amp_dtype', 'bfloat16'], device)
    torch.manual_seed(0)
    model = runtime.prepare_model(SupConResNet('resnet18'), opt)
    images = runtime.to_device(torch.randn(8, 3, 8, 8), opt)
    labels = torch.tensor([0, 1, 0, 1], device=opt.device)
    with runtime.autocast(opt):
        trunk = model.encoder(images)
        features = model(images)
        loss = SupConLoss(temperature=0.1)(torch.stack(features.split(4), dim=1), labels)
    # the conv trunk runs in bf16; CUDA's autocast then normalises in float32, the CPU's in bf16
    assert trunk.dtype == torch.bfloat16
    assert features.dtype == (torch.float32 if device == 'cuda' else torch.bfloat16)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(
        p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
        for p in model.parameters()
        if p.grad is not None
    )


def test_autocast_is_a_no_op_without_amp():
    opt = runtime_options([])
    with runtime.autocast(opt):
        assert not torch.is_autocast_enabled('cpu')
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


# --------------------------------------------------------------------------- channels_last


@pytest.fixture
def ieee_fp32():
    """Plain float32 on CUDA: with TF32 the two memory formats may pick kernels that round
    differently. Set and restored by hand, not with monkeypatch: pytest 9.2's monkeypatch
    fails to undo a setattr on ``torch.backends.cuda.matmul`` (a property of torch's
    cuBLASModule: AttributeError at teardown), where 9.0 did not."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def contiguous_and_channels_last_models(device='cpu', seed=0):
    torch.manual_seed(seed)
    model = SupConResNet('resnet18')
    models = {}
    for channels_last in (False, True):
        opt = runtime_options(
            ['--channels_last' if channels_last else '--no-channels_last'], device
        )
        models[channels_last] = (runtime.prepare_model(copy.deepcopy(model), opt), opt)
    return models


def test_channels_last_model_and_input_really_are_nhwc():
    models = contiguous_and_channels_last_models()
    model, opt = models[True]
    conv = model.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = runtime.to_device(torch.randn(2, 3, 8, 8), opt)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    assert runtime.to_device(torch.randn(2, 3, 8, 8), models[False][1]).is_contiguous()


@pytest.mark.parametrize('device', DEVICES)
def test_channels_last_eval_outputs_match_contiguous(device, ieee_fp32):
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    outputs = {}
    for channels_last, (model, opt) in contiguous_and_channels_last_models(device).items():
        model.eval()
        with torch.no_grad():
            outputs[channels_last] = (
                model(runtime.to_device(images, opt)).float().cpu(),
                model.encoder(runtime.to_device(images, opt)).float().cpu(),
            )
    for a, b in zip(outputs[True], outputs[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize('device', DEVICES)
def test_channels_last_training_step_matches_contiguous(device, ieee_fp32):
    """One main_supcon step (two views, SupCon loss, backward, SGD) in both memory formats."""
    generator = torch.Generator().manual_seed(2)
    views = torch.randn(2, 4, 3, 8, 8, generator=generator)
    labels = torch.tensor([0, 1, 1, 0])
    results = {}
    for channels_last, (model, opt) in contiguous_and_channels_last_models(device).items():
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        images = runtime.to_device(torch.cat([views[0], views[1]]), opt)
        f1, f2 = model(images).split(4)
        loss = SupConLoss(temperature=0.1)(torch.stack([f1, f2], dim=1), labels.to(opt.device))
        optimizer.zero_grad()
        loss.backward()
        grads = {name: p.grad.cpu().clone() for name, p in model.named_parameters()}
        optimizer.step()
        results[channels_last] = (
            loss.item(),
            grads,
            {k: v.cpu() for k, v in model.state_dict().items()},
        )
    (loss_cl, grads_cl, state_cl), (loss, grads, state) = results[True], results[False]
    assert loss_cl == pytest.approx(loss, rel=1e-3)
    for name in grads:
        scale = grads[name].abs().max().item()
        torch.testing.assert_close(
            grads_cl[name],
            grads[name],
            rtol=1e-3,
            atol=1e-3 * scale + 1e-7,
            msg=lambda m: f'{name}: {m}',
        )
    for name in state:  # weights and BatchNorm running statistics after the step
        torch.testing.assert_close(
            state_cl[name].float(), state[name].float(), rtol=1e-3, atol=1e-5
        )


# ------------------------------------------------------------ torch.compile through prepare_model


def compiled_step(model, opt, images):
    model = runtime.prepare_model(model, opt)
    assert hasattr(model, '_orig_mod') and runtime.unwrap(model) is model._orig_mod
    with runtime.autocast(opt):
        out = model(runtime.to_device(images, opt))
    out.float().square().mean().backward()
    return model, out


def in_a_fresh_interpreter(check):
    """Run ``check`` (a module-level function) in a spawned interpreter, its assertion errors
    raised here. A compiled backward starts autograd's device threads, after which no child
    forked from this process can run a backward pass ("Unable to handle autograd's threading in
    combination with fork-based multiprocessing"), and the suite forks: conftest's
    ``gloo_ranks``, ``inprocess.Forked``."""
    import multiprocessing

    with multiprocessing.get_context('spawn').Pool(1) as pool:
        pool.apply(check)


@pytest.mark.slow
def test_compile_through_prepare_model_small_net():
    in_a_fresh_interpreter(compile_small_net)


def compile_small_net():
    """prepare_model's torch.compile, traced by Dynamo and AOTAutograd and run by the
    ``aot_eager`` backend: Inductor's C++ code generation would take 15 s of a fresh machine's
    CPU here (test_compile_through_prepare_model_resnet18 compiles with Inductor)."""
    torch.set_num_threads(1)
    compile_model, compiled = torch.compile, []

    def compile_without_codegen(model, **options):
        compiled.append(model)
        return compile_model(model, backend='aot_eager', **options)

    torch.compile = compile_without_codegen  # this spawned interpreter's own torch
    opt = runtime_options(['--amp', '--compile'])
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )
    reference = copy.deepcopy(net)
    model, out = compiled_step(net, opt, torch.randn(4, 3, 8, 8))
    assert compiled == [net]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # checkpoints of a compiled model carry the bare keys
    assert checkpoint.bare_state_dict(model).keys() == reference.state_dict().keys()


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get('RUN_SLOW') != '1',
    reason='compiling resnet18 on CPU takes ~1.5 min; set RUN_SLOW=1',
)
def test_compile_through_prepare_model_resnet18():
    in_a_fresh_interpreter(compile_resnet18)


def compile_resnet18():
    torch.set_num_threads(1)
    opt = runtime_options(['--compile'])
    torch.manual_seed(0)
    net = SupConResNet('resnet18')
    eager = copy.deepcopy(net)
    images = torch.randn(4, 3, 8, 8)
    model, out = compiled_step(net, opt, images)
    out_eager = eager(images)
    out_eager.square().mean().backward()
    torch.testing.assert_close(out, out_eager, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(runtime.unwrap(model).named_parameters(), eager.parameters()):
        torch.testing.assert_close(
            p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f'{name}: {m}'
        )


# --------------------------------------------------------------------------- the three scripts
# under --amp


@pytest.fixture(scope='module')
def amp_runs(tmp_path_factory):
    """One epoch of each script with --amp (bfloat16 on CPU), main_linear on main_supcon's
    checkpoint."""
    root = tmp_path_factory.mktemp('amp')
    write_image_folder(root / 'train', {'a': 8, 'b': 8}, size=8, seed=0)
    write_image_folder(root / 'test', {'a': 4, 'b': 4}, size=8, seed=1)
    common = [
        '--dataset',
        'path',
        '--data_folder',
        root / 'train',
        '--test_folder',
        root / 'test',
        '--mean',
        '(0.5, 0.5, 0.5)',
        '--std',
        '(0.25, 0.25, 0.25)',
        '--size',
        '8',
        '--batch_size',
        '8',
        '--epochs',
        '1',
        '--learning_rate',
        '0.01',
        '--print_freq',
        '1',
        '--num_workers',
        '0',
        '--device',
        'cpu',
        '--seed',
        '0',
        '--amp',
    ]
    runs = {}
    for script in ('main_supcon', 'main_ce', 'main_linear'):
        cwd = root / script
        cwd.mkdir()
        extra = (
            ['--ckpt', last_checkpoint(runs['main_supcon'][1])]
            if script == 'main_linear'
            else ['--model', 'resnet18']
        )
        runs[script] = call(script, common + extra, cwd), cwd
    return runs


def last_checkpoint(cwd):
    paths = glob.glob(str(cwd / 'save' / '**' / 'last.pth'), recursive=True)
    assert len(paths) == 1, paths
    return paths[0]


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_supcon', 'main_ce', 'main_linear'])
def test_script_runs_an_epoch_under_amp(amp_runs, script):
    result, cwd = amp_runs[script]
    assert result.code == 0, result.out + result.err
    losses = [float(value) for value in LOSS_VALUE.findall(result.out)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), result.out
    ckpt = checkpoint.load_checkpoint(last_checkpoint(cwd), flag='--ckpt')
    assert ckpt['opt']['amp'] is True and ckpt['opt']['amp_dtype'] == 'bfloat16'
    assert ckpt['opt']['channels_last'] is True
    assert ckpt['epoch'] == 1
    weights = ckpt['model']
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    # saved in float32 (autocast never touches the weights)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    if (
        script == 'main_supcon'
    ):  # a run without --amp (contiguous, float32) loads the channels_last weights
        model = SupConResNet('resnet18')
        model.load_state_dict(weights)
        assert model.encoder.conv1.weight.is_contiguous()
        torch.testing.assert_close(
            model.encoder.conv1.weight, weights['encoder.conv1.weight'], rtol=0, atol=0
        )
