"""`cupy.cuda.cublas` on emulated GPUs: the one cuBLAS call minidl makes directly, gemmStridedBatchedEx.

CuPy's binding (cupy_backends/cuda/libs/cublas.pyx, CuPy v14) takes raw device addresses, cuBLAS's
enum codes and host pointers to alpha and beta (a handle's default CUBLAS_POINTER_MODE_HOST), and
sets the handle's stream to the current one first. Here the call computes what cuBLAS computes, in
its column-major terms: for each of the batchCount matrices i,
    C_i = alpha op(A_i) op(B_i) + beta C_i,
where A_i is the (rows x cols) matrix whose (r, c) element is at A + (i strideA + c lda + r) elements
(rows x cols = m x k, or k x m transposed by transa; B's likewise), and C_i (m x n) at
C + (i strideC + c ldc + r); C is not read when beta is 0. Products are summed in the compute type:
float32 (the inputs first rounded to TF32 under CUBLAS_COMPUTE_32F_FAST_TF32, as tensor cores read
them; 16-bit inputs widened, the result rounded once to C's type) or float64. The summation order is
NumPy's, not cuBLAS's.

The call is one GEMM on the current stream of the current GPU, reading A and B (and C when beta is
not 0) and writing C, found by address among the live allocations, charged to the ledger as one
launch on its compute unit, with nothing hidden. What cuBLAS refuses is refused here
(CUBLAS_STATUS_INVALID_VALUE, CUBLAS_STATUS_NOT_SUPPORTED), and so is what it would silently get
wrong: addresses outside live device memory of the current GPU, a device address for alpha or beta,
C overlapping A or B, a C element written by two matrices of the batch, another GPU's handle.
"""
import ctypes

import ml_dtypes
import numpy as np

from minidl_emulator import cuda
from minidl_emulator.ledger import Cost

# cupy_backends/cuda/libs/cublas.pxd and cupy_backends/cuda/api/_runtime_enum.pxd (CuPy v14)
CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C = 0, 1, 2
CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT_TENSOR_OP = -1, 99
CUBLAS_COMPUTE_16F, CUBLAS_COMPUTE_16F_PEDANTIC = 64, 65
CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F_PEDANTIC = 68, 69
CUBLAS_COMPUTE_32F_FAST_16F, CUBLAS_COMPUTE_32F_FAST_16BF, CUBLAS_COMPUTE_32F_FAST_TF32 = 74, 75, 77
CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_64F_PEDANTIC = 70, 71
CUDA_R_32F, CUDA_R_64F, CUDA_R_16F, CUDA_R_16BF = (cuda.runtime.CUDA_R_32F, cuda.runtime.CUDA_R_64F,
                                                  cuda.runtime.CUDA_R_16F, cuda.runtime.CUDA_R_16BF)

_DTYPES = {CUDA_R_32F: np.dtype(np.float32), CUDA_R_64F: np.dtype(np.float64), CUDA_R_16F: np.dtype(np.float16),
           CUDA_R_16BF: np.dtype(ml_dtypes.bfloat16)}
# cuBLAS's table of gemmEx's (and gemmStridedBatchedEx's) real-valued combinations, those emulated:
# compute type -> {A and B type: the C types allowed}; its scale type (alpha, beta): float, or double
# for the 64F ones
_FLOAT32 = {CUDA_R_16F: (CUDA_R_16F, CUDA_R_32F), CUDA_R_16BF: (CUDA_R_16BF, CUDA_R_32F), CUDA_R_32F: (CUDA_R_32F,)}
_COMBINATIONS = {CUBLAS_COMPUTE_32F: _FLOAT32, CUBLAS_COMPUTE_32F_PEDANTIC: _FLOAT32,
                 CUBLAS_COMPUTE_32F_FAST_TF32: {CUDA_R_32F: (CUDA_R_32F,)},
                 CUBLAS_COMPUTE_64F: {CUDA_R_64F: (CUDA_R_64F,)}}
_COMBINATIONS[CUBLAS_COMPUTE_64F_PEDANTIC] = _COMBINATIONS[CUBLAS_COMPUTE_64F]
# the codes' names, for messages; the compute types with no entry above are not emulated
_TYPE_NAMES = {value: name for name, value in list(globals().items()) if name.startswith("CUDA_R_")}
_COMPUTE_NAMES = {value: name for name, value in list(globals().items()) if name.startswith("CUBLAS_COMPUTE_")}


class CUBLASError(RuntimeError):
    """cupy_backends.cuda.libs.cublas.CUBLASError: a call cuBLAS answered with a failing status."""

    def __init__(self, status, detail):
        self.status = status
        super().__init__(f"{status}: {detail}")


def _device_of(handle):
    device_id = handle - cuda.CUBLAS_HANDLE_BASE
    if not 0 <= device_id < cuda.runtime.getDeviceCount():
        raise CUBLASError("CUBLAS_STATUS_NOT_INITIALIZED", f"{handle:#x} is no cuBLAS handle of the emulated GPUs")
    return device_id


