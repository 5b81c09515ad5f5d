"""gemm.batched_matmul: NumPy's matmul on the CPU; on a GPU cuBLAS gemmStridedBatchedEx at the precision's compute
type, operands passed as they lie (transposes as flags), a loop of calls over leading axes of no one stride; and the
emulator's cupy.cuda.cublas.gemmStridedBatchedEx, which computes as cuBLAS (column-major) and refuses what it refuses.

The GPU tests run on emulated GPUs (`pytest --emulate-gpus 2`); those reading the ledger or calling the emulated
binding run there only.

Each product is checked against the exact (float64) product of the same values, within the rounding bound of the
arithmetic: float32 sums of K products (FP32, and 16-bit inputs, whose products float32 holds exactly) are within
K 2^-24 (|A| |B|), float64 ones within K 2^-53 (|A| |B|); a 16-bit result is then rounded once more (u = 2^-11
float16, 2^-8 bfloat16). NumPy's float16 matmul on the CPU rounds each partial sum to float16: K u there.
"""
import os

import ml_dtypes
import numpy as np
import pytest

from minidl import Tensor
from minidl.device import cupy, device
from minidl.errors import MinidlError
from minidl.functions import conv2d, winograd
from minidl.functions.gemm import batched_matmul, matmul

EMULATED = bool(os.environ.get("MINIDL_EMULATE_GPUS"))
emulated_only = pytest.mark.skipif(not EMULATED, reason="reads the GPU emulator's ledger or calls its cuBLAS: "
                                                        "run with --emulate-gpus 2")
BF16 = np.dtype(ml_dtypes.bfloat16)
U = 2.0 ** -11  # TF32's unit roundoff
DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BF16]
ROUNDOFF = {np.dtype(np.float64): 2.0 ** -53, np.dtype(np.float32): 2.0 ** -24, np.dtype(np.float16): 2.0 ** -11,
            BF16: 2.0 ** -8}
# the layouts of (a, b, out) tried: how each operand's matrices lie
LAYOUTS = ["contiguous", "a transposed", "b transposed", "both transposed", "a strided", "out transposed",
           "by group"]


def f64(a):
    return np.asarray(a).astype(np.float64)


def operands(rng, layout, dtype, xp, batch=(3, 2), m=5, k=7, n=4):
    """(a, b, out) of `layout` on xp's device, and a and b's values as float64 (a, b: (batch..., m, k) and
    (batch..., k, n); out None or a view to write)."""
    a = rng.standard_normal(batch + (m, k)).astype(dtype)
    b = rng.standard_normal(batch + (k, n)).astype(dtype)
    values = f64(a), f64(b)

    def transposed(x):  # the same values, each matrix column-major (an F-contiguous view per matrix)
        return xp.asarray(np.ascontiguousarray(x.swapaxes(-1, -2))).swapaxes(-1, -2)
    out = None
    if layout == "by group":  # winograd.by_group's views: (positions, groups) leading axes of no one stride
        positions, groups = batch
        V = xp.asarray(np.ascontiguousarray(a.transpose(0, 2, 1, 3)).reshape(positions, m, groups * k))
        U = xp.asarray(np.ascontiguousarray(b.swapaxes(-1, -2)))  # (positions, groups, n, k)
        M = xp.empty((positions, m, groups * n), dtype=dtype)
        return winograd.by_group(V, groups), U.swapaxes(-1, -2), winograd.by_group(M, groups), values
    if layout == "a strided":  # every other column of a wider array: no unit stride, so it is copied
        wide = np.zeros(batch + (m, 2 * k), dtype)
        wide[..., ::2] = a
        return xp.asarray(wide)[..., ::2], xp.asarray(b), None, values
    if layout == "out transposed":
        out = xp.empty(batch + (n, m), dtype=dtype).swapaxes(-1, -2)
    a_dev = transposed(a) if layout in ("a transposed", "both transposed") else xp.asarray(a)
    b_dev = transposed(b) if layout in ("b transposed", "both transposed") else xp.asarray(b)
    return a_dev, b_dev, out, values


