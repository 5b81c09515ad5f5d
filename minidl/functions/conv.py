"""2-D convolution with groups (conv2d): im2col + one matrix product per group, or Winograd.

x is NCHW, W is (out, in/groups, kh, kw). The direct path lays the patches out as
cols (groups, in/groups*kh*kw, N*OH*OW), so each group is ONE GEMM with the batch inside, the
same code on both devices; im2col and col2im are a pair per device (a strided view on the CPU,
conv.cu's kernels on the GPU, col2im a gather there: no atomics, the same result every run).
`algorithm` ("auto", "direct", "winograd"), or MINIDL_CONV_ALGORITHM, chooses Winograd
(winograd.py) for 3x3 and 5x5 convolutions and strided ones that are 3x3 or 5x5 in blocks of
pixels; "auto" takes it on the CPU only (timings: benchmarks/NOTES.md).
"""
from __future__ import annotations

import os

import numpy as np

from minidl import kernels
from minidl.core import Function, Tensor
from minidl.cpu.threads import in_parallel
from minidl.errors import MinidlError
from minidl.functions import activation as activations, gemm, winograd
# output_size stays importable as conv.output_size (tests use it)
from minidl.functions.conv_arguments import check_arguments, output_size  # noqa: F401

CU = kernels.KernelFile.beside(__file__, "conv.cu", ("im2col", "col2im"), types=kernels.HALF_TYPES)


# --- im2col: (N, C, H, W) -> patches (C, kh, kw, N, OH, OW), contiguous

def im2col_cpu(x, kh, kw, stride, pad, oh, ow):
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c = x.shape[:2]
    sn, sc, sh, sw = x.strides
    view = np.lib.stride_tricks.as_strided(
        x, (c, kh, kw, n, oh, ow), (sc, sh, sw, sn, sh * stride, sw * stride), writeable=False)
    cols = np.empty(view.shape, dtype=x.dtype)

    def copy(images):
        cols[:, :, :, images] = view[:, :, :, images]
    in_parallel(copy, x)
    return cols


def im2col_gpu(x, kh, kw, stride, pad, oh, ow):
    n, c, h, w = x.shape
    cols = kernels.empty((c, kh, kw, n, oh, ow), x.dtype)
    kernels.launch(CU, "im2col", x.dtype, c * n * oh * ow,  # a thread per patch
                   x, cols, cols.size, n, c, h, w, kh, kw, stride, pad, oh, ow)
    return cols


# --- col2im, the adjoint of im2col: sum the (C, kh, kw, N, OH, OW) patches back into (N, C, H, W)

def col2im_cpu(cols, h, w, stride, pad):
    c, kh, kw, n, oh, ow = cols.shape
    out = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    by_image = cols.transpose(3, 0, 1, 2, 4, 5)  # a view: (N, C, kh, kw, OH, OW)

    def add(images):
        for i in range(kh):  # each kernel offset touches distinct pixels: plain strided adds
            for j in range(kw):
                out[images, :, i:i + stride * oh:stride,
                    j:j + stride * ow:stride] += by_image[images, :, i, j]
    in_parallel(add, out)
    return out[:, :, pad:pad + h, pad:pad + w] if pad else out


def col2im_gpu(cols, h, w, stride, pad):
    c, kh, kw, n, oh, ow = cols.shape
    out = kernels.empty((n, c, h, w), cols.dtype)
    kernels.launch(CU, "col2im", cols.dtype, out.size, cols, out, out.size, n, c, h, w, kh, kw,
                   stride, pad, oh, ow)
    return out


# --- the function

ALGORITHMS = ("auto", "direct", "winograd")
ALGORITHM_VARIABLE = "MINIDL_CONV_ALGORITHM"