def _scalar(address, dtype, name):
    """The value at host address `address` (pointer mode host): refused where it is device memory."""
    if cuda.live_allocations.at(address) is not None:
        raise ValueError(f"gemmStridedBatchedEx's {name} is address {address:#x}, inside an emulated GPU's memory, "
                         "but the handle's pointer mode is host: pass the address of a host scalar")
    return np.frombuffer((ctypes.c_char * dtype.itemsize).from_address(address), dtype=dtype)[0]


def _matrices(address, dtype, rows, cols, ld, stride, batch, name):
    """The batch of column-major (rows x cols) matrices at `address` as a writable host view (batch, rows, cols),
    and the emulated array of its allocation, for the stream checks."""
    from minidl_emulator.xp import ndarray
    if stride < 0:
        raise NotImplementedError(f"gemmStridedBatchedEx's stride{name} {stride} < 0: the emulator takes strides >= 0")
    span = (batch - 1) * stride + (cols - 1) * ld + rows  # elements from the first to one past the last
    allocation, raw = cuda.memory_at(address, span * dtype.itemsize, f"gemmStridedBatchedEx's {name} is address")
    if allocation.device_id != cuda.current_device_id():
        raise ValueError(f"gemmStridedBatchedEx's {name} is on emulated GPU {allocation.device_id}, but GPU "
                         f"{cuda.current_device_id()} is current (no peer access)")
    item = dtype.itemsize
    view = np.lib.stride_tricks.as_strided(raw.view(dtype), shape=(batch, rows, cols),
                                           strides=(stride * item, item, ld * item))
    return view, ndarray._view(view, allocation), (address, address + span * item)


def _check(condition, status, detail):
    if not condition:
        raise CUBLASError(status, detail)


def gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha,  # noqa: N802,N803 -- CuPy's names
                         A, Atype, lda, strideA, B, Btype, ldb, strideB,
                         beta, C, Ctype, ldc, strideC, batchCount, computeType, algo):
    """cublasGemmStridedBatchedEx through CuPy's binding (see the module's docstring)."""
    (rows_a, cols_a), (rows_b, cols_b) = _checked_call(handle, transa, transb, m, n, k, Atype, Btype, Ctype,
                                                       lda, ldb, ldc, batchCount, computeType, algo)
    if m == 0 or n == 0 or batchCount == 0:
        return  # cuBLAS returns at once: nothing is read or written
    scale = np.dtype(np.float64 if computeType in (CUBLAS_COMPUTE_64F, CUBLAS_COMPUTE_64F_PEDANTIC) else np.float32)
    alpha_value, beta_value = _scalar(alpha, scale, "alpha"), _scalar(beta, scale, "beta")
    data, out_dtype = _DTYPES[Atype], _DTYPES[Ctype]
    c_host, c_array, c_range = _matrices(C, out_dtype, m, n, ldc, strideC, batchCount, "C")
    reads, a_host, b_host = [], None, None
    if k > 0:
        a_host, a_array, a_range = _matrices(A, data, rows_a, cols_a, lda, strideA, batchCount, "A")
        b_host, b_array, b_range = _matrices(B, data, rows_b, cols_b, ldb, strideB, batchCount, "B")
        for name, (low, high) in (("A", a_range), ("B", b_range)):
            if low < c_range[1] and c_range[0] < high:
                raise ValueError(f"gemmStridedBatchedEx: C's memory overlaps {name}'s (cuBLAS leaves the result "
                                 "undefined)")
        reads = [a_array, b_array]
    _check_distinct(c_host, m, n, ldc, strideC, batchCount)
    if beta_value != 0:
        reads.append(c_array)
    item, c_item = data.itemsize, out_dtype.itemsize
    nbytes = batchCount * (item * (m * k + k * n) + c_item * m * n * (2 if beta_value != 0 else 1))
    cost = Cost(unit=_unit(data, computeType), flops=2 * m * n * k * batchCount, nbytes=nbytes,
                name=f"cublas gemmStridedBatchedEx ({_COMPUTE_NAMES[computeType]})")
    cuda.operation("gemm", reads=reads, writes=[c_array], nbytes=nbytes, what="cublas gemmStridedBatchedEx", cost=cost)
    c_host[...] = _compute(a_host, b_host, transa, transb, c_host, alpha_value, beta_value, computeType, scale)


