"""Inverted dropout: zero each element with probability p while training and
scale the survivors by 1/(1-p), so nothing changes at test time (the paper
instead halved the outputs at test time; the expectation is the same).

Masks come from a MaskGenerator, per device from one seed: on the CPU NumPy's
generator draws float32 uniforms (keep_cpu); on a GPU it draws one 63-bit key
per call (key_gpu) and the kernel (dropout.cu) hashes the key and each
element's index into that element's uniform, so the mask is applied in one
launch each way and never stored. Each Dropout layer owns a generator (so two
models, or two towers, never share a stream of masks) and the trainer reseeds
it every step from where the run stands, so a resumed run draws the same
masks. The function without a generator uses a default one per device
(`seed(n)`).
"""
import numpy as np

from minidl import kernels
from minidl.core import Function
from minidl.errors import MinidlError

CU = kernels.KernelFile.beside(__file__, "dropout.cu", ("dropout_apply",))


class MaskGenerator:
    """Keep-masks drawn from `seed` (an int or a list of ints), one generator per device."""

    def __init__(self, seed=0):
        self.seed(seed)

    def seed(self, seed):
        self._entropy = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
        self._generators = {}

    def keep_cpu(self, device, shape, p):
        """A NumPy boolean array: True with probability 1 - p."""
        return self._generator(device).random(shape, dtype=np.float32) >= p

    def key_gpu(self, device):
        """The key of the GPU kernel's uniforms for one call on `device` (a host draw: no device work)."""
        return int(self._generator(device).integers(0, 2 ** 63))

    def _generator(self, device):
        """NumPy's generator of `device`: the device's name is part of its seed, so it never repeats another's."""
        if device.name not in self._generators:
            self._generators[device.name] = np.random.default_rng(self._entropy + [sum(device.name.encode())])
        return self._generators[device.name]


_default = MaskGenerator(0)


def seed(n):
    """Restart the default generator (the one dropout() uses without a generator) from `n`."""
    _default.seed(n)


class Dropout(Function):
    """The CPU saves the scaled mask; the GPU keeps only the key its kernel makes the mask from."""

    def __init__(self, p, generator):
        self.p, self.generator = p, generator

    def forward_cpu(self, x):
        keep = self.generator.keep_cpu(self.device, x.shape, self.p)
        mask = keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p))
        self.save(mask)
        return x * mask

    def backward_cpu(self, gy):
        (mask,) = self.saved
        return gy * mask

    def forward_gpu(self, x):
        self.key = self.generator.key_gpu(self.device)
        return self._apply_gpu(x)

    def backward_gpu(self, gy):
        return self._apply_gpu(gy)

    def _apply_gpu(self, x):
        """x times the mask of this call's key."""
        y = kernels.empty(x.shape, x.dtype)
        kernels.launch(CU, "dropout_apply", x.dtype, x.size, x, y, x.size, self.key, float(self.p),
                       1.0 / (1.0 - self.p))
        return y


def dropout(x, p=0.5, train=True, generator=None):
    """Inverted dropout; the identity when not training or when p is 0."""
    if not 0.0 <= p < 1.0:
        raise MinidlError(f"dropout probability must be in [0, 1), got {p}")
    if not train or p == 0.0:
        return x
    return Dropout(p, generator or _default)(x)
