"""Inverted dropout: zero each element with probability p while training and scale the survivors
by 1/(1-p), so nothing changes at test time.

An element's mask is a pure function of (key, global row, position in the row): a splitmix64
hash of the key and the element's index in the *global* batch, the same in NumPy (`uniforms`)
and in dropout.cu. So one process and N data-parallel ranks (each passing its first row) draw
the same masks, and so do the CPU and a GPU. Keys come from a MaskGenerator (one per Dropout
layer; the n-th call on a device since its last seed gets the n-th key); the function without a
generator uses a default one (`seed(n)`).
"""
from __future__ import annotations

from typing import Sequence

import math

import numpy as np

from minidl import kernels
from minidl.core import Function, Tensor
from minidl.device import Device
from minidl.errors import MinidlError

CU = kernels.KernelFile.beside(__file__, "dropout.cu", ("dropout_apply",), types=kernels.HALF_TYPES)

# splitmix64 (dropout.cu has the same constants): the increment, the golden ratio, and the two
# mixing multipliers
GAMMA, MIX1, MIX2 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                     np.uint64(0x94D049BB133111EB))


def uniforms(key, start, count):
    """Float32 uniforms in [0, 1) of the elements start, ..., start + count - 1 under `key`, as
    dropout.cu makes them: splitmix64's output at key + (i + 1) * GAMMA (uint64 arithmetic wraps),
    its top 24 bits."""
    z = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z *= GAMMA
    z += np.uint64(key)
    z ^= z >> np.uint64(30)
    z *= MIX1
    z ^= z >> np.uint64(27)
    z *= MIX2
    z ^= z >> np.uint64(31)
    z >>= np.uint64(40)
    return z.astype(np.float32) * np.float32(2.0 ** -24)


def scaled_mask(key, start, shape, p, dtype):
    """The mask of the elements start, ... under `key`: 1/(1-p) where kept, 0 where dropped, in `dtype`."""
    dtype = np.dtype(dtype)
    keep = uniforms(key, start, math.prod(shape)).reshape(shape) >= np.float32(p)
    return keep.astype(dtype) * dtype.type(1.0 / (1.0 - p))


# The paper halved the outputs at test time instead; the expectation is the same. The trainer
# reseeds each layer's generator every step from where the run stands, so a resumed run draws
# the same masks, and two models or two towers never share masks.
class MaskGenerator:
    """The keys of the masks, from `seed` (an int or a list of ints); `first_row` is the global row
    of row 0."""

    def __init__(self, seed=0, first_row=0):
        self.seed(seed, first_row)

    def seed(self, seed: int | Sequence[int], first_row: int = 0) -> None:
        self._entropy = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
        self.first_row = int(first_row)
        # device name -> calls since the seed: towers running side by side count apart
        self._calls = {}

    def key(self, device: Device) -> int:
        """The key of the next call on `device`: 63 bits (the kernel takes it as a long long) of the
        seed and the call's number. The device's name is not in it, so the CPU and a GPU draw the
        same masks."""
        n = self._calls.get(device.name, 0)
        self._calls[device.name] = n + 1
        state = np.random.SeedSequence(self._entropy + [n]).generate_state(1, np.uint64)[0]
        return int(state >> np.uint64(1))

    def draw(self, device: Device, shape: Sequence[int]) -> tuple[int, int]:
        """(key, start) of the next call on `device` for an array of `shape`: start is the global
        index of its first element."""
        return self.key(device), self.first_row * math.prod(shape[1:])


_default = MaskGenerator(0)


def default_generator() -> MaskGenerator:
    """The generator dropout() and linear(dropout=p) use when given none."""
    return _default


def seed(n: int | Sequence[int], first_row: int = 0) -> None:
    """Restart the default generator (the one dropout() uses without a generator) from `n`."""
    _default.seed(n, first_row)


class Dropout(Function):
    """The CPU saves the scaled mask; the GPU keeps only the key and first element its kernel makes
    it from."""

    def __init__(self, p, generator):
        self.p, self.generator = p, generator

    def _draw(self, x):
        self.key, self.start = self.generator.draw(self.device, x.shape)

    def forward_cpu(self, x):
        self._draw(x)
        mask = scaled_mask(self.key, self.start, x.shape, self.p, x.dtype)
        self.save(mask)
        return x * mask

    def backward_cpu(self, gy):
        (mask,) = self.saved
        return gy * mask

    def forward_gpu(self, x):
        self._draw(x)
        return self._apply_gpu(x)

    def backward_gpu(self, gy):
        return self._apply_gpu(gy)

    def _apply_gpu(self, x):
        """x times the mask of this call's key."""
        y = kernels.empty(x.shape, x.dtype)
        kernels.launch(CU, "dropout_apply", x.dtype, x.size, x, y, x.size, self.key, self.start,
                       float(self.p), 1.0 / (1.0 - self.p))
        return y


def dropout(x: Tensor, p: float = 0.5, train: bool = True,
            generator: MaskGenerator | None = None) -> Tensor:
    """Inverted dropout; the identity when not training or when p is 0."""
    if not 0.0 <= p < 1.0:
        raise MinidlError(f"dropout probability must be in [0, 1), got {p}")
    if not train or p == 0.0:
        return x
    return Dropout(p, generator or _default)(x)
