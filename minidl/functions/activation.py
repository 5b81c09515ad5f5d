"""ReLU.

Forward is one elementwise maximum on both devices; on a GPU into a C-contiguous
array, whatever the layout of x (a convolution's output is a transposed view),
so that the kernels that read y (this backward, LRN, pooling, im2col) take it
without a copy. Backward on a GPU is one kernel (activation.cu) where CuPy
would launch two, the mask and the product.
"""
from __future__ import annotations

import numpy as np

from minidl import kernels
from minidl.core import Function, Tensor

CU = kernels.KernelFile.beside(__file__, "activation.cu", ("relu_backward",))


class ReLU(Function):
    def forward_cpu(self, x):
        y = np.maximum(x, 0)
        self.save(y)
        return y

    def forward_gpu(self, x):
        y = self.device.xp.maximum(x, 0, out=kernels.empty(x.shape, x.dtype))
        self.save(y)
        return y

    def backward_cpu(self, gy):
        (y,) = self.saved
        return gy * (y > 0)

    def backward_gpu(self, gy):
        (y,) = self.saved
        gx = kernels.empty(y.shape, y.dtype)
        kernels.launch(CU, "relu_backward", y.dtype, y.size, y, gy.astype(y.dtype, copy=False), gx,
                       y.size)
        return gx


def relu(x: Tensor) -> Tensor:
    return ReLU()(x)
