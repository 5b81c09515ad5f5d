"""16-bit float kernels (issue 28's foundation): a `template <typename T>` kernel instantiated for
__half and __nv_bfloat16 runs on float16 and bfloat16 (ml_dtypes) arrays, computing in float.

The fixture tests/kernels/half_axpy.cu is compiled three ways: by the emulator's g++ with its own
cuda_fp16.h / cuda_bf16.h (whose rounding is checked bit for bit against NumPy's and ml_dtypes'
conversions), by NVRTC with CuPy's options and the CUDA headers (as CuPy 14 compiles it), and,
marked gpu, through minidl.kernels on (emulated) GPUs. A float/double-only kernel refuses 16-bit
dtypes; a 2-D 16-bit GEMM on the emulated GPUs computes in float32 and rounds once.
"""
import os

import ml_dtypes
import numpy as np
import pytest

from minidl import kernels
from minidl.errors import MinidlError
from minidl_emulator import kernel_runner as kr
from minidl_emulator import nvrtc_check

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "half_axpy.cu")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALVES = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16")]
C_TYPE = {F16: "__half", BF16: "__nv_bfloat16", np.dtype(np.float32): "float"}
# what minidl launches: scale_add for float, __half and __nv_bfloat16 (not double: the fixture has none)
CU = kernels.KernelFile(FIXTURE, ("scale_add",), (np.dtype(np.float32), F16, BF16))
# what the direct tests run besides
EXPRESSIONS = CU.name_expressions() + tuple(f"{k}<{C_TYPE[d]}>" for k in ("round_trip", "intrinsics")
                                            for d in (F16, BF16))
ARRAYS = dict(is_array=lambda a: isinstance(a, np.ndarray), array_dtype=lambda a: a.dtype,
              array_address=lambda a: a.ctypes.data)


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh inputs every run


def run(expression, args, grid=(7, 1, 1), block=(32, 1, 1)):
    """A fixture kernel compiled by the emulator's g++, run on NumPy arrays (few threads: the loop turns)."""
    with open(FIXTURE) as f:
        module = kr.compile_module(f.read(), EXPRESSIONS, kernels.compile_options(FIXTURE))
    kernel = module.kernel(expression)
    kernel.run(grid, block, kr.marshal(kernel, tuple(args), **ARRAYS))


def bits(a):
    return np.ascontiguousarray(a).view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def floats_to_round(dtype, rng):
    """float32 values that test every rounding case: random bit patterns (all exponents, subnormals,
    infinities, NaNs), exact ties between neighbours of `dtype` (normal and subnormal), values just
    beside the ties, the overflow threshold and its neighbours, zeros, the least subnormal's half."""
    patterns = rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    # ties: the midpoint of two finite neighbours, exact in float32 (12 or 9 significant bits)
    largest = np.array([np.finfo(dtype).max], dtype=dtype)
    low = rng.integers(0, int(bits(largest)[0]), 20000, dtype=np.uint64).astype(np.uint16)
    low_values = low.view(dtype).astype(np.float64)
    high_values = (low + np.uint16(1)).view(dtype).astype(np.float64)
    ties = ((low_values + high_values) / 2).astype(np.float32)
    assert np.array_equal(ties.astype(np.float64), (low_values + high_values) / 2)
    beside = np.concatenate([np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))])
    # the finite maximum, the tie above it (rounds to infinity) and their neighbours
    ulp = float(largest[0]) - float((bits(largest) - np.uint16(1)).view(dtype)[0])
    edge = np.array([float(largest[0]), float(largest[0]) + ulp / 2], dtype=np.float32)
    edge = np.concatenate([edge, np.nextafter(edge, np.float32(np.inf)), np.nextafter(edge, np.float32(-np.inf))])
    tiny = float(np.finfo(dtype).smallest_subnormal)
    special = np.array([0.0, np.inf, np.nan, tiny / 2, tiny, 1.5 * tiny, 2.5 * tiny, tiny / 4, 1.0, 65520.0],
                       dtype=np.float32)
    values = np.concatenate([patterns, ties, beside, edge, special])
    values = np.concatenate([values, -values])
    return values[rng.permutation(values.size)]


@pytest.mark.parametrize("dtype", HALVES)
def test_the_emulators_16_bit_types_round_like_numpy(dtype, rng):
    x = floats_to_round(dtype, rng)
    with np.errstate(all="ignore"):
        expected = x.astype(dtype)
    nan = np.isnan(x)
    for kernel in ("round_trip", "intrinsics"):
        to, back = np.zeros(x.size, dtype), np.zeros(x.size, np.float32)
        if kernel == "round_trip":  # the constructor T(float) and operator float()
            run(f"round_trip<{C_TYPE[dtype]}>", (x, to, back, x.size))
        else:  # __float2half / __half2float, __float2bfloat16 / __bfloat162float
            scratch = [np.zeros(x.size, dtype) for _ in range(3)]
            run(f"intrinsics<{C_TYPE[dtype]}>", (x, to, back, to.copy(), to.copy(), *scratch,
                                                np.zeros(x.size, np.int32), x.size))
        assert np.array_equal(bits(to)[~nan], bits(expected)[~nan]), kernel
        assert np.all(bits(to)[nan] == 0x7fff), kernel  # CUDA's NaN (cvt.rn.f16.f32, cvt.rn.bf16.f32)
        assert np.array_equal(bits(back)[~nan], bits(expected.astype(np.float32))[~nan]), kernel  # exact
        assert np.all(np.isnan(back[nan])), kernel


