"""Matrix products: matmul and the fully connected layer's linear map (GEMMs: gemm.py)."""
from __future__ import annotations

import numpy as np

from minidl.core import Function, Tensor
from minidl.errors import MinidlError
from minidl.functions import activation as activations
from minidl.functions.dropout import MaskGenerator, default_generator
from minidl.functions.gemm import matmul as gemm


class MatMul(Function):
    def forward(self, a, b):
        if a.ndim < 1 or b.ndim < 1 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise MinidlError(f"matmul of incompatible shapes {a.shape} and {b.shape}")
        if a.ndim != 2 or b.ndim != 2:
            raise MinidlError(f"matmul supports 2-D operands, got {a.shape} and {b.shape}")
        self.save(a, b)
        return gemm(a, b)

    def backward(self, gy):
        a, b = self.saved
        return (gemm(gy, b.T) if self.needs_grad[0] else None,
                gemm(a.T, gy) if self.needs_grad[1] else None)


class Linear(Function):
    """y = x W^T + b, with W of shape (out, in) as in PyTorch and Chainer; activation "relu": relu(y),
    the bias and the ReLU in one pass; dropout (p, generator) with it: then inverted dropout in that pass
    (AlexNet's fc6 and fc7: one kernel each way where three layers take three)."""

    def __init__(self, activation: str | None = None, dropout: tuple[float, MaskGenerator] | None = None):
        self.activation = activations.check_activation(activation)
        self.dropout = dropout

    def forward(self, x, W, b=None):
        if x.ndim != 2 or W.ndim != 2 or x.shape[1] != W.shape[1]:
            features = W.shape[1] if W.ndim == 2 else "in"
            raise MinidlError(f"linear wants x of shape (batch, {features}) for a weight of shape "
                              f"{W.shape}, got x of shape {x.shape}")
        if b is not None and b.shape != W.shape[:1]:
            raise MinidlError(f"linear: bias of shape {b.shape} for {W.shape[0]} outputs")
        if self.dropout and not (self.activation and b is not None):
            raise MinidlError("linear: dropout in the same pass needs a bias and activation='relu'")
        y = gemm(x, W.T)
        if self.activation and b is not None:
            p, generator = self.dropout or (None, None)
            y = activations.bias_relu_rows(y, b, (p, *generator.draw(self.device, y.shape)) if p else None)
        else:
            if b is not None:
                y += b
            if self.activation:
                y = activations.relu_array(y)
        self.save(x, W, y if self.activation else None)
        return y

    def backward(self, gy):
        x, W, y = self.saved
        needs_bias = len(self.needs_grad) == 3 and self.needs_grad[2]
        gb = None
        if self.activation:  # the mask (dropout's scale with it) and the bias's sum in one pass
            scale = 1.0 / (1.0 - self.dropout[0]) if self.dropout else 1.0
            gy, gb = activations.relu_grad_rows(y, gy, scale, bias=needs_bias)
        gx = gemm(gy, W) if self.needs_grad[0] else None
        gW = gemm(gy.T, x) if self.needs_grad[1] else None
        if len(self.needs_grad) == 2:
            return gx, gW
        if needs_bias and gb is None:
            # the bias's sum in float32 at least (of 16-bit gradients, a sum over the batch would lose too much)
            gb = gy.sum(axis=0, dtype=np.promote_types(gy.dtype, np.float32))
        return gx, gW, gb


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return MatMul()(a, b)


def linear(x: Tensor, W: Tensor, b: Tensor | None = None, activation: str | None = None,
           dropout: float = 0.0, generator: MaskGenerator | None = None) -> Tensor:
    """x W^T + b for x (batch, in) and W (out, in); activation "relu" applies ReLU in the same pass, and
    dropout p > 0 (with a bias and ReLU) then inverted dropout, its masks from `generator` as
    functions.dropout draws them."""
    if not 0.0 <= dropout < 1.0:
        raise MinidlError(f"dropout probability must be in [0, 1), got {dropout}")
    f = Linear(activation, (dropout, generator or default_generator()) if dropout else None)
    return f(x, W) if b is None else f(x, W, b)
