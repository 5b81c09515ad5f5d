"""Matrix products: matmul and the fully connected layer's linear map."""
from __future__ import annotations

from minidl.core import Function, Tensor
from minidl.errors import MinidlError


class MatMul(Function):
    def forward(self, a, b):
        if a.ndim < 1 or b.ndim < 1 or a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise MinidlError(f"matmul of incompatible shapes {a.shape} and {b.shape}")
        if a.ndim != 2 or b.ndim != 2:
            raise MinidlError(f"matmul supports 2-D operands, got {a.shape} and {b.shape}")
        self.save(a, b)
        return a @ b

    def backward(self, gy):
        a, b = self.saved
        return (gy @ b.T if self.needs_grad[0] else None,
                a.T @ gy if self.needs_grad[1] else None)


class Linear(Function):
    """y = x W^T + b, with W of shape (out, in) as in PyTorch and Chainer."""

    def forward(self, x, W, b=None):
        if x.ndim != 2 or W.ndim != 2 or x.shape[1] != W.shape[1]:
            features = W.shape[1] if W.ndim == 2 else "in"
            raise MinidlError(f"linear wants x of shape (batch, {features}) for a weight of shape "
                              f"{W.shape}, got x of shape {x.shape}")
        if b is not None and b.shape != W.shape[:1]:
            raise MinidlError(f"linear: bias of shape {b.shape} for {W.shape[0]} outputs")
        self.save(x, W)
        y = x @ W.T
        if b is not None:
            y += b
        return y

    def backward(self, gy):
        x, W = self.saved
        gx = gy @ W if self.needs_grad[0] else None
        gW = gy.T @ x if self.needs_grad[1] else None
        if len(self.needs_grad) == 2:
            return gx, gW
        return gx, gW, gy.sum(axis=0) if self.needs_grad[2] else None


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return MatMul()(a, b)


def linear(x: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    return Linear()(x, W) if b is None else Linear()(x, W, b)
