"""Local response normalization across channels (the paper's Section 3.3).

    b[c] = a[c] / s[c]^beta,   s[c] = k + alpha' * sum_{|j-c| <= n//2} a[j]^2

alpha' = alpha (the paper's convention, the default) or alpha/n (Caffe's and
PyTorch's, with alpha_over_n=True). Backward, with the window symmetric:

    da[j] = g[j] * s[j]^-beta - 2*alpha'*beta * a[j] * sum_{|i-j| <= n//2} g[i]*a[i]*s[i]^(-beta-1)

CPU: NumPy, the window sum as n shifted slices, a share of the batch per core. GPU: lrn.cu, one thread per
pixel sliding a running window sum over the channels.
"""
import os

import numpy as np

from minidl import kernels
from minidl.core import Function
from minidl.cpu_parallel import in_parallel
from minidl.device import cupy
from minidl.errors import MinidlError

CU_FILE = os.path.join(os.path.dirname(__file__), "lrn.cu")
CU_KERNELS = ("lrn_forward", "lrn_backward")


def window_sum(values, n, out):
    """out = the sum over channels c-n//2 .. c+n//2 (clipped at the ends) of (N, C, H, W) values."""
    out[...] = values
    for shift in range(1, n // 2 + 1):
        out[:, shift:] += values[:, :-shift]
        out[:, :-shift] += values[:, shift:]


class LocalResponseNorm(Function):
    def __init__(self, n, k, alpha, beta, alpha_over_n):
        if n < 1 or n % 2 == 0:
            raise MinidlError(f"local_response_norm needs an odd window n >= 1, got {n}")
        self.n, self.k, self.beta = n, k, beta
        self.alpha = alpha / n if alpha_over_n else alpha

    def forward(self, x):
        if x.ndim != 4:
            raise MinidlError(f"local_response_norm wants x of shape (N, C, H, W), got {x.shape}")
        if x.dtype.kind != "f":
            raise MinidlError(f"local_response_norm needs floating-point x, got {x.dtype}")
        if isinstance(x, np.ndarray):
            return self._forward_cpu(x)
        y, s = self._gpu("lrn_forward", x)
        self.save(x, s)
        return y

    def _forward_cpu(self, x):
        y, s, s_pow = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        alpha, k, minus_beta = (x.dtype.type(v) for v in (self.alpha, self.k, -self.beta))

        def normalize(images):  # in place where it can: these arrays are the size of the layer's output
            x_part, s_part = x[images], s[images]
            window_sum(x_part * x_part, self.n, out=s_part)
            s_part *= alpha
            s_part += k
            np.power(s_part, minus_beta, out=s_pow[images])
            np.multiply(x_part, s_pow[images], out=y[images])
        in_parallel(normalize, x, blocks=True)
        self.save(x, s, s_pow)  # backward needs s^-beta and s^(-beta-1) = s^-beta / s
        return y

    def backward(self, gy):
        if not isinstance(gy, np.ndarray):
            x, s = self.saved
            return self._gpu("lrn_backward", x, s, gy)
        x, s, s_pow = self.saved
        gx = np.empty_like(gy)
        scale = x.dtype.type(2 * self.alpha * self.beta)

        def differentiate(images):
            x_part, gx_part = x[images], gx[images]
            np.multiply(gy[images], s_pow[images], out=gx_part)
            t = gx_part * x_part
            t /= s[images]
            through_s = np.empty_like(t)
            window_sum(t, self.n, out=through_s)
            through_s *= x_part
            through_s *= scale
            gx_part -= through_s
        in_parallel(differentiate, gy, blocks=True)
        return gx

    def _gpu(self, name, x, s=None, gy=None):
        cp = cupy()
        t = x.dtype.type
        x = kernels.prepare(x, x.dtype)
        n, c, h, w = x.shape
        kernel = kernels.get_kernel(CU_FILE, name, x.dtype, CU_KERNELS)
        pixels, i64 = n * h * w, np.int64
        sizes = (i64(pixels), i64(c), i64(h * w), i64(self.n // 2), t(self.k), t(self.alpha), t(self.beta))
        if name == "lrn_forward":
            y, s = cp.empty_like(x), cp.empty_like(x)
            kernels.launch(kernel, pixels, (x, y, s) + sizes)
            return y, s
        gx = cp.empty_like(x)
        kernels.launch(kernel, pixels, (x, s, kernels.prepare(gy, x.dtype), gx) + sizes)
        return gx


def local_response_norm(x, n=5, k=2.0, alpha=1e-4, beta=0.75, alpha_over_n=False):
    """LRN across channels; the paper's constants and convention by default."""
    return LocalResponseNorm(n, k, alpha, beta, alpha_over_n)(x)
