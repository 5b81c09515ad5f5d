"""Max pooling, overlapping as in the paper (Section 3.4: window 3, stride 2).

Forward keeps where each window's maximum was; backward sends each gradient to that one element.
With ties the first element in row-major scan order wins, on both paths; padding counts as
-infinity; a NaN is its window's maximum (the first NaN in scan order), as in PyTorch. GPU: one
thread per output scans its window with a strict `>`; backward is a gather, so no atomics. CPU: the max is
separable, two passes (over the k columns of each window, then over the k rows of those column
maxima), each keeping the first of its k candidates to hold the maximum: first row, then first
column in it, is first in scan order (timings: benchmarks/NOTES.md, "Max pooling").
"""
from __future__ import annotations

import numpy as np

from minidl import kernels
from minidl.core import Function, Tensor
from minidl.cpu.threads import in_parallel
from minidl.errors import MinidlError
from minidl.functions.conv_arguments import output_size

CU = kernels.KernelFile.beside(__file__, "pooling.cu", ("max_pool_forward", "max_pool_backward"),
                               types=kernels.HALF_TYPES)


def _strided(array, axis, ksize, stride, count):
    """The k views of `array` along `axis` (2: rows, 3: columns): view t holds element t of each of
    `count` windows."""
    index = [slice(None)] * 4
    for t in range(ksize):
        index[axis] = slice(t, t + stride * count, stride)
        yield array[tuple(index)]


def _first_max(views):
    """Elementwise max over views (NaN where one is NaN), and the index of the first view holding it."""
    views = list(views)
    y = views[0]
    for view in views[1:]:
        y = np.maximum(y, view)
    # the first index holding the max = how many views in a row before it do not; a NaN max is
    # held by the first NaN (NaN != NaN), checked only where there is one
    if y.size and np.isnan(y.max()):
        def lacks(view):
            return (view != y) & (view == view)
    else:
        def lacks(view):
            return view != y
    not_yet = lacks(views[0])
    first = not_yet.astype(np.min_scalar_type(len(views) - 1))
    for view in views[1:-1]:
        not_yet &= lacks(view)
        first += not_yet
    return y, first


def _route_back(g_out, chosen, axis, g_in, ksize, stride):
    """The adjoint of _first_max over _strided views: each gradient into the view of g_in that was
    chosen.

    g_in needs no zeros beforehand. When windows touch or overlap (ksize >=
    stride) the views of the first `stride` offsets tile the axis up to
    stride * count, so they are written rather than added, the rest of the
    axis is zeroed, and the later offsets are added; with gaps between windows
    all of g_in is zeroed first.
    """
    count = g_out.shape[axis]
    tiled = ksize >= stride
    if not tiled:
        g_in[...] = 0
    for t, view in enumerate(_strided(g_in, axis, ksize, stride, count)):
        if tiled and t < stride:
            np.multiply(chosen == t, g_out, out=view)
        else:
            view += (chosen == t) * g_out
        if tiled and t == stride - 1:
            index = [slice(None)] * 4
            index[axis] = slice(stride * count, None)
            g_in[tuple(index)] = 0


class MaxPool2d(Function):
    """Each path saves for backward where the maxima were, in the form its backward reads
    fastest: the CPU the first-max choices of its two separable passes (row, column),
    the GPU each window's offset of its maximum (argmax), which the gather kernel compares."""

    def __init__(self, ksize, stride, pad):
        self.ksize, self.stride, self.pad = ksize, stride, pad

    def _output_size(self, x):
        """(OH, OW) for x, checked as both paths need it."""
        if x.ndim != 4:
            raise MinidlError(f"max_pool2d wants x of shape (N, C, H, W), got {x.shape}")
        # as in PyTorch; padding is -infinity, which no integer holds (bfloat16 is of kind "V")
        if x.dtype.kind != "f" and x.dtype not in kernels.HALF_TYPES:
            raise MinidlError(f"max_pool2d needs floating-point x, got {x.dtype}")
        if self.pad * 2 >= self.ksize:
            raise MinidlError(f"max_pool2d padding {self.pad} must be less than half the window "
                              f"{self.ksize}")
        self.in_shape = x.shape
        h, w = x.shape[2:]
        return (output_size(h, self.ksize, self.stride, self.pad, "max_pool2d"),
                output_size(w, self.ksize, self.stride, self.pad, "max_pool2d"))

    def forward_cpu(self, x):
        oh, ow = self._output_size(x)
        n, c, h, w = x.shape
        p, k, stride = self.pad, self.ksize, self.stride
        index_type = np.min_scalar_type(k - 1)
        y = np.empty((n, c, oh, ow), dtype=x.dtype)
        row = np.empty(y.shape, dtype=index_type)
        column = np.empty((n, c, h + 2 * p, ow), dtype=index_type)

        def pool(images):
            padded = np.pad(x[images], ((0, 0), (0, 0), (p, p), (p, p)),
                            constant_values=-np.inf) if p else x[images]
            # (n, C, H+2p, OW)
            column_max, column[images] = _first_max(_strided(padded, 3, k, stride, ow))
            y[images], row[images] = _first_max(_strided(column_max, 2, k, stride, oh))
        in_parallel(pool, x, blocks=True)
        self.save(row, column)
        return y

    def forward_gpu(self, x):
        oh, ow = self._output_size(x)
        n, c, h, w = x.shape
        y = kernels.empty((n, c, oh, ow), x.dtype)
        argmax = kernels.empty(y.shape, np.int32)
        kernels.launch(CU, "max_pool_forward", x.dtype, y.size,
                       x, y, argmax, y.size, c, h, w, oh, ow, self.ksize, self.stride, self.pad)
        self.save(argmax)
        return y

    def backward_cpu(self, gy):
        """The forward's two passes in reverse: to the chosen row of column maxima, then to the
        chosen column."""
        row, column = self.saved
        n, c, h, w = self.in_shape
        p, k, stride = self.pad, self.ksize, self.stride
        gx = np.empty((n, c, h + 2 * p, w + 2 * p), dtype=gy.dtype)  # _route_back writes all of it

        def route(images):
            g_column_max = np.empty(column[images].shape, dtype=gy.dtype)
            _route_back(gy[images], row[images], 2, g_column_max, k, stride)
            _route_back(g_column_max, column[images], 3, gx[images], k, stride)
        in_parallel(route, gx, blocks=True)
        return gx[:, :, p:p + h, p:p + w] if p else gx

    def backward_gpu(self, gy):
        (argmax,) = self.saved
        n, c, h, w = self.in_shape
        oh, ow = gy.shape[2:]
        gx = kernels.empty(self.in_shape, gy.dtype)
        kernels.launch(CU, "max_pool_backward", gy.dtype, gx.size,
                       gy, argmax, gx, gx.size, c, h, w, oh, ow, self.ksize, self.stride, self.pad)
        return gx


def max_pool2d(x: Tensor, ksize: int = 3, stride: int = 2, pad: int = 0) -> Tensor:
    """Max over ksize x ksize windows every `stride` pixels; output (H + 2*pad - ksize)//stride +
    1."""
    return MaxPool2d(ksize, stride, pad)(x)
