"""A faster convolution weight gradient for small feature maps under CPU bfloat16 autocast.

``use_matmul_weight_grad(model)`` is applied at set-up time (``runtime.prepare_model``, for
``--device cpu --amp`` with bfloat16, unless ``--cpu_bf16_wgrad onednn``), the way SyncBatchNorm is
swapped in: it turns every ``nn.Conv2d`` of the model into ``MatmulWeightGradConv2d``, a subclass
with the same parameters, so the model definition and the checkpoints stay ``nn.Conv2d``'s.


Under ``torch.autocast('cpu', dtype=torch.bfloat16)`` oneDNN computes a convolution's weight
gradient well for large maps but slowly for small ones: for ResNet-18's last stage (512 channels,
4x4 maps at 32x32 input, batch 256) it reaches about a quarter of the speed of the same arithmetic
done as one matrix product, and those few layers take a third of the whole bf16 training step. On
exactly those layers this module computes the weight gradient as that matrix product instead:

    grad_w[o, (kh, kw, c)] = sum over (image, output pixel) of grad_out[., o] * patch[.,
    (kh, kw, c)]

with the patches cut from a zero-padded channels-last view of the input. Everything else (the
forward pass, the input gradient, every other layer, fp32, CUDA, ``torch.compile``) is the stock
``nn.Conv2d`` path.

The choice of layers comes from measurements on an AMX CPU (``benchmarks/README.md``): the matrix
product wins by 3-4x when the output map has at most 16 pixels, and by 1.2-1.8x on 8x8 maps (up to
64 pixels) with 256 or more input channels; elsewhere oneDNN is faster. The gradient agrees with
oneDNN's to bfloat16 precision (both accumulate in float32 and round once to bfloat16).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# at most this many bytes for the patch matrix of one layer; larger layers keep oneDNN's path
MAX_PATCH_BYTES = 512 * 2**20


def _autocast_cpu_bf16():
    if hasattr(torch, 'get_autocast_dtype'):  # torch >= 2.4
        return (
            torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu') == torch.bfloat16
        )
    return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16


def _compiling():
    compiler = getattr(torch, 'compiler', None)
    return bool(
        compiler is not None and hasattr(compiler, 'is_compiling') and compiler.is_compiling()
    )


def wants_matmul_weight_grad(out_pixels, in_channels):
    """The measured rule: small output maps, or mid-sized ones with many input channels."""
    return out_pixels <= 16 or (out_pixels <= 64 and in_channels >= 256)


def output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def weight_grad_by_matmul(x, grad_out, kernel_size, stride, padding):
    """d(loss)/d(weight) of a dense 2-d convolution (no dilation, groups 1) as one matrix product.

    x: (B, C, H, W), grad_out: (B, O, Ho, Wo), both bfloat16 (or any one floating dtype).
    Returns (O, C, kh, kw) in grad_out's dtype, laid out channels-last.
    """
    kh, kw = kernel_size
    sh, sw = stride
    ph, pw = padding
    batch, channels = x.shape[:2]
    out_channels, out_h, out_w = grad_out.shape[1:]
    # (B, H + 2ph, W + 2pw, C) -> windows (B, Ho, Wo, C, kh, kw) -> rows of (kh, kw, C) patches
    padded = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)
    windows = padded.unfold(1, kh, sh).unfold(2, kw, sw)[:, :out_h, :out_w]
    patches = windows.permute(0, 1, 2, 4, 5, 3).reshape(batch * out_h * out_w, kh * kw * channels)
    grads = grad_out.permute(0, 2, 3, 1).reshape(batch * out_h * out_w, out_channels)
    return (grads.t() @ patches).view(out_channels, kh, kw, channels).permute(0, 3, 1, 2)


class _Bf16ConvMatmulWeightGrad(torch.autograd.Function):
    """conv2d in bfloat16; backward: oneDNN for the input, one matrix product for the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        low = torch.bfloat16
        x_low, weight_low = x.to(low), weight.to(low)
        bias_low = bias.to(low) if bias is not None else None
        with torch.autocast('cpu', enabled=False):
            out = F.conv2d(x_low, weight_low, bias_low, stride, padding)
        ctx.save_for_backward(x_low, weight_low)
        ctx.stride, ctx.padding = stride, padding
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_low, weight_low = ctx.saved_tensors
        x_dtype, weight_dtype, bias_dtype = ctx.dtypes
        grad_out = grad_out.to(torch.bfloat16)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out,
                x_low,
                weight_low,
                None,
                list(ctx.stride),
                list(ctx.padding),
                [1, 1],
                False,
                [0, 0],
                1,
                [True, False, False],
            )[0].to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_by_matmul(
                x_low, grad_out, weight_low.shape[2:], ctx.stride, ctx.padding
            ).to(weight_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.float().sum(dim=(0, 2, 3)).to(bias_dtype)
        return grad_x, grad_w, grad_b, None, None


class MatmulWeightGradConv2d(nn.Conv2d):
    """``nn.Conv2d``; on the CPU under bfloat16 autocast, small maps get the matmul weight gradient.

    Made only by ``use_matmul_weight_grad``; it adds no parameters or buffers.
    """

    def _use_matmul_weight_grad(self, x):
        if not (
            x.device.type == 'cpu'
            and x.dim() == 4
            and torch.is_grad_enabled()
            and self.weight.requires_grad
            and _autocast_cpu_bf16()
        ):
            return False
        if (
            self.groups != 1
            or tuple(self.dilation) != (1, 1)
            or self.padding_mode != 'zeros'
            or isinstance(self.padding, str)
            or _compiling()
        ):
            return False
        out_h = output_size(x.shape[2], self.kernel_size[0], self.stride[0], self.padding[0])
        out_w = output_size(x.shape[3], self.kernel_size[1], self.stride[1], self.padding[1])
        patch_bytes = (
            2
            * x.shape[0]
            * out_h
            * out_w
            * self.in_channels
            * self.kernel_size[0]
            * self.kernel_size[1]
        )
        return (
            out_h > 0
            and out_w > 0
            and patch_bytes <= MAX_PATCH_BYTES
            and wants_matmul_weight_grad(out_h * out_w, self.in_channels)
        )

    def forward(self, x):
        if self._use_matmul_weight_grad(x):
            return _Bf16ConvMatmulWeightGrad.apply(
                x, self.weight, self.bias, tuple(self.stride), tuple(self.padding)
            )
        return super().forward(x)


def use_matmul_weight_grad(model):
    """Turn every plain ``nn.Conv2d`` in ``model`` into ``MatmulWeightGradConv2d``, in place.

    Only the class changes: the modules keep their parameters, buffers and hooks, so an
    optimizer built before or after, and every state dict, are unaffected. Returns ``model``.
    """
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = MatmulWeightGradConv2d
    return model
