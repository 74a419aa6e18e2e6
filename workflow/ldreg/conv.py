"""3D convolution through oneDNN for the single-volume batches registration trains on.

Torch picks a CPU convolution backend per call: a float32 batch of one whose N*C*D*H is at most
20480 (a heuristic tuned on 2D images) goes to its unblocked im2col + GEMM path, forward and
backward. Every deep layer of the networks here is such a call (64 channels at 12x16x12 is
12288), and there that path is 2-5x slower than oneDNN on the same CPU (docs/experiments.md).
:func:`conv3d` sends those calls to oneDNN with an autograd rule of its own, built from
oneDNN's forward kernels only: the input's gradient is a transposed convolution, the
weight's a dilated convolution of the input with the output's gradient (the input channels as
the batch). Every other call (a batch of several, big layers torch already gives oneDNN,
bfloat16, channels-last, a build without oneDNN) goes through torch unchanged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_aten = torch.ops.aten
# torch's own rule (ConvParams::use_mkldnn): below this N*C*D*H a float32 batch of one is not
# given to oneDNN
_TORCH_ONEDNN_FROM = 20480


def _transposed_available() -> bool:
    try:
        torch.ops.mkldnn._convolution_transpose_pointwise  # noqa: B018 (registered with oneDNN)
    except (AttributeError, RuntimeError):
        return False
    return True


ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and _transposed_available()


def routed_to_onednn(x: torch.Tensor, weight: torch.Tensor, dilation=(1, 1, 1), groups: int = 1) -> bool:
    """Whether :func:`conv3d` computes this call with oneDNN (where torch would not)."""
    return (ONEDNN_AVAILABLE and torch.backends.mkldnn.enabled and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() == 5
            and x.shape[0] == 1 and x.shape[1] * x.shape[2] * x.shape[3] <= _TORCH_ONEDNN_FROM
            and x.is_contiguous() and groups == 1 and tuple(dilation) == (1, 1, 1))


class _OneDnnConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return _aten.mkldnn_convolution(x, weight, bias, padding, stride, [1, 1, 1], 1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        if torch.is_grad_enabled():  # a gradient of this gradient follows (a critic's gradient penalty)
            grads = _aten.convolution_backward(grad, x, weight, [weight.shape[0]] if ctx.has_bias else None,
                                               ctx.stride, ctx.padding, [1, 1, 1], False, [0, 0, 0], 1,
                                               [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias])
            return *grads, None, None
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(grad, x.shape, weight, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad, x, weight.shape, ctx.stride, ctx.padding)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3, 4))
        return grad_x, grad_w, grad_b, None, None


def _input_grad(grad, x_shape, weight, stride, padding):
    """The transposed convolution of the output's gradient, sized back to the input (a strided
    convolution drops up to stride - 1 trailing planes: output_padding restores them)."""
    output_padding = [x_shape[2 + d] - ((grad.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + weight.shape[2 + d])
                      for d in range(3)]
    return torch.ops.mkldnn._convolution_transpose_pointwise(grad, weight, None, padding, output_padding, stride,
                                                             [1, 1, 1], 1, "none", [], "")


def _weight_grad(grad, x, weight_shape, stride, padding):
    """grad_w[o, i, k] = sum over n, p of grad[n, o, p] * x[n, i, stride * p + k - padding]: the
    input (its channels as the batch) convolved with the output's gradient dilated by the
    stride; the kernel's extent is cropped from what that gives."""
    out = _aten.mkldnn_convolution(x.transpose(0, 1).contiguous(), grad.transpose(0, 1).contiguous(), None,
                                   padding, [1, 1, 1], stride, 1)
    k = weight_shape[2:]
    return out[:, :, :k[0], :k[1], :k[2]].transpose(0, 1)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
           dilation=(1, 1, 1), groups: int = 1) -> torch.Tensor:
    """``F.conv3d`` (zero padding given as integers), through oneDNN where
    :func:`routed_to_onednn` says so."""
    exporting = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
    if exporting or not routed_to_onednn(x, weight, dilation, groups):  # an exported model keeps torch's op
        return F.conv3d(x, weight, bias, stride, padding, dilation, groups)
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return _aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), [1, 1, 1], 1)
    return _OneDnnConv3d.apply(x, weight, bias, list(stride), list(padding))


class Conv3d(torch.nn.Conv3d):
    """``nn.Conv3d`` (same parameters, same state_dict) computed by :func:`conv3d`."""

    def _conv_forward(self, input, weight, bias):
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
