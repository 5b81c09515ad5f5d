"""The framework's GEMMs: NumPy's on the CPU; on a GPU, 2-D cuBLAS GEMMs at minidl.precision's precision.

On a GPU every product is a 2-D cupy.matmul of views, which CuPy runs as one cuBLAS gemmEx with
transposed operands passed as flags, not copied, and with the compute type that
cupy._core.set_compute_type chose (set here before each GEMM): TF32 tensor cores for float32
under the "tf32" precision, exact FP32 under "fp32".
"""
from __future__ import annotations

import numpy as np

from minidl import kernels
from minidl.core import Array
from minidl.device import cupy
from minidl.errors import MinidlError
from minidl.precision import precision

# CuPy's compute type per precision (cupy/_core/_routines_linalg.pxd, COMPUTE_TYPE_*): DEFAULT is
# CUBLAS_COMPUTE_32F for float32, TF32 is CUBLAS_COMPUTE_32F_FAST_TF32 (tensordot_core_v11)
# (under fp16 and bf16 a float32 GEMM, if any is left, takes TF32; 16-bit ones always sum in float32)
_COMPUTE_TYPE_NAMES = dict(tf32="COMPUTE_TYPE_TF32", fp32="COMPUTE_TYPE_DEFAULT", fp16="COMPUTE_TYPE_TF32",
                           bf16="COMPUTE_TYPE_TF32")


def _cupy_matmul(a, b, out=None):
    """cupy.matmul of 2-D a and b under the precision's compute type.

    2-D cupy.matmul is cupy.dot: tensordot_core hands an F-contiguous operand (a transpose) to
    cuBLAS as a transpose flag, copying only one that is neither C- nor F-contiguous
    (_mat_to_cublas_contiguous), and tensordot_core_v11 calls gemmEx with get_compute_type(dtype)
    (cupy/_core/_routines_linalg.pyx, CuPy v14). Batched matmul (ndim > 2) would copy both operands
    and ignore the compute type, so it is never called here.
    """
    cp = cupy()
    if a.dtype == np.float32:
        wanted = getattr(cp._core._routines_linalg, _COMPUTE_TYPE_NAMES[precision()])
        if cp._core.get_compute_type(cp.float32) != wanted:
            cp._core.set_compute_type(cp.float32, wanted)
    return cp.matmul(a, b, out=out)


def matmul(a: Array, b: Array) -> Array:
    """a @ b for 2-D arrays on one device: NumPy's on the CPU; on a GPU one cuBLAS GEMM (above)."""
    if a.ndim != 2 or b.ndim != 2:
        raise MinidlError(f"gemm.matmul takes 2-D arrays, got shapes {a.shape} and {b.shape}")
    return a @ b if isinstance(a, np.ndarray) else _cupy_matmul(a, b)


def grouped_matmul(a: Array, b: Array) -> Array:
    """a @ b for (G, m, k) and (G, k, n) arrays, a C-contiguous (G, m, n) result.

    The CPU computes NumPy's a @ b. A GPU runs G 2-D GEMMs of the views a[g] and b[g] (each C- or
    F-contiguous, so never copied) into the result's rows: G is 1 or 2 here, too few to batch.
    """
    if isinstance(a, np.ndarray):
        return a @ b
    groups, m, n = a.shape[0], a.shape[1], b.shape[2]
    out = kernels.empty((groups, m, n), np.result_type(a.dtype, b.dtype))
    for g in range(groups):
        _cupy_matmul(a[g], b[g], out=out[g])
    return out
