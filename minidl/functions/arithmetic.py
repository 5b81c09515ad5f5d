"""Elementwise arithmetic: add, sub, mul, div, neg, pow, exp, log.

Binary operations broadcast like NumPy; their backward sums each gradient back
to its input's shape (`sum_to`), so a bias of shape (1, C) gets a (1, C) gradient.
"""
from __future__ import annotations

import numpy as np

from minidl.core import Function, Tensor
from minidl.errors import MinidlError


def sum_to(grad, shape: tuple[int, ...]):
    """Sum a broadcast gradient back down to `shape`."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(i + lead for i, n in enumerate(shape)
                                      if n == 1 and grad.shape[i + lead] != 1)
    grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(gy, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, gy):
        return sum_to(gy, self.shapes[0]), sum_to(-gy, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.save(a, b)
        return a * b

    def backward(self, gy):
        a, b = self.saved
        return (sum_to(gy * b, a.shape) if self.needs_grad[0] else None,
                sum_to(gy * a, b.shape) if self.needs_grad[1] else None)


class Div(Function):
    def forward(self, a, b):
        self.save(a, b)
        return a / b

    def backward(self, gy):
        a, b = self.saved
        ga = gy / b
        return (sum_to(ga, a.shape) if self.needs_grad[0] else None,
                sum_to(-ga * a / b, b.shape) if self.needs_grad[1] else None)


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, gy):
        return -gy


class Pow(Function):
    def __init__(self, exponent):
        if isinstance(exponent, Tensor):
            raise MinidlError("pow takes a constant exponent; for a tensor y, "
                              "x ** y is exp(y * log(x))")
        self.exponent = exponent

    def forward(self, a):
        if isinstance(self.exponent, np.ndarray):  # an array of exponents goes where a is
            self.exponent = self.device.xp.asarray(self.exponent)
        self.save(a)
        return a ** self.exponent

    def backward(self, gy):
        (a,) = self.saved
        # a ** -1 is infinite at a = 0, and 0 * inf NaN
        if np.ndim(self.exponent) == 0 and self.exponent == 0:
            return self.device.xp.zeros_like(gy)
        return gy * self.exponent * a ** (self.exponent - 1)


class Exp(Function):
    def forward(self, a):
        y = self.device.xp.exp(a)
        self.save(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * y


class Log(Function):
    def forward(self, a):
        self.save(a)
        return self.device.xp.log(a)

    def backward(self, gy):
        (a,) = self.saved
        return gy / a


def add(a: Tensor | float, b: Tensor | float) -> Tensor:
    return Add()(a, b)


def sub(a: Tensor | float, b: Tensor | float) -> Tensor:
    return Sub()(a, b)


def mul(a: Tensor | float, b: Tensor | float) -> Tensor:
    return Mul()(a, b)


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    return Div()(a, b)


def neg(a: Tensor) -> Tensor:
    return Neg()(a)


def pow(a: Tensor, exponent: float) -> Tensor:
    """a ** exponent for a constant exponent."""
    return Pow(exponent)(a)


def exp(a: Tensor) -> Tensor:
    return Exp()(a)


def log(a: Tensor) -> Tensor:
    return Log()(a)