def bound(a, b, dtype, on_gpu):
    """The rounding bound of each element of a @ b (see the module's docstring)."""
    k = a.shape[-1]
    u = ROUNDOFF[dtype]
    if dtype == np.float64:
        factor = k * u
    elif dtype == np.float32:
        factor = k * 2.0 ** -24
    else:  # a GPU sums in float32 and rounds once; NumPy rounds each sum to the 16-bit dtype
        factor = (k * 2.0 ** -24 + u) if on_gpu else (k + 1) * u
    return factor * (np.abs(a) @ np.abs(b))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_batched_matmul_is_the_product_within_its_rounding_bound(dev, rng, at_precision, dtype, layout):
    at_precision("fp32")  # float32 in exact FP32 (TF32: the test below)
    with dev:
        a, b, out, (a64, b64) = operands(rng, layout, dtype, dev.xp)
        result = batched_matmul(a, b, out=out)
        assert out is None or result is out
        got = dev.xp.asnumpy(result) if dev.xp is not np else result
    # without out, the CPU's is NumPy's dtype (ml_dtypes' bfloat16 matmul gives float32; minidl's CPU widens 16 bits)
    numpys = np.matmul(np.zeros((1, 1), dtype), np.zeros((1, 1), dtype)).dtype
    assert got.dtype == (numpys if dev.xp is np and out is None else dtype)
    assert got.shape == a64.shape[:-1] + b64.shape[-1:]
    exact = a64 @ b64
    assert np.all(np.abs(f64(got) - exact) <= bound(a64, b64, dtype, dev.xp is not np))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "both transposed", "by group"])
def test_float32_under_tf32_is_the_product_of_inputs_rounded_to_tf32(rng, at_precision, layout):
    at_precision("tf32")
    with device("cuda:0") as gpu:
        a, b, out, (a64, b64) = operands(rng, layout, np.float32, gpu.xp, k=64)
        got = f64(batched_matmul(a, b, out=out).get())
    exact = a64 @ b64
    k = a64.shape[-1]
    tf32_bound = (2 * U + U * U + k * 2.0 ** -24) * (np.abs(a64) @ np.abs(b64))
    assert np.all(np.abs(got - exact) <= tf32_bound)
    if EMULATED:  # the emulator's TF32: the FP32 product of the inputs rounded to 10-bit mantissas
        from minidl_emulator.xp import round_to_tf32
        a_tf32, b_tf32 = f64(round_to_tf32(a64.astype(np.float32))), f64(round_to_tf32(b64.astype(np.float32)))
        assert np.all(np.abs(got - a_tf32 @ b_tf32) <= k * 2.0 ** -24 * (np.abs(a64) @ np.abs(b64)))
        # and not FP32's product: TF32's error (~2^-11 sqrt(K) of the values) is far above FP32's (~2^-24 sqrt(K))
        assert np.abs(got - exact).max() > 2.0 ** -16 * np.abs(exact).max()


def test_the_cpu_path_is_numpys_matmul_bit_for_bit(rng):
    a, b = rng.standard_normal((4, 2, 5, 6)).astype(np.float32), rng.standard_normal((4, 2, 6, 3)).astype(np.float32)
    out = np.empty((4, 5, 2 * 3), np.float32).reshape(4, 5, 2, 3).transpose(0, 2, 1, 3)
    assert batched_matmul(a, b, out=out) is out
    np.testing.assert_array_equal(out, a @ b)
    np.testing.assert_array_equal(batched_matmul(a.swapaxes(-1, -2).copy().swapaxes(-1, -2), b), np.matmul(a, b))


@pytest.mark.gpu
def test_bad_shapes_and_dtypes_are_refused():
    with device("cuda:0") as gpu:
        cp = gpu.xp
        a, b = cp.zeros((2, 3, 4), np.float32), cp.zeros((2, 4, 5), np.float32)
        with pytest.raises(MinidlError, match=r"same leading shape, got shapes \(2, 3, 4\) and \(3, 4, 5\)"):
            batched_matmul(a, cp.zeros((3, 4, 5), np.float32))
        with pytest.raises(MinidlError, match=r"out must be float32 of shape \(2, 3, 5\), got float64"):
            batched_matmul(a, b, out=cp.zeros((2, 3, 5), np.float64))
        with pytest.raises(MinidlError, match="one dtype, float32, float64, float16, bfloat16; got int32 and int32"):
            batched_matmul(a.astype(np.int32), b.astype(np.int32))
        with pytest.raises(MinidlError, match="one dtype, .*; got float32 and float16"):
            batched_matmul(a, b.astype(np.float16))
        with pytest.raises(MinidlError, match="at_precision must be None or one of tf32, fp32, fp16, bf16"):
            batched_matmul(a, b, at_precision="fp8")


# --- what a call costs on the emulated GPUs

UNITS = {np.dtype(np.float64): "fp64", np.dtype(np.float16): "fp16", BF16: "bf16"}


