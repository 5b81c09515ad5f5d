"""Operations that move elements without arithmetic: reshape, transpose,
indexing, concat, split, broadcast_to."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from minidl.core import Function, Tensor
from minidl.errors import MinidlError
from minidl.functions.arithmetic import sum_to


class Reshape(Function):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        try:
            return x.reshape(self.shape)
        except ValueError:
            raise MinidlError(f"cannot reshape {x.shape} ({x.size} elements) to "
                              f"{self.shape}") from None

    def backward(self, gy):
        return gy.reshape(self.in_shape)


class Transpose(Function):
    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        return x.transpose(self.axes)

    def backward(self, gy):
        if self.axes is None:
            return gy.transpose()
        # normalize negative axes first: argsort of (-1, 0, 1) is not the inverse permutation
        return gy.transpose(tuple(np.argsort([a % gy.ndim for a in self.axes]).tolist()))


class GetItem(Function):
    def __init__(self, index):
        self.index = index

    def forward(self, x):
        self.in_shape = x.shape
        # NumPy index arrays go to x's device, on its stream
        self.index = _index_on(self.device.xp, self.index)
        return x[self.index]

    def backward(self, gy):
        xp = self.device.xp
        gx = xp.zeros(self.in_shape, dtype=gy.dtype)
        # add.at, not assignment: an index array may name one element twice
        xp.add.at(gx, self.index, gy)
        return gx


class BroadcastTo(Function):
    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, x):
        self.in_shape = x.shape
        return self.device.xp.broadcast_to(x, self.shape).copy()

    def backward(self, gy):
        return sum_to(gy, self.in_shape)


class Concat(Function):
    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        self.sizes = [x.shape[self.axis] for x in xs]
        return self.device.xp.concatenate(xs, axis=self.axis)

    def backward(self, gy):
        return tuple(_split_array(self.device.xp, gy, self.sizes, self.axis))


class Split(Function):
    def __init__(self, sizes, axis):
        self.sizes, self.axis = sizes, axis

    def forward(self, x):
        if sum(self.sizes) != x.shape[self.axis]:
            raise MinidlError(f"split sizes {self.sizes} do not add up to {x.shape[self.axis]}, "
                              f"the size of axis {self.axis} of an input of shape {x.shape}")
        parts = _split_array(self.device.xp, x, self.sizes, self.axis)
        self.part_shapes = [p.shape for p in parts]
        return tuple(parts)

    def backward(self, *gys):
        xp = self.device.xp
        dtype = next(g for g in gys if g is not None).dtype
        # a piece nobody used has no gradient: it contributes zeros
        parts = [xp.zeros(shape, dtype) if g is None else g
                 for g, shape in zip(gys, self.part_shapes)]
        return xp.concatenate(parts, axis=self.axis)


def _index_on(xp, index):
    if isinstance(index, np.ndarray):
        return xp.asarray(index)
    if isinstance(index, tuple):
        return tuple(_index_on(xp, i) for i in index)
    return index


def _split_array(xp, x, sizes, axis):
    """The pieces, each C-contiguous: a piece that already is stays a view (gradients are never written in
    place, so a view is safe; an axis-0 split of a whole array is one), any other is copied."""
    bounds = np.cumsum(sizes)[:-1].tolist()
    return [part if part.flags.c_contiguous else part.copy() for part in xp.split(x, bounds, axis=axis)]


def reshape(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    return Reshape(shape)(x)


def transpose(x: Tensor, axes: tuple[int, ...] | None = None) -> Tensor:
    return Transpose(axes)(x)


def getitem(x: Tensor, index) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data
    return GetItem(index)(x)


def broadcast_to(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    return BroadcastTo(shape)(x)


def flatten(x: Tensor) -> Tensor:
    """(N, ...) -> (N, prod(...))."""
    return reshape(x, (x.shape[0], -1))


def concat(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    return Concat(axis)(*xs)


def split(x: Tensor, sizes_or_count: int | Sequence[int], axis: int = 0) -> list[Tensor]:
    """Split along an axis into pieces of the given sizes, or into `count` equal pieces."""
    n = x.shape[axis]
    if isinstance(sizes_or_count, int):
        if n % sizes_or_count:
            raise MinidlError(f"cannot split axis {axis} of size {n} into {sizes_or_count} equal "
                              "parts")
        sizes = [n // sizes_or_count] * sizes_or_count
    else:
        sizes = list(sizes_or_count)
    return list(Split(sizes, axis)(x)) if len(sizes) > 1 else [x]
