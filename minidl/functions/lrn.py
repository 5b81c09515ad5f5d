"""Local response normalization across channels (the paper's Section 3.3).

    b[c] = a[c] / s[c]^beta,   s[c] = k + alpha' * sum_{|j-c| <= n//2} a[j]^2

alpha' = alpha (the paper's convention, the default) or alpha/n (Caffe's and PyTorch's, with
alpha_over_n=True). Backward, with the window symmetric:
    da[j] = g[j] s[j]^-beta - 2 alpha' beta a[j] sum_{|i-j| <= n//2} g[i] a[i] s[i]^(-beta-1)
CPU: NumPy, the window sum as n shifted slices, a share of the batch per core. GPU: lrn.cu, one
thread per pixel sliding a running window sum over the channels.
"""
from __future__ import annotations

import numpy as np

from minidl import kernels
from minidl.core import Function, Tensor
from minidl.cpu.threads import in_parallel
from minidl.errors import MinidlError

CU = kernels.KernelFile.beside(__file__, "lrn.cu", ("lrn_forward", "lrn_backward"),
                               types=kernels.HALF_TYPES)


def window_sum(values, n, out):
    """out = the sum over channels c-n//2 .. c+n//2 (clipped at the ends) of (N, C, H, W) values."""
    out[...] = values
    for shift in range(1, n // 2 + 1):
        out[:, shift:] += values[:, :-shift]
        out[:, :-shift] += values[:, shift:]


class LocalResponseNorm(Function):
    """Both paths save x and s for backward. The CPU also keeps s^-beta, which its forward
    computed anyway and its backward would otherwise compute again (NumPy's power is slow);
    the GPU kernels compute their powers from s per element, in registers, rather than
    write and read one more array the size of the layer's output."""

    def __init__(self, n, k, alpha, beta, alpha_over_n):
        if n < 1 or n % 2 == 0:
            raise MinidlError(f"local_response_norm needs an odd window n >= 1, got {n}")
        self.n, self.k, self.beta = n, k, beta
        self.alpha = alpha / n if alpha_over_n else alpha

    @staticmethod
    def _check(x):
        if x.ndim != 4:
            raise MinidlError(f"local_response_norm wants x of shape (N, C, H, W), got {x.shape}")
        if x.dtype.kind != "f" and x.dtype not in kernels.HALF_TYPES:  # bfloat16 is kind "V"
            raise MinidlError(f"local_response_norm needs floating-point x, got {x.dtype}")

    def forward_cpu(self, x):
        self._check(x)
        y, s, s_pow = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        alpha, k, minus_beta = (x.dtype.type(v) for v in (self.alpha, self.k, -self.beta))

        # in place where it can: these arrays are the size of the layer's output
        def normalize(images):
            x_part, s_part = x[images], s[images]
            window_sum(x_part * x_part, self.n, out=s_part)
            s_part *= alpha
            s_part += k
            np.power(s_part, minus_beta, out=s_pow[images])
            np.multiply(x_part, s_pow[images], out=y[images])
        in_parallel(normalize, x, blocks=True)
        self.save(x, s, s_pow)  # backward needs s^-beta and s^(-beta-1) = s^-beta / s
        return y

    def forward_gpu(self, x):
        self._check(x)
        # here, so the x saved for backward is copied once at most
        x = self.device.xp.ascontiguousarray(x)
        y, s = kernels.empty(x.shape, x.dtype), kernels.empty(x.shape, x.dtype)
        args = self._kernel_args(x)
        kernels.launch(CU, "lrn_forward", x.dtype, args[0], x, y, s, *args)
        self.save(x, s)
        return y

    def backward_cpu(self, gy):
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

    def backward_gpu(self, gy):
        x, s = self.saved
        gx = kernels.empty(x.shape, x.dtype)
        args = self._kernel_args(x)
        kernels.launch(CU, "lrn_backward", x.dtype, args[0], x, s, gy, gx, *args)
        return gx

    def _kernel_args(self, x):
        """What both kernels take after the arrays: the pixels (one thread each), C, H*W, the
        window's half, and k, alpha, beta as floats (each a T in C, even where k was given as an
        int)."""
        n, c, h, w = x.shape
        return n * h * w, c, h * w, self.n // 2, float(self.k), float(self.alpha), float(self.beta)


def local_response_norm(x: Tensor, n: int = 5, k: float = 2.0, alpha: float = 1e-4,
                        beta: float = 0.75, alpha_over_n: bool = False) -> Tensor:
    """LRN across channels; the paper's constants and convention by default."""
    return LocalResponseNorm(n, k, alpha, beta, alpha_over_n)(x)
