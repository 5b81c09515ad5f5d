"""2-D convolution with groups, as im2col + one matrix product per group.

x is NCHW, W is (out, in/groups, kh, kw). im2col lays the input patches out as
cols (groups, in/groups*kh*kw, N*OH*OW): the batch sits inside the columns, so
each group is ONE large GEMM, y_g = W_g @ cols_g (NumPy's BLAS on the CPU,
cuBLAS through CuPy on the GPU), rather than N small ones. Backward:
gW_g = gy_g @ cols_g^T and gcols_g = W_g^T @ gy_g, and the input gradient goes
back through col2im.

The GEMMs are the same code on both devices; only im2col and col2im differ,
as the pairs below: on the CPU a strided view and a loop over the kh*kw kernel
offsets, each core taking a share of the batch; on the GPU the kernels in
conv.cu. col2im is a gather there (each thread sums the patches that cover its
input element), so it needs no atomics and gives the same result on every run.
"""
import numpy as np

from minidl import kernels
from minidl.core import Function
from minidl.cpu_parallel import in_parallel
from minidl.errors import MinidlError

CU = kernels.KernelFile.beside(__file__, "conv.cu", ("im2col", "col2im"))


def output_size(size, ksize, stride, pad, what="convolution"):
    """(size + 2*pad - ksize) // stride + 1, or an error when the window does not fit."""
    if stride < 1:
        raise MinidlError(f"{what} stride must be at least 1, got {stride}")
    if size + 2 * pad < ksize:
        raise MinidlError(f"{what} window {ksize} is larger than the padded input {size} + 2*{pad}")
    return (size + 2 * pad - ksize) // stride + 1


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
    kernels.launch(CU, "im2col", x.dtype, cols.size, x, cols, cols.size, n, c, h, w, kh, kw, stride, pad, oh, ow)
    return cols


# --- col2im, the adjoint of im2col: sum the (C, kh, kw, N, OH, OW) patches back into (N, C, H, W)

def col2im_cpu(cols, h, w, stride, pad):
    c, kh, kw, n, oh, ow = cols.shape
    out = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    by_image = cols.transpose(3, 0, 1, 2, 4, 5)  # a view: (N, C, kh, kw, OH, OW)

    def add(images):
        for i in range(kh):  # each kernel offset touches distinct pixels: plain strided adds
            for j in range(kw):
                out[images, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += by_image[images, :, i, j]
    in_parallel(add, out)
    return out[:, :, pad:pad + h, pad:pad + w] if pad else out


def col2im_gpu(cols, h, w, stride, pad):
    c, kh, kw, n, oh, ow = cols.shape
    out = kernels.empty((n, c, h, w), cols.dtype)
    kernels.launch(CU, "col2im", cols.dtype, out.size, cols, out, out.size, n, c, h, w, kh, kw, stride, pad, oh, ow)
    return out


# --- the function

class Conv2d(Function):
    """Both paths are the same GEMMs around their own im2col and col2im, and save the same (cols, W)."""

    def __init__(self, stride, pad, groups):
        self.stride, self.pad, self.groups = stride, pad, groups

    def forward_cpu(self, x, W, b=None):
        return self._forward(im2col_cpu, x, W, b)

    def forward_gpu(self, x, W, b=None):
        return self._forward(im2col_gpu, x, W, b)

    def backward_cpu(self, gy):
        return self._backward(col2im_cpu, gy)

    def backward_gpu(self, gy):
        return self._backward(col2im_gpu, gy)

    def _forward(self, im2col, x, W, b):
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
        cols = im2col(x, kh, kw, self.stride, self.pad, oh, ow).reshape(g, cg * kh * kw, n * oh * ow)
        y = W.reshape(g, out // g, cg * kh * kw) @ cols  # (G, out/G, N*OH*OW)
        y = y.reshape(out, n, oh, ow).transpose(1, 0, 2, 3)
        y = y + b.reshape(1, out, 1, 1) if b is not None else y.copy()  # either way a new NCHW array
        self.save(cols, W)
        self.in_shape = x.shape
        return y

    def _backward(self, col2im, gy):
        cols, W = self.saved
        n, c, h, w = self.in_shape
        out, cg, kh, kw = W.shape
        g = self.groups
        oh, ow = gy.shape[2:]
        gy_groups = gy.transpose(1, 0, 2, 3).reshape(g, out // g, n * oh * ow)  # one copy, the batch inside
        gx = gW = gb = None
        if self.needs_grad[1]:
            gW = (gy_groups @ cols.swapaxes(-1, -2)).reshape(W.shape)
        if self.needs_grad[0]:  # skipped for the first layer, whose input is the image
            gcols = W.reshape(g, out // g, -1).swapaxes(-1, -2) @ gy_groups  # (G, cg*kh*kw, N*L)
            gx = col2im(gcols.reshape(c, kh, kw, n, oh, ow), h, w, self.stride, self.pad)
        if len(self.needs_grad) == 3 and self.needs_grad[2]:
            gb = gy_groups.sum(axis=2).reshape(out)
        return (gx, gW) if len(self.needs_grad) == 2 else (gx, gW, gb)


def conv2d(x, W, b=None, stride=1, pad=0, groups=1):
    """Convolution of NCHW x with W (out, in/groups, kh, kw), plus a bias per output channel."""
    f = Conv2d(stride, pad, groups)
    return f(x, W) if b is None else f(x, W, b)
