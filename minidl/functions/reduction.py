"""Reductions: sum, mean and max over axes."""
from __future__ import annotations

import builtins

from minidl.core import Function, Tensor


def _normalize_axes(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _expand(grad, axes, keepdims):
    """Put back the reduced axes (as size 1) so the gradient broadcasts to the input."""
    if keepdims:
        return grad
    for a in axes:
        grad = grad.reshape(grad.shape[:a] + (1,) + grad.shape[a:])
    return grad


class Sum(Function):
    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.shape = x.shape
        self.axes = _normalize_axes(self.axis, x.ndim)
        return x.sum(axis=self.axes, keepdims=self.keepdims)

    def backward(self, gy):
        return self.device.xp.broadcast_to(_expand(gy, self.axes, self.keepdims), self.shape).copy()


class Mean(Sum):
    def forward(self, x):
        y = super().forward(x)
        # builtins.max: this module's own `max` is the differentiable one
        self.count = x.size // builtins.max(y.size, 1)
        return y / x.dtype.type(self.count)

    def backward(self, gy):
        return super().backward(gy / gy.dtype.type(self.count))


class Max(Function):
    """Max over axes; the gradient goes to every element equal to the max, split evenly."""

    def __init__(self, axis, keepdims):
        self.axis, self.keepdims = axis, keepdims

    def forward(self, x):
        self.axes = _normalize_axes(self.axis, x.ndim)
        y = x.max(axis=self.axes, keepdims=True)
        self.save(x, y)
        if self.keepdims:
            return y
        return y.reshape([n for i, n in enumerate(y.shape) if i not in self.axes])

    def backward(self, gy):
        x, y = self.saved
        mask = (x == y).astype(gy.dtype)
        mask /= mask.sum(axis=self.axes, keepdims=True)
        return mask * _expand(gy, self.axes, self.keepdims)


def sum(x: Tensor, axis: int | tuple[int, ...] | None = None,
        keepdims: bool = False) -> Tensor:
    return Sum(axis, keepdims)(x)


def mean(x: Tensor, axis: int | tuple[int, ...] | None = None,
         keepdims: bool = False) -> Tensor:
    return Mean(axis, keepdims)(x)


def max(x: Tensor, axis: int | tuple[int, ...] | None = None,
        keepdims: bool = False) -> Tensor:
    return Max(axis, keepdims)(x)
