"""The `cupy` namespace on emulated GPUs: what `minidl.device.cupy()` returns.

Arrays and their functions (xp), raw kernels (raw) and the runtime (cuda, with
cuda.nccl as a submodule, as in CuPy), gathered into one module.
"""
import sys

from minidl_emulator import cuda
from minidl_emulator.raw import RawKernel, RawModule
from minidl_emulator.xp import *  # noqa: F401,F403 -- the array API, as cupy's top level offers it
from minidl_emulator.xp import _core, ndarray  # noqa: F401 -- cupy._core: the compute types


def get_array_module(*args):
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np  # noqa: F405
