"""The framework's GEMMs: NumPy's on the CPU; on a GPU, cuBLAS GEMMs at minidl.precision's precision.

On a GPU a 2-D product is a cupy.matmul of views, which CuPy runs as one cuBLAS gemmEx with
transposed operands passed as flags, not copied, and with the compute type that
cupy._core.set_compute_type chose (set here before each GEMM): TF32 tensor cores for float32
under the "tf32" precision, exact FP32 under "fp32". A batch of products (batched_matmul) is one
cuBLAS gemmStridedBatchedEx per uniformly strided batch, called here directly with the same compute
type, since CuPy's own batched matmul would copy both operands and compute in plain FP32.
"""
from __future__ import annotations

import itertools

import ml_dtypes
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


def _cupy_matmul(a, b, out=None, at_precision=None):
    """cupy.matmul of 2-D a and b under the precision's compute type (at_precision's where given).

    2-D cupy.matmul is cupy.dot: tensordot_core hands an F-contiguous operand (a transpose) to
    cuBLAS as a transpose flag, copying only one that is neither C- nor F-contiguous
    (_mat_to_cublas_contiguous), and tensordot_core_v11 calls gemmEx with get_compute_type(dtype)
    (cupy/_core/_routines_linalg.pyx, CuPy v14). Batched matmul (ndim > 2) would copy both operands
    and ignore the compute type, so it is never called here (batched_matmul calls cuBLAS itself).
    """
    cp = cupy()
    if a.dtype == np.float32:
        wanted = getattr(cp._core._routines_linalg, _COMPUTE_TYPE_NAMES[_chosen(at_precision)])
        if cp._core.get_compute_type(cp.float32) != wanted:
            cp._core.set_compute_type(cp.float32, wanted)
    return cp.matmul(a, b, out=out)


def _chosen(at_precision):
    """The precision a GEMM computes at: at_precision where given (one of PRECISIONS), else minidl.precision's."""
    if at_precision is None:
        return precision()
    if at_precision not in _COMPUTE_TYPE_NAMES:
        raise MinidlError(f"at_precision must be None or one of {', '.join(_COMPUTE_TYPE_NAMES)}; got {at_precision!r}")
    return at_precision


def matmul(a: Array, b: Array, at_precision: str | None = None) -> Array:
    """a @ b for 2-D arrays on one device: NumPy's on the CPU; on a GPU one cuBLAS GEMM (above), at minidl.precision's
    precision or at_precision's (Winograd's float32 tiles of 16-bit maps take "fp32")."""
    if a.ndim != 2 or b.ndim != 2:
        raise MinidlError(f"gemm.matmul takes 2-D arrays, got shapes {a.shape} and {b.shape}")
    return a @ b if isinstance(a, np.ndarray) else _cupy_matmul(a, b, at_precision=at_precision)


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


def batched_matmul(a: Array, b: Array, out: Array | None = None, at_precision: str | None = None) -> Array:
    """a @ b for (..., m, k) and (..., k, n) arrays of the same leading shape: NumPy's np.matmul on the CPU;
    on a GPU cuBLAS GEMMs at the precision's compute type, or at_precision's (_cublas_batched), into `out` where
    given (not overlapping a or b) or a new C-contiguous array."""
    if isinstance(a, np.ndarray):
        return np.matmul(a, b, out=out)
    return _cublas_batched(a, b, out, _chosen(at_precision))


# The cuBLAS codes of the dtypes minidl multiplies (cupy/_core/_dtype.pyx: to_cuda_dtype)
_CUDA_TYPE_NAMES = {np.dtype(np.float32): "CUDA_R_32F", np.dtype(np.float64): "CUDA_R_64F",
                    np.dtype(np.float16): "CUDA_R_16F", np.dtype(ml_dtypes.bfloat16): "CUDA_R_16BF"}


def _cublas_compute_type(cublas, dtype, chosen):
    """The cuBLAS compute type of a GEMM of `dtype` at precision `chosen`: CuPy's choice in _cupy_matmul
    (_COMPUTE_TYPE_NAMES) mapped as tensordot_core_v11 maps it (cupy/_core/_routines_linalg.pyx, CuPy v14):
    COMPUTE_TYPE_TF32 is CUBLAS_COMPUTE_32F_FAST_TF32 for float32; float64 is CUBLAS_COMPUTE_64F; anything else
    CUBLAS_COMPUTE_32F, which sums 16-bit inputs' products in float32."""
    if dtype == np.float64:
        return cublas.CUBLAS_COMPUTE_64F
    if dtype == np.float32 and _COMPUTE_TYPE_NAMES[chosen] == "COMPUTE_TYPE_TF32":
        return cublas.CUBLAS_COMPUTE_32F_FAST_TF32
    return cublas.CUBLAS_COMPUTE_32F


