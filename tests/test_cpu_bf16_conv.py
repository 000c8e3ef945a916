"""networks.cpu_bf16_conv: the matmul weight gradient for small maps under CPU bfloat16 autocast,
and the set-up swap that applies it."""

import argparse
import copy

import pytest
import torch
import torch.nn as nn

from networks.cpu_bf16_conv import (
    MatmulWeightGradConv2d,
    use_matmul_weight_grad,
    wants_matmul_weight_grad,
    weight_grad_by_matmul,
)
from networks.resnet_big import SupConResNet
from supcon.system import runtime

BF16 = dict(device_type='cpu', dtype=torch.bfloat16)


def reference_weight_grad(x, grad_out, weight, stride, padding):
    """Autograd of the stock convolution, in float64."""
    w = weight.detach().double().requires_grad_()
    out = torch.nn.functional.conv2d(x.double(), w, None, stride, padding)
    out.backward(grad_out.double())
    return w.grad


@pytest.mark.parametrize(
    'shape, kernel, stride, padding',
    [
        ((2, 3, 5, 5), (3, 3), (1, 1), (1, 1)),
        ((2, 4, 7, 6), (3, 3), (2, 2), (1, 1)),  # stride that does not divide the size
        ((3, 5, 4, 4), (1, 1), (2, 2), (0, 0)),  # the ResNet shortcut
        ((1, 3, 9, 8), (7, 7), (2, 2), (3, 3)),  # the ImageNet stem
        ((2, 2, 6, 5), (3, 2), (1, 2), (2, 0)),  # unequal kernel, stride and padding
    ],
)
def test_weight_grad_by_matmul_equals_the_convolution_gradient(shape, kernel, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    weight = torch.randn(6, shape[1], *kernel, dtype=torch.float64)
    out = torch.nn.functional.conv2d(x, weight, None, stride, padding)
    grad_out = torch.randn_like(out)
    expected = reference_weight_grad(x, grad_out, weight, stride, padding)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = weight_grad_by_matmul(
            x.contiguous(memory_format=layout), grad_out, kernel, stride, padding
        )
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_rule_follows_the_measurements():
    assert wants_matmul_weight_grad(16, 64) and wants_matmul_weight_grad(4, 512)
    assert wants_matmul_weight_grad(64, 256) and not wants_matmul_weight_grad(64, 128)
    assert not wants_matmul_weight_grad(256, 512) and not wants_matmul_weight_grad(1024, 64)


def pair(in_channels=8, out_channels=6, bias=False, **kw):
    torch.manual_seed(1)
    fast = MatmulWeightGradConv2d(in_channels, out_channels, bias=bias, **kw)
    stock = nn.Conv2d(in_channels, out_channels, bias=bias, **kw)
    stock.load_state_dict(fast.state_dict())
    return fast, stock


def run(conv, x, grad_out=None):
    x = x.detach().clone().requires_grad_(x.requires_grad)
    with torch.autocast(**BF16):
        out = conv(x)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad_out.to(out.dtype))
    grads = {name: p.grad.clone() for name, p in conv.named_parameters()}
    conv.zero_grad(set_to_none=True)
    return out, x.grad, grads, grad_out


