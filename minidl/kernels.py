"""The tiny loader for minidl's CUDA kernels.

Kernels are C++ templates in `.cu` files beside the Python module that launches
them, with explicit instantiations for float and double (so `nvcc` compiles
every one of them in CI, and float64 gradient checks can run on the GPU). Each
file is compiled by CuPy's NVRTC once per GPU, all its kernels for both types
at once (the name expressions), and cached. Every kernel uses a 64-bit
grid-stride loop, so the launch size is capped and tensors beyond 2^31
elements still work.

CuPy compiles RawKernels with -ftz=true: in float32, denormal inputs and
results (|x| < 1.2e-38) are flushed to zero on the GPU, where NumPy and the
emulated GPUs keep them. Results that differ only in such tiny values are
within every test's tolerance; float64 is not flushed.
"""
import functools
import os

import numpy as np

from minidl.errors import MinidlError

_CUDA_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_THREADS = 256
_MAX_BLOCKS = 65535 * 8  # enough to fill any GPU; the grid-stride loop covers the rest


@functools.lru_cache(maxsize=None)
def _module(cu_path, physical_gpu, name_expressions):
    from minidl.device import cupy
    cp = cupy()
    with open(cu_path) as f:
        source = f.read()
    with cp.cuda.Device(physical_gpu):
        return cp.RawModule(code=source, options=("--std=c++14",), name_expressions=name_expressions)


def get_kernel(cu_path, name, dtype, all_names):
    """The kernel `name<T>` from `cu_path` for the current GPU, T from `dtype`."""
    from minidl.device import cupy
    type_name = cuda_type(dtype)
    expressions = tuple(f"{n}<{t}>" for n in all_names for t in _CUDA_TYPES.values())
    gpu = cupy().cuda.Device().id
    return _module(os.path.abspath(cu_path), gpu, expressions).get_function(f"{name}<{type_name}>")


def cuda_type(dtype):
    dtype = np.dtype(dtype)
    if dtype not in _CUDA_TYPES:
        raise MinidlError(f"the CUDA kernels take float32 or float64, got {dtype}")
    return _CUDA_TYPES[dtype]


def launch(kernel, total, args):
    """Run `kernel` over `total` work items on the current stream (CuPy launches there)."""
    blocks = max(1, min((total + _THREADS - 1) // _THREADS, _MAX_BLOCKS))
    kernel((blocks,), (_THREADS,), args)


def prepare(array, dtype):
    """A C-contiguous array of `dtype` for a kernel argument: never a float64 into a float*."""
    if array.dtype != dtype:
        raise MinidlError(f"kernel argument of dtype {array.dtype} where {np.dtype(dtype)} is needed")
    from minidl.device import cupy
    return cupy().ascontiguousarray(array)


def kernel_sources():
    """Every .cu file of the package (for the compile check)."""
    root = os.path.dirname(__file__)
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f.endswith(".cu"))
