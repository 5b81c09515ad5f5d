"""ReLU, and bias + ReLU in one pass for the layers that a ReLU follows.

Forward is one elementwise maximum on both devices; on a GPU into a C-contiguous
array, whatever the layout of x (a convolution's output is a transposed view),
so that the kernels that read y (this backward, LRN, pooling, im2col) take it
without a copy. Backward on a GPU is one kernel (activation.cu) where CuPy
would launch two, the mask and the product. The bias_relu_* functions and
relu_grad_to_cnl and relu_grad_rows are the fused passes of conv.py and linear.py (activation="relu"); the
two backward ones also sum the bias's gradient in their launch (no separate sum: activation.cu, last_of_group),
in float32 for a 16-bit gradient (kernels.scalar_dtype), in the gradient's dtype otherwise.
"""
from __future__ import annotations

import numpy as np

from minidl import kernels
from minidl.core import Array, Function, Tensor
from minidl.device import cupy
from minidl.errors import MinidlError
from minidl.functions.dropout import scaled_mask

CU = kernels.KernelFile.beside(__file__, "activation.cu", (
    "relu_backward", "bias_relu_rows", "bias_relu_dropout_rows", "bias_relu_cnl_to_nchw",
    "relu_backward_nchw_to_cnl", "relu_backward_bias_rows"),
    types=kernels.HALF_TYPES)
# relu_backward_bias_rows: rows a thread takes. A few, so a batch of 128 rows makes 32 threads per feature
# (65,536 for 2,048 features: every SM of an H100 busy) where a thread per feature would leave most idle
ROWS_PER_THREAD = 4
ACTIVATIONS = (None, "relu")  # what a Conv2d or Linear layer may apply to its output in the same pass


def check_activation(activation: str | None) -> str | None:
    if activation not in ACTIVATIONS:
        raise MinidlError(f"activation must be None or 'relu', got {activation!r}")
    return activation


def relu_array(x: Array) -> Array:
    """max(x, 0) as a new C-contiguous array on x's device (NaN propagates)."""
    if isinstance(x, np.ndarray):
        return np.maximum(x, 0)
    return cupy().maximum(x, 0, out=kernels.empty(x.shape, x.dtype))


def relu_grad(y: Array, gy: Array, scale: float = 1.0) -> Array:
    """gy * (y > 0): ReLU's backward from its output y. After bias_relu_rows with dropout, y is the
    dropped output and scale dropout's 1/(1-p): y > 0 exactly where the element was kept and positive."""
    if isinstance(y, np.ndarray):
        return gy * (y > 0) if scale == 1.0 else gy * np.where(y > 0, y.dtype.type(scale), y.dtype.type(0))
    gx = kernels.empty(y.shape, y.dtype)
    kernels.launch(CU, "relu_backward", y.dtype, y.size, y, gy.astype(y.dtype, copy=False), gx, y.size,
                   float(scale))
    return gx


def bias_relu_rows(y: Array, b: Array, dropout: tuple[float, int, int] | None = None) -> Array:
    """relu(y + b) for a (rows, features) y, in place; returns y. dropout (p, key, start): then inverted
    dropout with the mask of (key, start) (functions/dropout.py), in the same pass."""
    if isinstance(y, np.ndarray):
        y += b
        np.maximum(y, 0, out=y)
        if dropout:
            p, key, start = dropout
            y *= scaled_mask(key, start, y.shape, p, y.dtype)
        return y
    b = b.astype(kernels.scalar_dtype(y.dtype), copy=False)  # the kernels' bias: float for a 16-bit y
    if dropout:
        p, key, start = dropout
        kernels.launch(CU, "bias_relu_dropout_rows", y.dtype, y.size, y, b, y.shape[1], y.size, key, start,
                       float(p), 1.0 / (1.0 - p))
    else:
        kernels.launch(CU, "bias_relu_rows", y.dtype, y.size, y, b, y.shape[1], y.size)
    return y