def requested_algorithm(algorithm: str | None = None) -> str:
    """`algorithm`, else the environment's MINIDL_CONV_ALGORITHM, else "auto"; checked against
    ALGORITHMS."""
    where = "conv2d algorithm"
    if algorithm is None:
        algorithm, where = os.environ.get(ALGORITHM_VARIABLE) or "auto", ALGORITHM_VARIABLE
    if algorithm not in ALGORITHMS:
        raise MinidlError(f"{where} must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
    return algorithm


class Conv2d(Function):
    """conv2d as a Function: the direct path (saving cols, W, and y under a ReLU) or Winograd's (winograd.py).

    Winograd is taken when the algorithm is "winograd", or on the CPU when it is "auto" and
    Winograd applies and pays (winograd.applies, winograd.pays); "direct" keeps the direct path.
    Where Winograd does not apply "auto" takes the direct path and "winograd" refuses. On a GPU
    "auto" takes the direct path (benchmarks/NOTES.md, "Winograd for the 3x3 convolutions").
    """

    def __init__(self, stride, pad, groups, algorithm=None, activation=None):
        self.stride, self.pad, self.groups = stride, pad, groups
        self.algorithm = requested_algorithm(algorithm)
        self.activation = activations.check_activation(activation)
        self.uses_winograd = False  # whether forward took the Winograd path; backward follows it

    def forward_cpu(self, x, W, b=None):
        return self._forward_by_algorithm(im2col_cpu, x, W, b, auto_winograd=True)

    def forward_gpu(self, x, W, b=None):
        # "auto" keeps the GPU on the direct path: Winograd there is unmeasured (see NOTES.md)
        return self._forward_by_algorithm(im2col_gpu, x, W, b, auto_winograd=False)

    def backward_cpu(self, gy):
        return self._winograd_backward(gy) if self.uses_winograd else self._backward(col2im_cpu, gy)

    def backward_gpu(self, gy):
        return self._winograd_backward(gy) if self.uses_winograd else self._backward(col2im_gpu, gy)

    def _forward_by_algorithm(self, im2col, x, W, b, auto_winograd):
        # before the choice reads W's shape
        oh, ow = check_arguments(x, W, b, self.stride, self.pad, self.groups)
        applies = winograd.applies(W.shape, self.stride)
        if self.algorithm == "winograd" and not applies:
            raise MinidlError("conv2d: the Winograd algorithm is for 3x3 or 5x5 filters, or "
                              "strided ones that are 3x3 or 5x5 in stride x stride blocks (11x11 "
                              f"at stride 4), got W of shape {W.shape} with stride {self.stride}; "
                              "use algorithm 'auto' or 'direct'")
        self.uses_winograd = self.algorithm == "winograd" or (
            self.algorithm == "auto" and auto_winograd and applies
            and winograd.pays(W.shape, self.groups, self.stride))
        if not self.uses_winograd:
            return self._forward(im2col, x, W, b, oh, ow)
        y, saved = winograd.winograd_conv_forward(x, W, b, self.pad, self.groups,
                                                  stride=self.stride)
        if self.activation:  # a second pass: the fused one is the direct path's
            y = activations.relu_array(y)
        self.save(saved, W.shape, y)
        return y

    def _winograd_backward(self, gy):
        saved, W_shape, y = self.saved
        if self.activation:
            gy = activations.relu_grad(y, gy)
        needs = (*self.needs_grad, False)[:3]  # the bias, when there is one, is the third input
        gx, gW, gb = winograd.winograd_conv_backward(gy, W_shape, saved, needs)
        return (gx, gW) if len(self.needs_grad) == 2 else (gx, gW, gb)

    def _forward(self, im2col, x, W, b, oh, ow):
        n, c, h, w = x.shape
        out, cg, kh, kw = W.shape
        g = self.groups
        cols = im2col(x, kh, kw, self.stride, self.pad, oh, ow)
        cols = cols.reshape(g, cg * kh * kw, n * oh * ow)
        y = gemm.grouped_matmul(W.reshape(g, out // g, cg * kh * kw), cols)  # (G, out/G, N*OH*OW)
        if self.activation and b is not None:
            y = activations.bias_relu_cnl_to_nchw(y, b, n, out, oh, ow)  # one pass, a new NCHW array
        else:
            y = y.reshape(out, n, oh, ow).transpose(1, 0, 2, 3)
            # either way a new NCHW array
            # (a float32 bias of a 16-bit y: added in float32, rounded to y's dtype)
            y = (y + b.reshape(1, out, 1, 1)).astype(y.dtype, copy=False) if b is not None else y.copy()
            if self.activation:
                y = activations.relu_array(y)
        self.save(cols, W, y if self.activation else None)
        self.in_shape = x.shape
        return y

    def _backward(self, col2im, gy):
        cols, W, y = self.saved
        n, c, h, w = self.in_shape
        out, cg, kh, kw = W.shape
        g = self.groups
        oh, ow = gy.shape[2:]
        needs_bias = len(self.needs_grad) == 3 and self.needs_grad[2]
        gx = gW = gb = None
        if self.activation:  # the mask, the transposition and the bias's sum in one pass
            masked, gb = activations.relu_grad_to_cnl(y, gy, bias=needs_bias)
            gy_groups = masked.reshape(g, out // g, n * oh * ow)
        else:  # one copy, the batch inside
            gy_groups = gy.transpose(1, 0, 2, 3).reshape(g, out // g, n * oh * ow)
        if self.needs_grad[1]:
            gW = gemm.grouped_matmul(gy_groups, cols.swapaxes(-1, -2)).reshape(W.shape)
        if self.needs_grad[0]:  # skipped for the first layer, whose input is the image
            # (G, cg*kh*kw, N*L)
            gcols = gemm.grouped_matmul(W.reshape(g, out // g, -1).swapaxes(-1, -2), gy_groups)
            gx = col2im(gcols.reshape(c, kh, kw, n, oh, ow), h, w, self.stride, self.pad)
        if needs_bias and gb is None:
            # summed in float32 at least (16-bit gradients: a sum over N*L terms would lose too much)
            gb = gy_groups.sum(axis=2, dtype=np.promote_types(gy.dtype, np.float32)).reshape(out)
        return (gx, gW) if len(self.needs_grad) == 2 else (gx, gW, gb)


def conv2d(x: Tensor, W: Tensor, b: Tensor | None = None, stride: int = 1, pad: int = 0,
           groups: int = 1, algorithm: str | None = None, activation: str | None = None) -> Tensor:
    """Convolution of NCHW x with W (out, in/groups, kh, kw), plus a bias per output channel.

    algorithm: "auto" (Winograd for 3x3 and 5x5 convolutions on the CPU, and for strided ones
    that are 3x3 or 5x5 in stride x stride blocks of pixels, with 16 or more channels in and out
    per group, the input's counted in blocks, C * stride^2; im2col + GEMM otherwise), "direct"
    (im2col + GEMM always) or "winograd" (on either device; a MinidlError where it does not
    apply); None reads MINIDL_CONV_ALGORITHM, and takes "auto" when that is unset.
    activation "relu": relu(conv2d(...)), the bias and the ReLU in one pass (None: none).
    """
    f = Conv2d(stride, pad, groups, algorithm, activation)
    return f(x, W) if b is None else f(x, W, b)