@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('bias', [False, True])
def test_small_map_under_bf16_autocast_matches_the_stock_conv(layout, bias):
    fast, stock = pair(kernel_size=3, stride=1, padding=1, bias=bias)
    x = torch.randn(4, 8, 4, 4).to(torch.bfloat16).float().contiguous(memory_format=layout)
    x.requires_grad_()
    out, grad_x, grads, grad_out = run(fast, x)
    assert type(out.grad_fn).__name__ == '_Bf16ConvMatmulWeightGradBackward'
    out_s, grad_x_s, grads_s, _ = run(stock, x, grad_out)
    assert type(out_s.grad_fn).__name__ != '_Bf16ConvMatmulWeightGradBackward'
    # same forward and input gradient (the same oneDNN primitives), weight gradient to bf16
    # precision
    assert out.dtype == out_s.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_s, rtol=0, atol=0)
    assert grad_x.dtype == torch.float32
    torch.testing.assert_close(grad_x, grad_x_s, rtol=1e-2, atol=1e-2)
    assert grads['weight'].dtype == torch.float32
    exact = reference_weight_grad(
        x.detach().to(torch.bfloat16),
        grad_out.to(torch.bfloat16),
        fast.weight.to(torch.bfloat16),
        (1, 1),
        (1, 1),
    )
    error_fast = (grads['weight'].double() - exact).abs().max()
    error_stock = (grads_s['weight'].double() - exact).abs().max()
    assert error_fast <= 2 * error_stock + 1e-6 * exact.abs().max()
    assert error_fast <= 1e-2 * exact.abs().max()
    if bias:
        torch.testing.assert_close(grads['bias'], grads_s['bias'], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('case', ['fp32', 'large map', 'no grad', 'switched off', 'dilation'])
def test_other_cases_keep_the_stock_path(case):
    kw = dict(kernel_size=3, padding=1)
    size = 4
    if case == 'large map':
        size = 16
    if case == 'dilation':
        kw.update(dilation=2, padding=2)
    conv = nn.Conv2d(8, 6, **kw)
    if case != 'switched off':
        use_matmul_weight_grad(conv)
    x = torch.randn(2, 8, size, size)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=case != 'fp32'):
        with torch.set_grad_enabled(case != 'no grad'):
            out = conv(x)
    name = type(out.grad_fn).__name__ if out.grad_fn is not None else None
    assert name != '_Bf16ConvMatmulWeightGradBackward'
    if case != 'no grad':
        assert name == 'ConvolutionBackward0'


def test_resnet_step_gradients_agree_with_onednn():
    """A whole bf16 SupConResNet backward: every parameter's gradient within bf16 noise of
    oneDNN's."""
    torch.manual_seed(0)
    stock_model = SupConResNet('resnet18').to(memory_format=torch.channels_last)
    fast_model = use_matmul_weight_grad(copy.deepcopy(stock_model))
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)

    def grads(mode):
        model = fast_model if mode == 'matmul' else stock_model
        model.zero_grad(set_to_none=True)
        with torch.autocast(**BF16):
            features = model(x)
        (features.float() ** 2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    fast, stock = grads('matmul'), grads('onednn')
    used = [
        m
        for m in fast_model.modules()
        if isinstance(m, MatmulWeightGradConv2d) and m.in_channels >= 256
    ]
    assert used  # layer3/layer4 at 4x4 and 2x2 maps take the matmul path
    for name in stock:
        diff = (fast[name] - stock[name]).norm() / stock[name].norm().clamp_min(1e-12)
        assert diff < 2e-2, (name, diff.item())
    # the paths really differ (the test would notice if the switch did nothing)
    assert any(not torch.equal(fast[n], stock[n]) for n in stock)


def test_swap_keeps_parameters_and_state_dict():
    """The swap changes only the class: same Parameter objects, same keys and values."""
    torch.manual_seed(0)
    model = SupConResNet('resnet18')
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_matmul_weight_grad(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is MatmulWeightGradConv2d for m in convs)
    assert all(p is params[n] for n, p in model.named_parameters())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def runtime_options(**overrides):
    """The Runtime that setup_runtime resolves for a CPU --amp (bfloat16) run with these flags."""
    values = dict(
        device='cpu',
        batch_size=8,
        num_workers=0,
        amp=True,
        amp_dtype='auto',
        channels_last=False,
        compile=False,
        seed=0,
        cpu_bf16_wgrad='matmul',
    )
    values.update(overrides)
    if values['cpu_bf16_wgrad'] is None:
        del values['cpu_bf16_wgrad']
    with torch.random.fork_rng():
        return runtime.setup_runtime(argparse.Namespace(**values))


@pytest.mark.parametrize(
    'overrides, swapped',
    [
        ({}, True),
        ({'cpu_bf16_wgrad': 'onednn'}, False),
        ({'cpu_bf16_wgrad': None}, False),  # an opt without the flag: the default, oneDNN
        ({'amp': False}, False),
        ({'compile': True}, False),
    ],
)
def test_prepare_model_applies_the_swap_only_for_cpu_bf16(overrides, swapped):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    if overrides.get('compile'):
        # torch.compile itself is not under test: look at the module prepare_model compiled
        model = runtime.unwrap(runtime.prepare_model(model, runtime_options(**overrides)))
    else:
        model = runtime.prepare_model(model, runtime_options(**overrides))
    assert (type(model[0]) is MatmulWeightGradConv2d) == swapped