@pytest.mark.parametrize("dtype", HALVES)
def test_the_16_bit_operators_compute_in_float_and_round_once(dtype, rng):
    # every finite and non-finite 16-bit value against random partners (some of them zeros)
    x = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    y = rng.integers(0, 2 ** 16, x.size, dtype=np.uint64).astype(np.uint16).view(dtype)
    y[rng.random(x.size) < 0.01] = 0
    sum_, product, quotient = (np.zeros(x.size, dtype) for _ in range(3))
    less = np.zeros(x.size, np.int32)
    run(f"intrinsics<{C_TYPE[dtype]}>", (x.astype(np.float32), np.zeros(x.size, dtype), np.zeros(x.size, np.float32),
                                        x, y, sum_, product, quotient, less, x.size))
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    with np.errstate(all="ignore"):
        for got, expected in ((sum_, x32 + y32), (product, x32 * y32), (quotient, x32 / y32)):
            expected = expected.astype(dtype)
            nan = np.isnan(expected.astype(np.float32))
            assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
            assert np.array_equal(bits(got)[~nan], bits(expected)[~nan])
    assert np.array_equal(less, (x32 < y32).astype(np.int32))


def test_a_16_bit_parameter_takes_only_its_dtype():
    with open(FIXTURE) as f:
        module = kr.compile_module(f.read(), EXPRESSIONS, kernels.compile_options(FIXTURE))
    kernel = module.kernel("scale_add<__half>")
    assert [p.ctype for p in kernel.params] == ["const __half*", "__half*", "float", "long long"]
    assert module.kernel("scale_add<__nv_bfloat16>").params[1].dtype == BF16
    y = np.zeros(4, F16)
    with pytest.raises(TypeError, match=r"argument 0: the C parameter is const __half\*, but an array of "
                                        r"float32 is passed as float\*"):
        kr.marshal(kernel, (np.zeros(4, np.float32), y, np.float32(1), 4), **ARRAYS)
    with pytest.raises(TypeError, match=r"argument 1: the C parameter is __half\*, but an array of bfloat16"):
        kr.marshal(kernel, (y, np.zeros(4, BF16), np.float32(1), 4), **ARRAYS)
    with pytest.raises(TypeError, match="argument 2: the C parameter is float, but a Python float"):
        kr.marshal(kernel, (y, y, 1.0, 4), **ARRAYS)  # CuPy passes a Python float as a double


def test_a_float_and_double_kernel_refuses_16_bit_dtypes():
    from minidl import loss_scale  # read only: its kernel is float and double (the scale of a float32 loss)
    assert loss_scale.CU.types == kernels.FLOAT_TYPES
    assert all(e.endswith(("<float>", "<double>")) for e in loss_scale.CU.name_expressions())
    name = loss_scale.CU.names[0]
    for dtype in (np.float16, ml_dtypes.bfloat16):
        with pytest.raises(MinidlError) as raised:
            kernels.launch(loss_scale.CU, name, dtype, 4)
        message = str(raised.value)
        assert "\n" not in message and f"kernel {name} of loss_scale.cu" in message
        assert f"float32, float64, not {np.dtype(dtype)}" in message
    with pytest.raises(MinidlError, match="the CUDA kernels take float32, float64, float16, bfloat16, got int32"):
        kernels.launch(loss_scale.CU, name, np.int32, 4)
    with pytest.raises(MinidlError, match="no CUDA type for int8"):
        kernels.KernelFile.beside(__file__, "x.cu", ("k",), types=(np.float32, np.int8))


def test_a_16_bit_kernels_python_float_is_a_float():
    assert kernels.scalar_dtype(np.float16) == kernels.scalar_dtype(ml_dtypes.bfloat16) == np.float32
    assert kernels.scalar_dtype(np.float64) == np.float64 and kernels.scalar_dtype(np.float32) == np.float32
    cu = kernels.KernelFile.beside(FIXTURE, "half_axpy.cu", ("scale_add",), types=kernels.HALF_TYPES)
    assert cu == kernels.KernelFile(FIXTURE, ("scale_add",), kernels.HALF_TYPES)
    assert cu.name_expressions() == ("scale_add<float>", "scale_add<double>", "scale_add<__half>",
                                     "scale_add<__nv_bfloat16>")


# --- NVRTC, as CuPy 14 compiles it (its options, and -I the CUDA runtime headers)

def nvrtc_missing():
    try:
        nvrtc_check.find_libnvrtc()
        nvrtc_check.cuda_include_dir()
    except MinidlError as e:  # NvrtcUnavailable, CudaHeadersUnavailable
        return str(e)
    return None


