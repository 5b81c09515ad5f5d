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

On the CPU, 3x3 and 5x5 convolutions with enough channels take Winograd's
algorithm instead (winograd.py: about 0.55x the direct path's time for
AlexNet's conv3-conv5, 0.4x for conv2), and so do strided ones that are 3x3
or 5x5 in stride x stride blocks of pixels (conv1, 11x11 at stride 4, about
0.8x); the `algorithm` argument of
conv2d, or the environment variable MINIDL_CONV_ALGORITHM, chooses ("auto",
"direct", "winograd"; on a GPU only "winograd" takes it).
"""
import os

import numpy as np

from minidl import kernels
from minidl.core import Function
from minidl.cpu.threads import in_parallel
from minidl.errors import MinidlError
from minidl.functions import winograd

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
                out[images, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += by_image[images, :, i, j]
    in_parallel(add, out)
    return out[:, :, pad:pad + h, pad:pad + w] if pad else out


def col2im_gpu(cols, h, w, stride, pad):
    c, kh, kw, n, oh, ow = cols.shape
    out = kernels.empty((n, c, h, w), cols.dtype)
    kernels.launch(CU, "col2im", cols.dtype, out.size, cols, out, out.size, n, c, h, w, kh, kw, stride, pad, oh, ow)
    return out


# --- the function

def check_arguments(x, W, b, stride, pad, groups):
    """(OH, OW) of conv2d(x, W, b, stride, pad, groups), or a one-line MinidlError saying what does not fit."""
    if x.ndim != 4 or W.ndim != 4:
        raise MinidlError(f"conv2d wants x of shape (N, C, H, W) and W of shape (out, in/groups, kh, kw), "
                          f"got {x.shape} and {W.shape}")
    n, c, h, w = x.shape
    out, cg, kh, kw = W.shape
    if groups < 1 or out % groups:
        raise MinidlError(f"conv2d: {out} output channels cannot be split into {groups} groups")
    if cg * groups != c:
        raise MinidlError(f"conv2d: the input has {c} channels but W of shape {W.shape} with groups={groups} "
                          f"expects {cg * groups}")
    if b is not None and b.shape != (out,):
        raise MinidlError(f"conv2d: bias of shape {b.shape} for {out} output channels")
    return output_size(h, kh, stride, pad), output_size(w, kw, stride, pad)


ALGORITHMS = ("auto", "direct", "winograd")
ALGORITHM_VARIABLE = "MINIDL_CONV_ALGORITHM"


def requested_algorithm(algorithm=None):
    """`algorithm`, else the environment's MINIDL_CONV_ALGORITHM, else "auto"; checked against ALGORITHMS."""
    where = "conv2d algorithm"
    if algorithm is None:
        algorithm, where = os.environ.get(ALGORITHM_VARIABLE) or "auto", ALGORITHM_VARIABLE
    if algorithm not in ALGORITHMS:
        raise MinidlError(f"{where} must be one of {', '.join(ALGORITHMS)}; got {algorithm!r}")
    return algorithm


class Conv2d(Function):
    """The direct path is the same GEMMs on both devices around their own im2col and col2im, saving (cols, W).

    A 3x3 or 5x5 convolution (or a strided one that is 3x3 or 5x5 in blocks of
    pixels) takes Winograd's algorithm (winograd.py) instead when the algorithm is "winograd", or on the CPU when it is "auto"
    (the default) and there are the channels to pay (winograd.pays);
    "direct" keeps the direct path. Where Winograd does not apply "auto"
    takes the direct path and "winograd" refuses. On a GPU "auto" takes the
    direct path (benchmarks/NOTES.md, "Winograd for the 3x3 convolutions",
    says why).
    """

    def __init__(self, stride, pad, groups, algorithm=None):
        self.stride, self.pad, self.groups = stride, pad, groups
        self.algorithm = requested_algorithm(algorithm)
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
        oh, ow = check_arguments(x, W, b, self.stride, self.pad, self.groups)  # before the choice reads W's shape
        applies = winograd.applies(W.shape, self.stride)
        if self.algorithm == "winograd" and not applies:
            raise MinidlError(f"conv2d: the Winograd algorithm is for 3x3 or 5x5 filters, or strided ones that are "
                              f"3x3 or 5x5 in stride x stride blocks (11x11 at stride 4), got W of shape {W.shape} "
                              f"with stride {self.stride}; use algorithm 'auto' or 'direct'")
        self.uses_winograd = self.algorithm == "winograd" or (
            self.algorithm == "auto" and auto_winograd and applies
            and winograd.pays(W.shape, self.groups, self.stride))
        if not self.uses_winograd:
            return self._forward(im2col, x, W, b, oh, ow)
        y, saved = winograd.winograd_conv_forward(x, W, b, self.pad, self.groups, stride=self.stride)
        self.save(saved, W.shape)
        return y

    def _winograd_backward(self, gy):
        saved, W_shape = self.saved
        needs = (*self.needs_grad, False)[:3]  # the bias, when there is one, is the third input
        gx, gW, gb = winograd.winograd_conv_backward(gy, W_shape, saved, needs)
        return (gx, gW) if len(self.needs_grad) == 2 else (gx, gW, gb)

    def _forward(self, im2col, x, W, b, oh, ow):
        n, c, h, w = x.shape
        out, cg, kh, kw = W.shape
        g = self.groups
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


def conv2d(x, W, b=None, stride=1, pad=0, groups=1, algorithm=None):
    """Convolution of NCHW x with W (out, in/groups, kh, kw), plus a bias per output channel.

    algorithm: "auto" (Winograd for 3x3 and 5x5 convolutions on the CPU, and for
    strided ones that are 3x3 or 5x5 in stride x stride blocks of pixels, with 16
    or more channels in and out per group, the input's counted in blocks,
    C * stride^2; im2col + GEMM otherwise),
    "direct" (im2col + GEMM always) or "winograd" (on either device; a
    MinidlError where it does not apply); None reads the environment
    variable MINIDL_CONV_ALGORITHM, and takes "auto" when that is unset.
    """
    f = Conv2d(stride, pad, groups, algorithm)
    return f(x, W) if b is None else f(x, W, b)
