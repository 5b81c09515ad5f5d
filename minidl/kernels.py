"""The loader and launcher for minidl's CUDA kernels.

Kernels are C++ templates in `.cu` files beside the Python module that launches them,
instantiated for float and double, compiled by CuPy's NVRTC once per GPU (all of a file's kernels
at once) and cached; the file's folder is on the include path (window.cuh). Every kernel uses a
64-bit grid-stride loop, so tensors beyond 2^31 elements work. `launch` is the one way a kernel
runs: it packs every argument as its parameter's exact C type. A kernel over many arrays at once
takes tables of pointers (`T* const*`) made by `address_table`.
"""
from __future__ import annotations

# CuPy compiles RawKernels with -ftz=true: in float32, denormal inputs and results (|x| < 1.2e-38)
# are flushed to zero on the GPU, where NumPy and the emulated GPUs keep them. Results that differ
# only in such values are within every test's tolerance; float64 is not flushed.

import functools
import os
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from minidl.device import cupy
from minidl.errors import MinidlError

_CUDA_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_INDEX_TYPE = np.dtype(np.int32)  # the kernels' index arrays (pooling's argmax) are int*
_PIXEL_TYPE = np.dtype(np.uint8)  # image pixels (to_input's crops) are unsigned char*
# address_table's rows: T* const* (device addresses) or unsigned long long*
_TABLE_TYPE = np.dtype(np.uint64)
_THREADS = 256
_MAX_BLOCKS = 65535 * 8  # enough to fill any GPU; the grid-stride loop covers the rest


class KernelFile(NamedTuple):
    """A .cu file and the kernels launched from it (all compiled together, for float and double)."""
    path: str
    names: tuple

    @classmethod
    def beside(cls, module_file: str, cu_name: str, names: Iterable[str]) -> KernelFile:
        """The .cu file `cu_name` in the folder of the Python module `module_file`."""
        return cls(os.path.join(os.path.dirname(os.path.abspath(module_file)), cu_name),
                   tuple(names))

    def name_expressions(self):
        """What RawModule compiles: every kernel for every type, `im2col<float>` and so on."""
        return tuple(f"{n}<{t}>" for n in self.names for t in _CUDA_TYPES.values())


def compile_options(cu_path: str) -> tuple[str, ...]:
    """RawModule's options for a .cu file: C++14, and the file's folder on the include path."""
    return ("--std=c++14",) + include_options(cu_path)


def include_options(cu_path: str) -> tuple[str, ...]:
    """-I the .cu file's folder: NVRTC has no "folder of the including file", so a shared header
    needs it."""
    return (f"-I{os.path.dirname(os.path.abspath(cu_path))}",)


@functools.lru_cache(maxsize=None)
def _module(cu_file, physical_gpu):
    cp = cupy()
    with open(cu_file.path) as f:
        source = f.read()
    with cp.cuda.Device(physical_gpu):
        return cp.RawModule(code=source, options=compile_options(cu_file.path),
                            name_expressions=cu_file.name_expressions())


def get_kernel(cu_file: KernelFile, name: str, dtype):
    """The kernel `name<T>` of the KernelFile `cu_file` for the current GPU, T from `dtype`."""
    if name not in cu_file.names:
        raise MinidlError(f"{os.path.basename(cu_file.path)} has no kernel {name!r} among "
                          f"{cu_file.names}")
    return _function(cu_file, cupy().cuda.Device().id, name, cuda_type(dtype))


@functools.lru_cache(maxsize=None)
def _function(cu_file, physical_gpu, name, c_type):
    # kept per (file, GPU, name, type): get_function builds a new kernel object each call, host work
    # that every launch of a step would pay again
    return _module(cu_file, physical_gpu).get_function(f"{name}<{c_type}>")


def cuda_type(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _CUDA_TYPES:
        raise MinidlError(f"the CUDA kernels take float32 or float64, got {dtype}")
    return _CUDA_TYPES[dtype]


def empty(shape: tuple[int, ...], dtype):
    """A kernel's output array on the current GPU, C-contiguous as `launch` needs it."""
    return cupy().empty(shape, dtype=dtype)


def launch(cu_file: KernelFile, name: str, dtype, total: int, *args) -> None:
    """Run `name<T>` (T from `dtype`) over `total` work items on the current stream.

    Each argument is packed as its C parameter's exact type: a device array is passed C-contiguous
    and must hold T, or int32 for an index array, uint8 for pixels, or uint64 for a row of an address_table; a
    Python int is a long long (np.int64); a Python float is a T. A non-contiguous array is copied,
    so an output must come from `empty`, or the kernel would write into the copy.
    """
    dtype = np.dtype(dtype)
    kernel = get_kernel(cu_file, name, dtype)
    packed = tuple(_pack(arg, dtype, f"{name} argument {i}") for i, arg in enumerate(args))
    blocks = max(1, min((total + _THREADS - 1) // _THREADS, _MAX_BLOCKS))
    kernel((blocks,), (_THREADS,), packed)


def _pack(arg, dtype, what):
    cp = cupy()
    if isinstance(arg, cp.ndarray):
        if arg.dtype not in (dtype, _INDEX_TYPE, _PIXEL_TYPE, _TABLE_TYPE):
            raise MinidlError(f"kernel {what}: an array of {arg.dtype} where {dtype} "
                              "(or int32 indices, uint8 pixels, or a uint64 table) is needed")
        return cp.ascontiguousarray(arg)
    # bool: an int, but never meant as one
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        raise MinidlError(f"kernel {what}: a device array, int or float is needed, got "
                          f"{type(arg).__name__}")
    return np.int64(arg) if isinstance(arg, int) else dtype.type(arg)


def address_table(rows: Sequence[Sequence]):
    """A uint64 array on the current GPU, one row per list in `rows`, in one copy from the host.

    A row of device arrays holds their addresses, for a `T* const*` parameter
    (pass `table[i]`); a row of ints holds the ints, for an `unsigned long long*`.
    The arrays must be C-contiguous (the kernel indexes them flat) and the
    caller keeps them alive until the kernel has run.
    """
    cp = cupy()
    host = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=_TABLE_TYPE)
    for i, row in enumerate(rows):
        for j, item in enumerate(row):
            if isinstance(item, cp.ndarray):
                if not item.flags.c_contiguous:
                    raise MinidlError(f"address_table: row {i} item {j} is not C-contiguous")
                item = item.data.ptr
            host[i, j] = item
    return cp.asarray(host)


def kernel_sources() -> list[str]:
    """Every .cu file of the package (for the compile check)."""
    root = os.path.dirname(__file__)
    return sorted(os.path.join(d, f)
                  for d, _, files in os.walk(root) for f in files if f.endswith(".cu"))
