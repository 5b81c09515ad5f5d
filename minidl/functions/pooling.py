"""Max pooling, overlapping as in the paper (Section 3.4: window 3, stride 2).

Forward keeps where each window's maximum was; backward sends each gradient to
that one element. With ties the first element in row-major scan order wins,
on both paths. Padding counts as -infinity. (With NaN in a window the two paths
may choose different elements; a network with NaN activations has diverged.)

GPU: one thread per output scans its window with a strict `>` and saves the
offset; backward is a gather (each input element sums the outputs that chose
it), so no atomics.

CPU: the max is separable, so it is taken in two passes, over the k columns of
each window and then over the k rows of those column maxima, each remembering
which of its k candidates was first to hold the maximum. First row holding the
maximum, then first column in that row, is first in scan order. This is 2(k-1)
whole-array operations instead of k*k - 1, about 7x faster for AlexNet's pools,
and each core takes a share of the batch.
"""
import os

import numpy as np

from minidl import kernels
from minidl.core import Function
from minidl.cpu_parallel import in_parallel
from minidl.device import cupy
from minidl.errors import MinidlError
from minidl.functions.conv import output_size

CU_FILE = os.path.join(os.path.dirname(__file__), "pooling.cu")
CU_KERNELS = ("max_pool_forward", "max_pool_backward")


def _strided(array, axis, ksize, stride, count):
    """The k views of `array` along `axis` (2: rows, 3: columns): view t holds element t of each of `count` windows."""
    index = [slice(None)] * 4
    for t in range(ksize):
        index[axis] = slice(t, t + stride * count, stride)
        yield array[tuple(index)]


def _first_max(views):
    """Elementwise max over views, and the index of the first view holding it."""
    views = list(views)
    y = views[0]
    for view in views[1:]:
        y = np.maximum(y, view)
    first = np.zeros(y.shape, dtype=np.min_scalar_type(len(views) - 1))
    not_yet = np.ones(y.shape, dtype=bool)
    for view in views[:-1]:
        not_yet &= view != y
        first += not_yet
    return y, first


def _route_back(g_out, chosen, axis, g_in, ksize, stride):
    """The adjoint of _first_max over _strided views: adds each gradient into the view of g_in that was chosen."""
    routed = np.empty_like(g_out)
    for t, view in enumerate(_strided(g_in, axis, ksize, stride, g_out.shape[axis])):
        np.multiply(chosen == t, g_out, out=routed)
        view += routed  # the views of one t never overlap


class MaxPool2d(Function):
    def __init__(self, ksize, stride, pad):
        self.ksize, self.stride, self.pad = ksize, stride, pad

    def forward(self, x):
        if x.ndim != 4:
            raise MinidlError(f"max_pool2d wants x of shape (N, C, H, W), got {x.shape}")
        if x.dtype.kind != "f":  # as in PyTorch; padding is -infinity, which no integer holds
            raise MinidlError(f"max_pool2d needs floating-point x, got {x.dtype}")
        if self.pad * 2 >= self.ksize:
            raise MinidlError(f"max_pool2d padding {self.pad} must be less than half the window {self.ksize}")
        n, c, h, w = x.shape
        self.in_shape = x.shape
        oh = output_size(h, self.ksize, self.stride, self.pad, "max_pool2d")
        ow = output_size(w, self.ksize, self.stride, self.pad, "max_pool2d")
        if isinstance(x, np.ndarray):
            y, where = self._forward_cpu(x, oh, ow)
        else:
            y, where = self._forward_gpu(x, oh, ow)
        self.save(*where)
        return y

    def _forward_cpu(self, x, oh, ow):
        n, c, h, w = x.shape
        p, k, stride = self.pad, self.ksize, self.stride
        index_type = np.min_scalar_type(k - 1)
        y = np.empty((n, c, oh, ow), dtype=x.dtype)
        row = np.empty(y.shape, dtype=index_type)
        column = np.empty((n, c, h + 2 * p, ow), dtype=index_type)

        def pool(images):
            padded = np.pad(x[images], ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf) if p else x[images]
            column_max, column[images] = _first_max(_strided(padded, 3, k, stride, ow))  # (n, C, H+2p, OW)
            y[images], row[images] = _first_max(_strided(column_max, 2, k, stride, oh))
        in_parallel(pool, x, blocks=True)
        return y, (row, column)

    def _forward_gpu(self, x, oh, ow):
        cp = cupy()
        x = kernels.prepare(x, x.dtype)
        n, c, h, w = x.shape
        y = cp.empty((n, c, oh, ow), dtype=x.dtype)
        argmax = cp.empty((n, c, oh, ow), dtype=cp.int32)
        kernel = kernels.get_kernel(CU_FILE, "max_pool_forward", x.dtype, CU_KERNELS)
        kernels.launch(kernel, y.size, (x, y, argmax, *self._sizes(y.size, h, w, oh, ow)))
        return y, (argmax,)

    def backward(self, gy):
        if isinstance(gy, np.ndarray):
            return self._backward_cpu(gy, *self.saved)
        (argmax,) = self.saved
        n, c, h, w = self.in_shape
        oh, ow = gy.shape[2:]
        cp = cupy()
        gx = cp.empty(self.in_shape, dtype=gy.dtype)
        kernel = kernels.get_kernel(CU_FILE, "max_pool_backward", gy.dtype, CU_KERNELS)
        kernels.launch(kernel, gx.size, (kernels.prepare(gy, gy.dtype), argmax, gx,
                                         *self._sizes(gx.size, h, w, oh, ow)))
        return gx

    def _backward_cpu(self, gy, row, column):
        """The forward's two passes in reverse: to the chosen row of column maxima, then to the chosen column."""
        n, c, h, w = self.in_shape
        p, k, stride = self.pad, self.ksize, self.stride
        gx = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=gy.dtype)

        def route(images):
            g_column_max = np.zeros(column[images].shape, dtype=gy.dtype)
            _route_back(gy[images], row[images], 2, g_column_max, k, stride)
            _route_back(g_column_max, column[images], 3, gx[images], k, stride)
        in_parallel(route, gx, blocks=True)
        return gx[:, :, p:p + h, p:p + w] if p else gx

    def _sizes(self, total, h, w, oh, ow):
        c = self.in_shape[1]
        return tuple(np.int64(v) for v in (total, c, h, w, oh, ow, self.ksize, self.stride, self.pad))


def max_pool2d(x, ksize=3, stride=2, pad=0):
    """Max over ksize x ksize windows every `stride` pixels; output (H + 2*pad - ksize)//stride + 1."""
    return MaxPool2d(ksize, stride, pad)(x)