def _column_major(x):
    """How cuBLAS reads x's trailing (rows, cols) matrices: (False, ld) where they are column-major (unit stride
    down a column, ld elements from one column to the next), (True, ld) where row-major (read as their
    transposes), None where neither (no unit stride, a negative one, or rows that overlap)."""
    rows, cols = x.shape[-2:]
    down, across = (s // x.itemsize for s in x.strides[-2:])
    if (down == 1 or rows == 1) and (cols == 1 or across >= max(1, rows)):
        return False, across if cols > 1 else max(1, rows)
    if (across == 1 or cols == 1) and (rows == 1 or down >= max(1, cols)):
        return True, down if rows > 1 else max(1, cols)
    return None


def _strided_forwards(x):
    """Whether cuBLAS can take x as it lies: matrices with a unit stride (_column_major), and leading strides of
    0 or more (cuBLAS's batch strides and the loop's offsets are steps forwards)."""
    return _column_major(x) is not None and min(x.strides[:-2]) >= 0


def _batch_loops(shape, *operands):
    """The leading axes of `shape` as (batch, strides, loops): one axis whose strides (in elements, one per
    operand) cuBLAS steps by, and a list of (element offsets per operand) for each call that the other axes
    take. Axes of extent 1 are dropped and neighbours that step as one axis merged; what is left beyond one axis
    (the (positions, groups) of winograd.by_group's views) is looped over, the longest axis batched."""
    axes = []  # (extent, strides per operand)
    for i, extent in enumerate(shape):
        if extent == 1:
            continue
        strides = tuple(x.strides[i] // x.itemsize for x in operands)
        if axes and all(outer == inner * extent for outer, inner in zip(axes[-1][1], strides)):
            axes[-1] = (axes[-1][0] * extent, strides)
        else:
            axes.append((extent, strides))
    if not axes:
        return 1, (0,) * len(operands), [(0,) * len(operands)]
    batched = max(range(len(axes)), key=lambda i: axes[i][0])
    others = axes[:batched] + axes[batched + 1:]
    loops = [tuple(sum(i * s[j] for i, (_, s) in zip(index, others)) for j in range(len(operands)))
             for index in itertools.product(*(range(extent) for extent, _ in others))]
    return axes[batched][0], axes[batched][1], loops


def _checked_out(a, b, out):
    """batched_matmul's result array on a GPU: `out` checked, or a new one; a one-line error for operands it
    cannot take."""
    if a.ndim < 3 or b.ndim != a.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise MinidlError(f"batched_matmul takes (..., m, k) and (..., k, n) arrays of the same leading shape, "
                          f"got shapes {a.shape} and {b.shape}")
    dtype = a.dtype
    if dtype != b.dtype or dtype not in _CUDA_TYPE_NAMES:  # cuBLAS takes one type for A and B
        raise MinidlError(f"batched_matmul on a GPU multiplies two arrays of one dtype, "
                          f"{', '.join(map(str, _CUDA_TYPE_NAMES))}; got {a.dtype} and {b.dtype}")
    shape = a.shape[:-1] + b.shape[-1:]
    if out is None:
        return kernels.empty(shape, dtype)
    if out.shape != shape or out.dtype != dtype:
        raise MinidlError(f"batched_matmul's out must be {dtype} of shape {shape}, got {out.dtype} {out.shape}")
    return out


def _cublas_batched(a, b, out, chosen):
    """batched_matmul on a GPU, by CuPy's binding of cublasGemmStridedBatchedEx (cupy_backends/cuda/libs/cublas.pyx,
    CuPy v14), as CuPy's matmul calls it (cupy/_core/_routines_linalg.pyx) but with the precision's compute type:

    cuBLAS is column-major, so a C-contiguous result C is computed as C^T = B^T A^T (matmul's swap of a and b);
    each operand's matrices are passed as they lie, a row-major one with the transpose flag, ld its row stride;
    alpha and beta are host scalars (the handle's default pointer mode, which CuPy's own GEMMs assume too); the
    binding sets the handle's stream to the current one. One call covers a batch axis of one stride per operand
    (0 included); other leading axes are a loop of calls.
    """
    cp = cupy()
    out = _checked_out(a, b, out)
    if out.size == 0 or a.shape[-1] == 0:  # nothing to multiply
        if out.size:
            out.fill(0)  # an empty sum
        return out
    dtype, shape = out.dtype, out.shape
    # an `out` cuBLAS cannot write (matrices with no unit stride, leading strides going backwards) gets the
    # result copied in (a copy)
    c = out if _strided_forwards(out) else kernels.empty(shape, dtype)
    if not _column_major(c)[0]:  # column-major C = A B as it stands
        first, second, c_matrices = a, b, c
    else:  # row-major C: C^T = B^T A^T, column-major
        first, second, c_matrices = b.swapaxes(-1, -2), a.swapaxes(-1, -2), c.swapaxes(-1, -2)
    # an operand cuBLAS cannot read as it lies is copied C-contiguous (a copy: the only case that makes one)
    first, second = (x if _strided_forwards(x) else cp.ascontiguousarray(x) for x in (first, second))
    (transa, lda), (transb, ldb), (_, ldc) = (_column_major(x) for x in (first, second, c_matrices))
    m, k = first.shape[-2:]
    n = second.shape[-1]
    batch, (stride_a, stride_b, stride_c), loops = _batch_loops(shape[:-2], first, second, c_matrices)

    cublas = cp.cuda.cublas
    cuda_type = getattr(cp.cuda.runtime, _CUDA_TYPE_NAMES[dtype])  # A's, B's and C's
    compute = _cublas_compute_type(cublas, dtype, chosen)
    scale = np.float64 if dtype == np.float64 else np.float32  # float for the 32F compute types
    one, zero = np.ones((), scale), np.zeros((), scale)  # host scalars, alive through the calls
    handle = cp.cuda.device.get_cublas_handle()
    flags = [cublas.CUBLAS_OP_T if transposed else cublas.CUBLAS_OP_N for transposed in (transa, transb)]
    item = np.dtype(dtype).itemsize
    for offset_a, offset_b, offset_c in loops:
        cublas.gemmStridedBatchedEx(
            handle, flags[0], flags[1], m, n, k, one.ctypes.data,
            first.data.ptr + offset_a * item, cuda_type, lda, stride_a,
            second.data.ptr + offset_b * item, cuda_type, ldb, stride_b,
            zero.ctypes.data, c_matrices.data.ptr + offset_c * item, cuda_type, ldc, stride_c,
            batch, compute, cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)  # as tensordot_core_v11 on compute capability 8+
    if c is not out:
        out[...] = c
    return out
