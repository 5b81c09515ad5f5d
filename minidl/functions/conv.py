"""2-D convolution with groups, as im2col + one matrix product per group.

x is NCHW, W is (out, in/groups, kh, kw). im2col lays the input patches out as
cols (N, groups, in/groups*kh*kw, OH*OW); then y = W @ cols is a batched GEMM
(NumPy's BLAS on the CPU, cuBLAS through CuPy on the GPU) that lands directly
in NCHW order. Backward: gW = gy @ cols^T summed over the batch, and the input
gradient goes back through col2im.

im2col and col2im: on the CPU a strided view and a loop over the kh*kw kernel
offsets; on the GPU the kernels in conv.cu. col2im is a gather there (each
thread sums the patches that cover its input element), so it needs no atomics
and gives the same result on every run.
"""
import os

import numpy as np

from minidl import kernels
from minidl.core import Function
from minidl.errors import MinidlError

CU_FILE = os.path.join(os.path.dirname(__file__), "conv.cu")
CU_KERNELS = ("im2col", "col2im")


def output_size(size, ksize, stride, pad, what="convolution"):
    """(size + 2*pad - ksize) // stride + 1, or an error when the window does not fit."""
    if stride < 1:
        raise MinidlError(f"{what} stride must be at least 1, got {stride}")
    if size + 2 * pad < ksize:
        raise MinidlError(f"{what} window {ksize} is larger than the padded input {size} + 2*{pad}")
    return (size + 2 * pad - ksize) // stride + 1


# --- im2col / col2im: CPU and GPU side by side

def im2col(x, kh, kw, stride, pad, oh, ow):
    """(N, C, H, W) -> (N, C, kh, kw, OH, OW) patches, contiguous."""
    if not isinstance(x, np.ndarray):
        return _im2col_gpu(x, kh, kw, stride, pad, oh, ow)
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c = x.shape[:2]
    sn, sc, sh, sw = x.strides
    view = np.lib.stride_tricks.as_strided(
        x, (n, c, kh, kw, oh, ow), (sn, sc, sh, sw, sh * stride, sw * stride), writeable=False)
    return np.ascontiguousarray(view)


def col2im(cols, h, w, stride, pad):
    """The adjoint of im2col: sum the (N, C, kh, kw, OH, OW) patches back into (N, C, H, W)."""
    if not isinstance(cols, np.ndarray):
        return _col2im_gpu(cols, h, w, stride, pad)
    n, c, kh, kw, oh, ow = cols.shape
    out = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in range(kh):  # each kernel offset touches distinct pixels: plain strided adds
        for j in range(kw):
            out[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += cols[:, :, i, j]
    return out[:, :, pad:pad + h, pad:pad + w] if pad else out


def _im2col_gpu(x, kh, kw, stride, pad, oh, ow):
    import cupy as cp
    x = kernels.prepare(x, x.dtype)
    n, c, h, w = x.shape
    cols = cp.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    kernel = kernels.get_kernel(CU_FILE, "im2col", x.dtype, CU_KERNELS)
    i64 = np.int64
    kernels.launch(kernel, cols.size, (x, cols, i64(cols.size), i64(c), i64(h), i64(w), i64(kh), i64(kw),
                                       i64(stride), i64(pad), i64(oh), i64(ow)))
    return cols


def _col2im_gpu(cols, h, w, stride, pad):
    import cupy as cp
    cols = kernels.prepare(cols, cols.dtype)
    n, c, kh, kw, oh, ow = cols.shape
    out = cp.empty((n, c, h, w), dtype=cols.dtype)
    kernel = kernels.get_kernel(CU_FILE, "col2im", cols.dtype, CU_KERNELS)
    i64 = np.int64
    kernels.launch(kernel, out.size, (cols, out, i64(out.size), i64(c), i64(h), i64(w), i64(kh), i64(kw),
                                      i64(stride), i64(pad), i64(oh), i64(ow)))
    return out


# --- the function

class Conv2d(Function):
    def __init__(self, stride, pad, groups):
        self.stride, self.pad, self.groups = stride, pad, groups

    def forward(self, x, W, b=None):
        if x.ndim != 4 or W.ndim != 4:
            raise MinidlError(f"conv2d wants x of shape (N, C, H, W) and W of shape (out, in/groups, kh, kw), "
                              f"got {x.shape} and {W.shape}")
        n, c, h, w = x.shape
        out, cg, kh, kw = W.shape
        g = self.groups
        if g < 1 or out % g:
            raise MinidlError(f"conv2d: {out} output channels cannot be split into {g} groups")
        if cg * g != c:
            raise MinidlError(f"conv2d: the input has {c} channels but W of shape {W.shape} with groups={g} "
                              f"expects {cg * g}")
        if b is not None and b.shape != (out,):
            raise MinidlError(f"conv2d: bias of shape {b.shape} for {out} output channels")
        oh = output_size(h, kh, self.stride, self.pad)
        ow = output_size(w, kw, self.stride, self.pad)
        cols = im2col(x, kh, kw, self.stride, self.pad, oh, ow).reshape(n, g, cg * kh * kw, oh * ow)
        Wg = W.reshape(g, out // g, cg * kh * kw)
        y = (Wg @ cols).reshape(n, out, oh, ow)  # (N, G, out/G, L): already NCHW
        if b is not None:
            y += b.reshape(1, out, 1, 1)
        self.save(cols, W)
        self.in_shape = x.shape
        return y

    def backward(self, gy):
        cols, W = self.saved
        n, c, h, w = self.in_shape
        out, cg, kh, kw = W.shape
        g = self.groups
        gy = gy.reshape(n, g, out // g, -1)
        gx = gW = gb = None
        if self.needs_grad[1]:
            gW = (gy @ cols.swapaxes(-1, -2)).sum(axis=0).reshape(W.shape)
        if self.needs_grad[0]:  # skipped for the first layer, whose input is the image
            gcols = W.reshape(g, out // g, -1).swapaxes(-1, -2) @ gy  # (N, G, cg*kh*kw, L)
            oh, ow = output_size(h, kh, self.stride, self.pad), output_size(w, kw, self.stride, self.pad)
            gx = col2im(gcols.reshape(n, c, kh, kw, oh, ow), h, w, self.stride, self.pad)
        if len(self.needs_grad) == 3 and self.needs_grad[2]:
            gb = gy.sum(axis=(0, 3)).reshape(out)
        return (gx, gW) if len(self.needs_grad) == 2 else (gx, gW, gb)


def conv2d(x, W, b=None, stride=1, pad=0, groups=1):
    """Convolution of NCHW x with W (out, in/groups, kh, kw), plus a bias per output channel."""
    f = Conv2d(stride, pad, groups)
    return f(x, W) if b is None else f(x, W, b)
