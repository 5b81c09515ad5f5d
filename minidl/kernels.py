"""The loader and launcher for minidl's CUDA kernels.

Kernels are C++ templates in `.cu` files beside the Python module that launches them,
instantiated for float and double (and, where a KernelFile says so, for the 16-bit floats
__half and __nv_bfloat16), compiled by CuPy's NVRTC once per GPU (all of a file's kernels
at once) and cached; the file's folder is on the include path (window.cuh). Every kernel uses a
64-bit grid-stride loop, so tensors beyond 2^31 elements work. `launch` is the one way a kernel
runs: it packs every argument as its parameter's exact C type. A kernel over many arrays at once
takes tables of pointers (`T* const*`) made by `address_table`.

16-bit kernels: a .cu file that instantiates its templates for __half (NumPy's float16) or
__nv_bfloat16 (ml_dtypes' bfloat16) includes <cuda_fp16.h> / <cuda_bf16.h> (CuPy 14 puts the
CUDA headers on NVRTC's include path) and is declared with `types=HALF_TYPES` (or any tuple of
_CUDA_TYPES' dtypes); a launch with a dtype its KernelFile does not list is a MinidlError. Such
kernels load and store T but compute in float, and their floating-point scalar parameters are
`float`: a Python float argument is packed as float32 for them (`scalar_dtype`), as a T for
float32 and float64 kernels.
"""
from __future__ import annotations

# CuPy compiles RawKernels with -ftz=true: in float32, denormal inputs and results (|x| < 1.2e-38)
# are flushed to zero on the GPU, where NumPy and the emulated GPUs keep them. Results that differ
# only in such values are within every test's tolerance; float64 is not flushed.

import functools
import os
from typing import Iterable, NamedTuple, Sequence

import ml_dtypes
import numpy as np

from minidl.device import cupy
from minidl.errors import MinidlError

_CUDA_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
               np.dtype(np.float16): "__half", np.dtype(ml_dtypes.bfloat16): "__nv_bfloat16"}
# what a KernelFile is compiled for unless it says otherwise; HALF_TYPES adds the 16-bit floats
FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float64))
HALF_TYPES = FLOAT_TYPES + (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
# the C type of a kernel's floating-point scalar parameters, per T: float for the 16-bit types
_SCALAR_TYPES = {np.dtype(np.float16): np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16): np.dtype(np.float32)}
_INDEX_TYPE = np.dtype(np.int32)  # the kernels' index arrays (pooling's argmax) are int*
_PIXEL_TYPE = np.dtype(np.uint8)  # image pixels (to_input's crops) are unsigned char*
_COUNTER_TYPE = np.dtype(np.uint32)  # zeroed_counters: unsigned int*
# address_table's rows: T* const* (device addresses) or unsigned long long*
_TABLE_TYPE = np.dtype(np.uint64)
_THREADS = 256
_MAX_BLOCKS = 65535 * 8  # enough to fill any GPU; the grid-stride loop covers the rest


class KernelFile(NamedTuple):
    """A .cu file and the kernels launched from it (all compiled together, for each of `types`: float
    and double unless it says otherwise)."""
    path: str
    names: tuple
    types: tuple = FLOAT_TYPES  # NumPy dtypes, each a key of _CUDA_TYPES

    @classmethod
    def beside(cls, module_file: str, cu_name: str, names: Iterable[str], types=FLOAT_TYPES) -> KernelFile:
        """The .cu file `cu_name` in the folder of the Python module `module_file`, its kernels compiled
        for the dtypes `types` (HALF_TYPES: also float16 and bfloat16)."""
        types = tuple(dict.fromkeys(np.dtype(t) for t in types))
        for t in types:
            if t not in _CUDA_TYPES:
                raise MinidlError(f"{cu_name}: no CUDA type for {t}; kernels are compiled for "
                                  f"{_type_names(_CUDA_TYPES)}")
        return cls(os.path.join(os.path.dirname(os.path.abspath(module_file)), cu_name),
                   tuple(names), types)

    def name_expressions(self):
        """What RawModule compiles: every kernel for each of its types, `im2col<float>` and so on."""
        return tuple(f"{n}<{_CUDA_TYPES[t]}>" for n in self.names for t in self.types)


def _type_names(dtypes) -> str:
    return ", ".join(str(np.dtype(t)) for t in dtypes)


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
    """The kernel `name<T>` of the KernelFile `cu_file` for the current GPU, T from `dtype`: a
    MinidlError if the file has no such kernel, or is not compiled for `dtype`."""
    if name not in cu_file.names:
        raise MinidlError(f"{os.path.basename(cu_file.path)} has no kernel {name!r} among "
                          f"{cu_file.names}")
    c_type = cuda_type(dtype)
    if np.dtype(dtype) not in cu_file.types:
        raise MinidlError(f"kernel {name} of {os.path.basename(cu_file.path)} is compiled for "
                          f"{_type_names(cu_file.types)}, not {np.dtype(dtype)}")
    return _function(cu_file, cupy().cuda.Device().id, name, c_type)


@functools.lru_cache(maxsize=None)
def _function(cu_file, physical_gpu, name, c_type):
    # kept per (file, GPU, name, type): get_function builds a new kernel object each call, host work
    # that every launch of a step would pay again
    return _module(cu_file, physical_gpu).get_function(f"{name}<{c_type}>")