@pytest.mark.gpu
@emulated_only
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("name", ["tf32", "fp32"])
@pytest.mark.parametrize("layout", ["contiguous", "both transposed", "out transposed", "by group"])
def test_one_gemm_launch_per_uniform_batch_on_its_unit_without_copies(rng, charged, at_precision, name, dtype,
                                                                      layout):
    at_precision(name)
    with device("cuda:0") as gpu:
        a, b, out, _ = operands(rng, layout, dtype, gpu.xp)
        start = len(charged())
        batched_matmul(a, b, out=out)
        entries = charged()[start:]
    unit = UNITS.get(dtype, "tf32" if name == "tf32" else "fp32-simt")
    calls = 2 if layout == "by group" else 1  # by group: one call per group, the positions batched
    assert [(e.kind, e.unit, e.hidden) for e in entries] == [("gemm", unit, False)] * calls
    assert all(e.name.startswith("cublas gemmStridedBatchedEx") for e in entries)
    assert sum(e.flops for e in entries) == 2 * 3 * 2 * 5 * 7 * 4  # 2 m n k for each of the 3 x 2 matrices


@pytest.mark.gpu
@emulated_only
def test_a_strided_operand_is_the_one_copy(rng, charged):
    with device("cuda:0") as gpu:
        a, b, _, _ = operands(rng, "a strided", np.float32, gpu.xp)
        start = len(charged())
        batched_matmul(a, b)
        entries = charged()[start:]
    assert [(e.kind, e.name) for e in entries] == [("copy", "ascontiguousarray"), ("gemm", entries[1].name)]
    assert entries[1].name.startswith("cublas gemmStridedBatchedEx")


@pytest.mark.gpu
@emulated_only
def test_winograds_gemms_are_on_tensor_cores_under_tf32_and_16_bit_maps_tiles_in_exact_fp32(rng, charged,
                                                                                            at_precision):
    """A Winograd convolution's forward and backward on a GPU: under tf32 no FP32-SIMT FLOP, nothing hidden; the
    float32 tiles of 16-bit maps are multiplied in exact FP32 (winograd.gemm_precision) whatever the precision."""
    x = rng.standard_normal((2, 4, 9, 9))
    W = rng.standard_normal((6, 2, 3, 3))
    units = {}
    for dtype, name in ((np.float32, "tf32"), (np.float32, "fp32"), (np.float16, "fp16"), (np.float64, "tf32")):
        at_precision(name)
        inputs = [Tensor(a.astype(dtype), device="cuda:0", requires_grad=True) for a in (x, W)]
        start = len(charged())
        conv2d(*inputs, pad=1, groups=2, algorithm="winograd").sum().backward()
        entries = charged()[start:]
        gemms = [e for e in entries if e.kind == "gemm"]
        batched = [e for e in gemms if e.name.startswith("cublas gemmStridedBatchedEx")]
        assert len(batched) == 3 * 2  # the products of the forward, gW and gx, one call per group each
        assert not [e for e in entries if e.hidden]
        units[np.dtype(dtype).name, name] = {e.unit for e in gemms}
    assert units["float32", "tf32"] == {"tf32"}
    assert units["float32", "fp32"] == units["float16", "fp16"] == {"fp32-simt"}
    assert units["float64", "tf32"] == {"fp64"}


# --- the emulated binding itself

@pytest.fixture
def cublas_call():
    """call(**changes): the emulated gemmStridedBatchedEx on device arrays A (2 x 3 x 4), B (2 x 4 x 5), C (2 x 3 x 5),
    float32 C-contiguous, taken column-major: C^T = B^T A^T, as a C-contiguous product is passed; returns C."""
    cp = cupy()
    with device("cuda:0"):
        rng = np.random.default_rng(7)
        arrays = dict(A=cp.asarray(rng.standard_normal((2, 3, 4)).astype(np.float32)),
                      B=cp.asarray(rng.standard_normal((2, 4, 5)).astype(np.float32)),
                      C=cp.zeros((2, 3, 5), np.float32))
        cublas = cp.cuda.cublas
        one, zero = np.ones((), np.float32), np.zeros((), np.float32)

        def call(**changes):
            args = dict(handle=cp.cuda.device.get_cublas_handle(), transa=0, transb=0, m=5, n=3, k=4,
                        alpha=one.ctypes.data, A=arrays["B"].data.ptr, Atype=0, lda=5, strideA=20,
                        B=arrays["A"].data.ptr, Btype=0, ldb=4, strideB=12, beta=zero.ctypes.data,
                        C=arrays["C"].data.ptr, Ctype=0, ldc=5, strideC=15, batchCount=2,
                        computeType=cublas.CUBLAS_COMPUTE_32F, algo=cublas.CUBLAS_GEMM_DEFAULT_TENSOR_OP)
            args.update(changes)
            cublas.gemmStridedBatchedEx(*args.values())
            return arrays["C"].get()
        call.arrays, call.cublas = arrays, cublas
        yield call