@pytest.mark.skipif(nvrtc_missing() is not None, reason=str(nvrtc_missing()))
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "compute_90"])
def test_nvrtc_compiles_the_16_bit_fixture_like_cupy(arch):
    lowered = nvrtc_check.compile_like_cupy(FIXTURE, EXPRESSIONS, arch=arch,
                                            extra_options=kernels.include_options(FIXTURE))
    assert set(lowered) == set(EXPRESSIONS)
    # the Itanium mangling of scale_add<T>: _Z9scale_addI <T> E, __half and __nv_bfloat16 as class names
    for c_type, code in (("float", "f"), ("__half", "6__half"), ("__nv_bfloat16", "13__nv_bfloat16")):
        assert lowered[f"scale_add<{c_type}>"].startswith(f"_Z9scale_addI{code}E")


@pytest.mark.skipif(nvrtc_missing() is not None, reason=str(nvrtc_missing()))
def test_nvrtc_needs_the_cuda_headers_for_the_fixture(monkeypatch):
    monkeypatch.setattr(nvrtc_check, "cuda_header_options", lambda: ())
    with pytest.raises(nvrtc_check.NvrtcCompileError, match="cuda_bf16.h"):
        nvrtc_check.compile_like_cupy(FIXTURE, EXPRESSIONS, extra_options=kernels.include_options(FIXTURE))


# --- through minidl.kernels on (emulated) GPUs

def emulated():
    return bool(os.environ.get("MINIDL_EMULATE_GPUS"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALVES + [pytest.param(np.dtype(np.float32), id="float32")])
def test_scale_add_launches_on_16_bit_arrays(dtype, rng):
    from minidl.device import cupy
    cp = cupy()
    n = int(rng.integers(1000, 3000))
    x_host = rng.standard_normal(n).astype(dtype)
    y_host = (rng.standard_normal(n) * 4).astype(dtype)
    a = float(rng.standard_normal())  # a Python float: packed as float32 for every one of these kernels
    x, y = cp.asarray(x_host), cp.asarray(y_host)
    kernels.launch(CU, "scale_add", dtype, n, x, y, a, n)
    got = cp.asnumpy(y)
    assert got.dtype == dtype
    x32, y32 = x_host.astype(np.float32), y_host.astype(np.float32)
    expected = (x32 * np.float32(a) + y32).astype(dtype)
    if emulated():  # g++ does not contract x * a + y into an FMA
        assert np.array_equal(bits(got), bits(expected))
    else:  # NVRTC contracts it: either rounding is right
        fused = (x32.astype(np.float64) * np.float32(a) + y32).astype(np.float32).astype(dtype)
        assert np.all((bits(got) == bits(expected)) | (bits(got) == bits(fused)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALVES)
def test_16_bit_arrays_on_the_device(dtype, rng):
    from minidl.device import cupy
    cp = cupy()
    host = rng.standard_normal((3, 5)).astype(dtype)
    device = cp.asarray(host)
    assert device.dtype == dtype and np.array_equal(bits(cp.asnumpy(device)), bits(host))
    assert np.array_equal(bits(cp.asnumpy(device.astype(np.float32))), bits(host.astype(np.float32)))
    assert cp.asnumpy(cp.asarray(host.astype(np.float32)).astype(dtype)).dtype == dtype
    assert np.array_equal(bits(cp.asnumpy(device.copy())), bits(host))
    assert np.all(cp.asnumpy(cp.zeros((2, 2), dtype=dtype)).astype(np.float32) == 0)
    assert cp.empty((4,), dtype=dtype).dtype == dtype


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("transposed", [False, True], ids=["plain", "transposed"])
def test_a_2d_16_bit_gemm_computes_in_float32_and_rounds_once(dtype, transposed, rng):
    if not emulated():
        pytest.skip("the emulator's GEMM (cuBLAS sums in its own order)")
    from minidl.device import cupy
    from minidl_emulator.ledger import LEDGER
    cp = cupy()
    a_host = rng.standard_normal((37, 300)).astype(dtype)
    b_host = rng.standard_normal((53, 300) if transposed else (300, 53)).astype(dtype)
    a, b = cp.asarray(a_host), cp.asarray(b_host)
    mark = LEDGER.mark()
    product = a @ (b.T if transposed else b)
    gemms = [e for e in LEDGER.since(mark) if e.kind == "gemm"]
    expected = (a_host.astype(np.float32) @ (b_host.T if transposed else b_host).astype(np.float32)).astype(dtype)
    assert product.dtype == dtype
    assert np.array_equal(bits(cp.asnumpy(product)), bits(expected))
    assert [(e.unit, e.flops) for e in gemms] == [("fp16" if dtype == F16 else "bf16", 2 * 37 * 53 * 300)]
    # batched (ndim 3): upcast to float32, one FP32 GEMM, then cast back
    stacked_a, stacked_b = np.stack([a_host] * 2), np.stack([b_host.T if transposed else b_host] * 2)
    batched = cp.asnumpy(cp.matmul(cp.asarray(stacked_a), cp.asarray(stacked_b)))
    expected = np.matmul(stacked_a.astype(np.float32), stacked_b.astype(np.float32)).astype(dtype)
    assert batched.dtype == dtype and np.array_equal(bits(batched), bits(expected))