def _checked_call(handle, transa, transb, m, n, k, Atype, Btype, Ctype, lda, ldb, ldc, batchCount,  # noqa: N803
                  computeType, algo):
    """Refuse what cuBLAS refuses of a gemmStridedBatchedEx call; the stored shapes of A's and B's matrices."""
    device_id = _device_of(handle)
    if device_id != cuda.current_device_id():
        raise ValueError(f"gemmStridedBatchedEx: the handle is emulated GPU {device_id}'s, but GPU "
                         f"{cuda.current_device_id()} is current (a handle works on the device it was made on)")
    if computeType in _COMPUTE_NAMES and computeType not in _COMBINATIONS:
        raise NotImplementedError(f"gemmStridedBatchedEx: {_COMPUTE_NAMES[computeType]} is not emulated")
    _check(computeType in _COMBINATIONS, "CUBLAS_STATUS_INVALID_VALUE",
           f"computeType {computeType} is no cublasComputeType_t (CuPy's matmul passes a cudaDataType there, "
           "cuBLAS's legacy form, which the emulator does not take)")
    _check(algo in (CUBLAS_GEMM_DEFAULT, CUBLAS_GEMM_DEFAULT_TENSOR_OP) or 0 <= algo <= 23 or 100 <= algo <= 115,
           "CUBLAS_STATUS_INVALID_VALUE", f"algo {algo} is no cublasGemmAlgo_t")
    allowed = _COMBINATIONS[computeType]
    _check(Atype == Btype and Atype in allowed and Ctype in allowed[Atype], "CUBLAS_STATUS_NOT_SUPPORTED",
           f"Atype {_TYPE_NAMES.get(Atype, Atype)}, Btype {_TYPE_NAMES.get(Btype, Btype)}, Ctype "
           f"{_TYPE_NAMES.get(Ctype, Ctype)} under {_COMPUTE_NAMES[computeType]}: cuBLAS takes "
           + "; ".join(f"A and B {_TYPE_NAMES[t]} with C {' or '.join(_TYPE_NAMES[c] for c in cs)}"
                       for t, cs in allowed.items()))
    for name, op in (("transa", transa), ("transb", transb)):
        _check(op in (CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C), "CUBLAS_STATUS_INVALID_VALUE",
               f"{name} {op} is no cublasOperation_t")
    _check(min(m, n, k, batchCount) >= 0, "CUBLAS_STATUS_INVALID_VALUE",
           f"m, n, k, batchCount = {m}, {n}, {k}, {batchCount}: none may be negative")
    rows_a, cols_a = (m, k) if transa == CUBLAS_OP_N else (k, m)
    rows_b, cols_b = (k, n) if transb == CUBLAS_OP_N else (n, k)
    for name, ld, rows, op in (("lda", lda, rows_a, transa), ("ldb", ldb, rows_b, transb), ("ldc", ldc, m, None)):
        _check(ld >= max(1, rows), "CUBLAS_STATUS_INVALID_VALUE",
               f"{name} {ld} < max(1, {rows}), the rows of the stored column-major matrix"
               + ("" if op is None else f" ({'not ' if op == CUBLAS_OP_N else ''}transposed)"))
    return (rows_a, cols_a), (rows_b, cols_b)


def _check_distinct(c_host, m, n, ldc, stride, batch):
    """A C element written by two matrices of the batch is a race on a GPU: refused."""
    if batch == 1 or stride >= (n - 1) * ldc + m:
        return  # the matrices follow one another (ldc >= m keeps each one's elements apart)
    offsets = (np.arange(batch)[:, None, None] * stride + np.arange(m)[None, :, None]
               + np.arange(n)[None, None, :] * ldc)
    if np.unique(offsets).size != offsets.size:
        raise ValueError(f"gemmStridedBatchedEx: strideC {stride} makes matrices of the batch write the same "
                         f"elements of C ({m} x {n}, ldc {ldc}): a race on a GPU")


def _unit(data, compute_type):
    """The ledger's compute unit: TF32 tensor cores under FAST_TF32, the 16-bit ones for 16-bit inputs (their
    products summed in float32 on tensor cores) unless PEDANTIC keeps them off, else FP32 on the SIMT units or FP64."""
    if compute_type == CUBLAS_COMPUTE_32F_FAST_TF32:
        return "tf32"
    if compute_type == CUBLAS_COMPUTE_32F_PEDANTIC:
        return "fp32-simt"
    if data == np.float16:
        return "fp16"
    if data == ml_dtypes.bfloat16:
        return "bf16"
    return "fp64" if data == np.float64 else "fp32-simt"


def _compute(a_host, b_host, transa, transb, c_host, alpha, beta, compute_type, scale):
    """alpha op(A) op(B) + beta C in the compute type's precision, as C's dtype."""
    from minidl_emulator.xp import round_to_tf32
    batch, m, n = c_host.shape
    if a_host is None:  # k == 0: the product is zeros
        result = np.zeros((batch, m, n), scale)
    else:
        a = a_host if transa == CUBLAS_OP_N else a_host.swapaxes(1, 2)
        b = b_host if transb == CUBLAS_OP_N else b_host.swapaxes(1, 2)
        if compute_type == CUBLAS_COMPUTE_32F_FAST_TF32:
            a, b = round_to_tf32(a), round_to_tf32(b)
        result = np.matmul(a.astype(scale, copy=False), b.astype(scale, copy=False))
    if alpha != 1:
        result *= alpha
    if beta != 0:
        result += beta * c_host.astype(scale)
    return result.astype(c_host.dtype, copy=False)
