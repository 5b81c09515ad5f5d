"""Inverted dropout: zero each element with probability p while training and
scale the survivors by 1/(1-p), so nothing changes at test time (the paper
instead halved the outputs at test time; the expectation is the same).

Masks come from a MaskGenerator: NumPy's generator on the CPU (keep_cpu),
CuPy's on a GPU (uniform_gpu, the uniforms a mask is drawn from), made per
device from one seed. Each Dropout layer
owns one (so two models, or two towers, never share a stream of masks) and the
trainer reseeds it every step from where the run stands, so a resumed run
draws the same masks. The function without a generator uses a default one per
device (`seed(n)`).

On a GPU the mask is applied by one kernel (dropout.cu) straight from the
uniforms, forward and backward, where CuPy would launch four operations to
build and scale a mask and one to apply it; backward keeps the uniforms.
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
        return self._generator(device, np.random.default_rng).random(shape, dtype=np.float32) >= p

    def uniform_gpu(self, device, shape):
        """float32 uniforms in [0, 1) on `device` (the current one); keep where u >= p."""
        def make(entropy):  # CuPy's RandomState takes one integer seed, not a list of entropy
            seed = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1
            return device.xp.random.RandomState(int(seed))
        return self._generator(device, make).random_sample(shape, dtype=np.float32)

    def _generator(self, device, make):
        if device.name not in self._generators:
            # the device's name is part of the seed: one generator never repeats another's masks
            self._generators[device.name] = make(self._entropy + [sum(device.name.encode())])
        return self._generators[device.name]


_default = MaskGenerator(0)


def seed(n):
    """Restart the default generator (the one dropout() uses without a generator) from `n`."""
    _default.seed(n)


class Dropout(Function):
    """The CPU saves the scaled mask, the GPU the uniforms its kernel draws the mask from."""

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
        # the kernel takes T arrays only; float64 (gradient checks) pays one conversion, exact
        u = self.generator.uniform_gpu(self.device, x.shape).astype(x.dtype, copy=False)
        self.save(u)
        return self._apply_gpu(x, u)

    def backward_gpu(self, gy):
        (u,) = self.saved
        return self._apply_gpu(gy.astype(u.dtype, copy=False), u)

    def _apply_gpu(self, x, u):
        y = kernels.empty(x.shape, x.dtype)
        kernels.launch(CU, "dropout_apply", x.dtype, x.size, x, u, y, x.size, float(self.p), 1.0 / (1.0 - self.p))
        return y


def dropout(x, p=0.5, train=True, generator=None):
    """Inverted dropout; the identity when not training or when p is 0."""
    if not 0.0 <= p < 1.0:
        raise MinidlError(f"dropout probability must be in [0, 1), got {p}")
    if not train or p == 0.0:
        return x
    return Dropout(p, generator or _default)(x)
