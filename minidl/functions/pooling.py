"""Max pooling, overlapping as in the paper (Section 3.4: window 3, stride 2).

Forward keeps, for every output, the offset of its window's maximum (row-major
within the window). With ties the first in that scan order wins, on both
paths: the CPU compares with a strict `>` while scanning the offsets in order,
and so does each GPU thread. Backward sends each gradient to that one element;
on the GPU as a gather (each input element sums the outputs that chose it), so
no atomics. Padding counts as -infinity.
"""
import os

import numpy as np

from minidl import kernels
from minidl.core import Function
from minidl.errors import MinidlError
from minidl.functions.conv import output_size

CU_FILE = os.path.join(os.path.dirname(__file__), "pooling.cu")
CU_KERNELS = ("max_pool_forward", "max_pool_backward")


def _windows(array, ksize, stride, oh, ow):
    """(offset, view) for each window offset, in scan order: the view picks that element of every window."""
    for i in range(ksize):
        for j in range(ksize):
            yield i * ksize + j, array[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]


class MaxPool2d(Function):
    def __init__(self, ksize, stride, pad):
        self.ksize, self.stride, self.pad = ksize, stride, pad

    def forward(self, x):
        if x.ndim != 4:
            raise MinidlError(f"max_pool2d wants x of shape (N, C, H, W), got {x.shape}")
        if self.pad * 2 >= self.ksize:
            raise MinidlError(f"max_pool2d padding {self.pad} must be less than half the window {self.ksize}")
        n, c, h, w = x.shape
        self.in_shape = x.shape
        oh = output_size(h, self.ksize, self.stride, self.pad, "max_pool2d")
        ow = output_size(w, self.ksize, self.stride, self.pad, "max_pool2d")
        if isinstance(x, np.ndarray):
            y, argmax = self._forward_cpu(x, oh, ow)
        else:
            y, argmax = self._forward_gpu(x, oh, ow)
        self.save(argmax)
        return y

    def _forward_cpu(self, x, oh, ow):
        p = self.pad
        if p:
            x = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
        windows = _windows(x, self.ksize, self.stride, oh, ow)
        _, first = next(windows)
        y = first.copy()
        argmax = np.zeros(y.shape, dtype=np.int32)
        better = np.empty(y.shape, dtype=bool)
        for offset, view in windows:
            np.greater(view, y, out=better)  # strict: on a tie the earlier offset stays
            np.copyto(y, view, where=better)
            np.copyto(argmax, offset, where=better)
        return y, argmax

    def _forward_gpu(self, x, oh, ow):
        import cupy as cp
        x = kernels.prepare(x, x.dtype)
        n, c, h, w = x.shape
        y = cp.empty((n, c, oh, ow), dtype=x.dtype)
        argmax = cp.empty((n, c, oh, ow), dtype=cp.int32)
        kernel = kernels.get_kernel(CU_FILE, "max_pool_forward", x.dtype, CU_KERNELS)
        kernels.launch(kernel, y.size, (x, y, argmax, *self._sizes(y.size, h, w, oh, ow)))
        return y, argmax

    def backward(self, gy):
        (argmax,) = self.saved
        n, c, h, w = self.in_shape
        oh, ow = gy.shape[2:]
        if isinstance(gy, np.ndarray):
            p = self.pad
            gx = np.zeros((n, c, h + 2 * p, w + 2 * p), dtype=gy.dtype)
            for offset, view in _windows(gx, self.ksize, self.stride, oh, ow):
                view += (argmax == offset) * gy  # one offset's views never overlap
            return gx[:, :, p:p + h, p:p + w] if p else gx
        import cupy as cp
        gx = cp.empty(self.in_shape, dtype=gy.dtype)
        kernel = kernels.get_kernel(CU_FILE, "max_pool_backward", gy.dtype, CU_KERNELS)
        kernels.launch(kernel, gx.size, (kernels.prepare(gy, gy.dtype), argmax, gx,
                                         *self._sizes(gx.size, h, w, oh, ow)))
        return gx

    def _sizes(self, total, h, w, oh, ow):
        c = self.in_shape[1]
        return tuple(np.int64(v) for v in (total, c, h, w, oh, ow, self.ksize, self.stride, self.pad))


def max_pool2d(x, ksize=3, stride=2, pad=0):
    """Max over ksize x ksize windows every `stride` pixels; output (H + 2*pad - ksize)//stride + 1."""
    return MaxPool2d(ksize, stride, pad)(x)