def bias_relu_cnl_to_nchw(cnl: Array, b: Array, n: int, c: int, oh: int, ow: int) -> Array:
    """relu(y + b) as a new (N, C, OH, OW) array, from a GEMM's (C, N, OH*OW)-ordered output."""
    if isinstance(cnl, np.ndarray):
        y = cnl.reshape(c, n, oh, ow).transpose(1, 0, 2, 3) + b.reshape(1, c, 1, 1)
        return np.maximum(y, 0, out=y)
    y = kernels.empty((n, c, oh, ow), cnl.dtype)
    b = b.astype(kernels.scalar_dtype(cnl.dtype), copy=False)  # the kernels' bias: float for a 16-bit y
    kernels.launch(CU, "bias_relu_cnl_to_nchw", cnl.dtype, y.size, cnl, b, y, n, c, oh * ow, y.size)
    return y


def relu_grad_rows(y: Array, gy: Array, scale: float = 1.0, bias: bool = True) -> tuple[Array, Array | None]:
    """relu_grad(y, gy, scale) of a (rows, features) y, and with `bias` the bias's gradient, its sum over the
    rows, in the same pass (None without)."""
    if not bias:
        return relu_grad(y, gy, scale), None
    if isinstance(y, np.ndarray):
        gx = relu_grad(y, gy, scale)
        return gx, gx.sum(axis=0, dtype=kernels.scalar_dtype(gx.dtype))
    rows, features = y.shape
    threads = max(1, -(-rows // ROWS_PER_THREAD)) * features  # a batch of 0 rows still zeroes gb
    gx = kernels.empty(y.shape, y.dtype)
    gb, partials = _bias_sums(features, threads, y.dtype)
    kernels.launch(CU, "relu_backward_bias_rows", y.dtype, threads, y, gy.astype(y.dtype, copy=False), gx, gb,
                   partials, kernels.zeroed_counters(features), rows, features, ROWS_PER_THREAD, threads,
                   float(scale))
    return gx, gb


def relu_grad_to_cnl(y: Array, gy: Array, bias: bool = True) -> tuple[Array, Array | None]:
    """ReLU's backward of NCHW y and gy, laid out (C, N*H*W) for a convolution's GEMMs, and with `bias` the
    bias's gradient, its sum over N*H*W, from the same pass (None without; a GPU sums it anyway, at 1/(H*W)
    of the pass's traffic)."""
    n, c, h, w = y.shape
    if isinstance(y, np.ndarray):
        g = (gy * (y > 0)).transpose(1, 0, 2, 3).reshape(c, n * h * w)
        return g, g.sum(axis=1, dtype=kernels.scalar_dtype(g.dtype)) if bias else None
    threads = c * n * 32  # a warp per (channel, sample)
    g = kernels.empty((c, n * h * w), y.dtype)
    if n == 0:  # no thread would write the sums: of no terms, zero
        return g, cupy().zeros(c, kernels.scalar_dtype(y.dtype)) if bias else None
    gb, partials = _bias_sums(c, threads + c * n, y.dtype)
    kernels.launch(CU, "relu_backward_nchw_to_cnl", y.dtype, threads, y, gy.astype(y.dtype, copy=False), g, gb,
                   partials, kernels.zeroed_counters(c * n + c), n, c, h * w, threads)
    return g, gb if bias else None


def _bias_sums(features: int, partials: int, dtype) -> tuple[Array, Array]:
    """A bias gradient of `features` and scratch for `partials` partial sums, both of the kernels' accumulation
    type (float32 for a 16-bit dtype)."""
    acc = kernels.scalar_dtype(dtype)
    return kernels.empty((features,), acc), kernels.empty((partials,), acc)


class ReLU(Function):
    def forward(self, x):
        y = relu_array(x)
        self.save(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return relu_grad(y, gy)


def relu(x: Tensor) -> Tensor:
    return ReLU()(x)