def cuda_type(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _CUDA_TYPES:
        raise MinidlError(f"the CUDA kernels take {_type_names(_CUDA_TYPES)}, got {dtype}")
    return _CUDA_TYPES[dtype]


def scalar_dtype(dtype) -> np.dtype:
    """The dtype a Python float argument is packed as for a kernel on `dtype`: T itself for float32
    and float64, float32 (the kernels' accumulation type) for float16 and bfloat16."""
    dtype = np.dtype(dtype)
    return _SCALAR_TYPES.get(dtype, dtype)


def empty(shape: tuple[int, ...], dtype):
    """A kernel's output array on the current GPU, C-contiguous as `launch` needs it."""
    return cupy().empty(shape, dtype=dtype)


def launch(cu_file: KernelFile, name: str, dtype, total: int, *args) -> None:
    """Run `name<T>` (T from `dtype`) over `total` work items on the current stream.

    Each argument is packed as its C parameter's exact type: a device array is passed C-contiguous
    and must hold T (or, for a float16 or bfloat16 kernel, float32: its accumulation type, for the parameters
    the .cu declares so), or int32 for an index array, uint8 for pixels, or uint64 for a row of an address_table; a
    Python int is a long long (np.int64); a Python float is a T, or a float for a float16 or bfloat16
    kernel (scalar_dtype). A non-contiguous array is copied,
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
        # a 16-bit kernel may also take float arrays of its accumulation type (loss.cu's log-probabilities)
        if arg.dtype not in (dtype, scalar_dtype(dtype), _INDEX_TYPE, _PIXEL_TYPE, _TABLE_TYPE, _COUNTER_TYPE):
            accumulated = "" if scalar_dtype(dtype) == dtype else f", {scalar_dtype(dtype)}"
            raise MinidlError(f"kernel {what}: an array of {arg.dtype} where {dtype}{accumulated} "
                              "(or int32 indices, uint8 pixels, a uint64 table or uint32 counters) is needed")
        return cp.ascontiguousarray(arg)
    # bool: an int, but never meant as one
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        raise MinidlError(f"kernel {what}: a device array, int or float is needed, got "
                          f"{type(arg).__name__}")
    return np.int64(arg) if isinstance(arg, int) else scalar_dtype(dtype).type(arg)


_counters = {}  # (GPU, stream) -> its zeroed_counters array


def zeroed_counters(count: int):
    """At least `count` uint32 counters, all 0, for a kernel on the current GPU and stream that leaves them 0
    when it ends (each group's last thread resets its own: activation.cu's last_of_group). Allocated zeroed
    once per GPU and stream and grown when a launch needs more, so a launch pays no fill; kernels of one
    stream run in order, so they can share the array."""
    cp = cupy()
    key = (cp.cuda.Device().id, cp.cuda.get_current_stream().ptr)
    counters = _counters.get(key)
    if counters is None or counters.size < count:
        # doubling: a few growths at most while the first step meets its layers
        size = max(count, 2 * counters.size if counters is not None else 0)
        counters = _counters[key] = cp.zeros(size, dtype=_COUNTER_TYPE)
    return counters


def address_table(rows: Sequence[Sequence]):
    """A uint64 array on the current GPU, one row per list in `rows`, in one copy from the host.

    A row of device arrays holds their addresses, for a `T* const*` parameter
    (pass `table[i]`); a row of ints holds the ints, for an `unsigned long long*`.
    The arrays must be C-contiguous (the kernel indexes them flat) and the
    caller keeps them alive until the kernel has run.
    """
    return cupy().asarray(address_rows(rows))


def upload_tables(tables: Sequence[np.ndarray]) -> list:
    """Host tables (address_rows) as device tables on the current GPU, all in one copy: each a view, of its own
    shape, of one flat array (each row contiguous, as a kernel's `T* const*` reads it)."""
    ends = np.cumsum([0] + [t.size for t in tables]).tolist()
    device = cupy().asarray(np.concatenate([t.reshape(-1) for t in tables]) if tables else np.zeros(0, _TABLE_TYPE))
    return [device[start:end].reshape(t.shape) for t, start, end in zip(tables, ends, ends[1:])]


def address_rows(rows: Sequence[Sequence]) -> np.ndarray:
    """address_table's rows on the host (rows shorter than the longest padded with zeros): several kernels'
    tables stacked are uploaded in one copy."""
    cp = cupy()
    host = np.zeros((len(rows), max(map(len, rows), default=0)), dtype=_TABLE_TYPE)
    for i, row in enumerate(rows):
        for j, item in enumerate(row):
            if isinstance(item, cp.ndarray):
                if not item.flags.c_contiguous:
                    raise MinidlError(f"address_table: row {i} item {j} is not C-contiguous")
                item = item.data.ptr
            host[i, j] = item
    return host


def kernel_sources() -> list[str]:
    """Every .cu file of the package (for the compile check)."""
    root = os.path.dirname(__file__)
    return sorted(os.path.join(d, f)
                  for d, _, files in os.walk(root) for f in files if f.endswith(".cu"))