@pytest.mark.gpu
@emulated_only
def test_the_emulated_call_is_column_major_with_alpha_beta_and_transposes(cublas_call):
    A, B = cublas_call.arrays["A"].get(), cublas_call.arrays["B"].get()
    np.testing.assert_allclose(cublas_call(), A @ B, rtol=1e-6)  # C^T = B^T A^T, column-major
    # op(first) = B^T by transa = T: the first operand stored column-major (4 x 5, lda 4) is B itself, whose
    # column-major bytes are B^T's C-contiguous ones; alpha 2 and beta 0.5 scale the product and add C as it was
    b_t = cupy().asarray(np.ascontiguousarray(B.swapaxes(-1, -2)))
    two, half = np.full((), 2, np.float32), np.full((), 0.5, np.float32)
    before = cublas_call.arrays["C"].get()
    got = cublas_call(transa=1, A=b_t.data.ptr, lda=4, alpha=two.ctypes.data, beta=half.ctypes.data)
    np.testing.assert_allclose(got, 2 * (A @ B) + 0.5 * before, rtol=1e-6)


@pytest.mark.gpu
@emulated_only
@pytest.mark.parametrize("changes, error, message", [
    (dict(lda=4), "CUBLAS_STATUS_INVALID_VALUE", r"lda 4 < max\(1, 5\)"),
    (dict(ldc=2), "CUBLAS_STATUS_INVALID_VALUE", r"ldc 2 < max\(1, 5\)"),
    (dict(transb=1, ldb=2), "CUBLAS_STATUS_INVALID_VALUE", r"ldb 2 < max\(1, 3\).*\(transposed\)"),
    (dict(k=-1), "CUBLAS_STATUS_INVALID_VALUE", "none may be negative"),
    (dict(transa=5), "CUBLAS_STATUS_INVALID_VALUE", "transa 5 is no cublasOperation_t"),
    (dict(Ctype=1), "CUBLAS_STATUS_NOT_SUPPORTED", "Ctype CUDA_R_64F under CUBLAS_COMPUTE_32F"),
    (dict(Atype=2, Btype=2), "CUBLAS_STATUS_NOT_SUPPORTED", "Atype CUDA_R_16F, Btype CUDA_R_16F, Ctype CUDA_R_32F "
                                                            "under CUBLAS_COMPUTE_32F_FAST_TF32"),
    (dict(computeType=0), "CUBLAS_STATUS_INVALID_VALUE", "computeType 0 is no cublasComputeType_t"),
])
def test_the_emulated_call_refuses_what_cublas_refuses(cublas_call, changes, error, message):
    from minidl_emulator.cuda.cublas import CUBLASError
    if "Atype" in changes:
        changes["computeType"] = cublas_call.cublas.CUBLAS_COMPUTE_32F_FAST_TF32
    with pytest.raises(CUBLASError, match=f"{error}: .*{message}"):
        cublas_call(**changes)


@pytest.mark.gpu
@emulated_only
def test_the_emulated_call_refuses_what_a_gpu_would_get_wrong(cublas_call):
    arrays = cublas_call.arrays
    with pytest.raises(ValueError, match="alpha is address .* inside an emulated GPU's memory"):
        cublas_call(alpha=arrays["C"].data.ptr)
    with pytest.raises(ValueError, match="B is address .* run past the end"):
        cublas_call(strideB=13)
    with pytest.raises(ValueError, match="C's memory overlaps A's"):
        cublas_call(C=arrays["B"].data.ptr, ldc=5, strideC=20)
    with pytest.raises(ValueError, match="strideC 5 makes matrices of the batch write the same elements"):
        cublas_call(strideC=5)
    handle = cupy().cuda.device.get_cublas_handle()  # GPU 0's
    with pytest.raises(ValueError, match="the handle is emulated GPU 0's, but GPU 1 is current"):
        with device("cuda:1"):
            cublas_call(handle=handle)


def test_2d_matmul_takes_at_precision_and_the_cpu_ignores_it(rng):
    a, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    np.testing.assert_array_equal(matmul(a, b, "fp32"), a @ b)
    np.testing.assert_array_equal(batched_matmul(a[None], b[None], at_precision="tf32"), (a @ b)[None])
