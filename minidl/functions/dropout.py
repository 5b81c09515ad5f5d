"""Inverted dropout: zero each element with probability p while training and
scale the survivors by 1/(1-p), so nothing changes at test time (the paper
instead halved the outputs at test time; the expectation is the same).

The masks come from one generator per device (NumPy's on the CPU, CuPy's on a
GPU), all derived from `seed(n)`: the trainer reseeds every step from where the
run stands, so a resumed run draws the same masks.
"""
import numpy as np

from minidl.core import Function
from minidl.errors import MinidlError

_seed = 0
_generators = {}  # device name -> generator, made on first use after seed()


def seed(n):
    """Restart every device's dropout generator from `n`."""
    global _seed
    _seed = int(n)
    _generators.clear()


def generator(device):
    if device.name not in _generators:
        # the device's name is part of the seed: two towers draw different masks
        stream = [_seed, sum(device.name.encode())]
        if device.is_cuda:
            seed_value = int(np.random.SeedSequence(stream).generate_state(1, np.uint64)[0] >> 1)
            _generators[device.name] = device.xp.random.RandomState(seed_value)
        else:
            _generators[device.name] = np.random.default_rng(stream)
    return _generators[device.name]


class Dropout(Function):
    def __init__(self, p):
        self.p = p

    def forward(self, x):
        rng = generator(self.device)
        if self.device.is_cuda:
            keep = rng.random_sample(x.shape, dtype=np.float32) >= self.p
        else:
            keep = rng.random(x.shape, dtype=np.float32) >= self.p
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        self.save(mask)
        return x * mask

    def backward(self, gy):
        (mask,) = self.saved
        return gy * mask


def dropout(x, p=0.5, train=True):
    """Inverted dropout; the identity when not training or when p is 0."""
    if not 0.0 <= p < 1.0:
        raise MinidlError(f"dropout probability must be in [0, 1), got {p}")
    if not train or p == 0.0:
        return x
    return Dropout(p)(x)
