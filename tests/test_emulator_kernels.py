"""The emulator's kernel runner: minidl's unchanged .cu kernels compiled by g++ and run on the CPU.

Plain NumPy arrays stand in for device arrays here. The compiled libraries are
cached (in minidl's cache folder), so only a first run waits for g++.
"""
import os

import numpy as np
import pytest

from minidl import kernels
from minidl_emulator import kernel_runner as kr
from minidl.functions import conv, lrn, pooling

ARRAYS = dict(is_array=lambda a: isinstance(a, np.ndarray), array_dtype=lambda a: a.dtype,
              array_address=lambda a: a.ctypes.data)
CUDA = {np.float32: "float", np.float64: "double"}
SOURCES = {os.path.basename(m.CU.path): m.CU for m in (conv, lrn, pooling)}
KERNELS = {file: cu.names for file, cu in SOURCES.items()}


def module(file):
    """A .cu file of minidl compiled as kernels.get_kernel compiles it: each kernel for float and double."""
    cu = SOURCES[file]
    with open(cu.path) as f:
        return kr.compile_module(f.read(), cu.name_expressions(), kernels.compile_options(cu.path))


def launch(file, name, dtype, args, grid=(3, 1, 1), block=(4, 1, 1)):
    """Run name<T>; the default grid has fewer threads than any test's work, so the grid-stride loop runs."""
    kernel = module(file).kernel(f"{name}<{CUDA[dtype]}>")
    kernel.run(grid, block, kr.marshal(kernel, tuple(args), **ARRAYS))


@pytest.fixture
def rng():
    return np.random.default_rng(7)


TOLERANCE = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


# --- minidl's kernels against the NumPy paths


@pytest.mark.parametrize("file", sorted(KERNELS))
def test_every_kernel_source_compiles_unchanged(file):
    for name in KERNELS[file]:
        for t in CUDA.values():
            assert module(file).kernel(f"{name}<{t}>").params[0].ctype == f"const {t}*"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grid, block", [((3, 1, 1), (4, 1, 1)), ((5, 1, 1), (32, 1, 1))])
def test_im2col_and_col2im_match_numpy(dtype, grid, block, rng):
    x = rng.standard_normal((2, 3, 7, 6)).astype(dtype)
    kh = kw = 3
    stride, pad = 2, 1
    oh, ow = conv.output_size(7, kh, stride, pad), conv.output_size(6, kw, stride, pad)
    sizes = lambda total: [np.int64(v) for v in (total, 2, 3, 7, 6, kh, kw, stride, pad, oh, ow)]  # noqa: E731
    cols = np.full((3, kh, kw, 2, oh, ow), np.nan, dtype=dtype)
    launch("conv.cu", "im2col", dtype, [x, cols, *sizes(cols.size)], grid, block)
    np.testing.assert_array_equal(cols, conv.im2col_cpu(x, kh, kw, stride, pad, oh, ow))

    back = np.full(x.shape, np.nan, dtype=dtype)
    launch("conv.cu", "col2im", dtype, [cols, back, *sizes(x.size)], grid, block)
    np.testing.assert_allclose(back, conv.col2im_cpu(cols, 7, 6, stride, pad), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lrn_matches_numpy(dtype, rng):
    x = rng.standard_normal((2, 7, 3, 4)).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    function = lrn.LocalResponseNorm(n=5, k=2.0, alpha=1e-2, beta=0.75, alpha_over_n=False)
    expected_y = function.forward_cpu(x)
    expected_s = function.saved[1]
    expected_gx = function.backward_cpu(gy)

    t = dtype
    sizes = [np.int64(2 * 3 * 4), np.int64(7), np.int64(3 * 4), np.int64(2), t(2.0), t(1e-2), t(0.75)]
    y, s, gx = (np.full(x.shape, np.nan, dtype=dtype) for _ in range(3))
    launch("lrn.cu", "lrn_forward", dtype, [x, y, s, *sizes])
    np.testing.assert_allclose(y, expected_y, **TOLERANCE[dtype])
    np.testing.assert_allclose(s, expected_s, **TOLERANCE[dtype])
    launch("lrn.cu", "lrn_backward", dtype, [x, s, gy, gx, *sizes])
    np.testing.assert_allclose(gx, expected_gx, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_forward_matches_numpy(dtype, rng):
    x = rng.standard_normal((2, 3, 7, 7)).astype(dtype)
    expected = pooling.MaxPool2d(ksize=3, stride=2, pad=1).forward_cpu(x)
    y = np.full(expected.shape, np.nan, dtype=dtype)
    argmax = np.full(expected.shape, -7, dtype=np.int32)
    sizes = [np.int64(v) for v in (y.size, 3, 7, 7, 4, 4, 3, 2, 1)]
    launch("pooling.cu", "max_pool_forward", dtype, [x, y, argmax, *sizes])
    np.testing.assert_array_equal(y, expected)
    assert ((argmax >= 0) & (argmax < 9)).all()


# --- launches: every block and thread, in three dimensions

COORDINATES = r"""
__global__ void coordinates(int* out, int* sizes) {
    unsigned int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y,
                 z = blockIdx.z * blockDim.z + threadIdx.z;
    unsigned int width = gridDim.x * blockDim.x, height = gridDim.y * blockDim.y;
    out[(z * height + y) * width + x] = threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z + 1000 * blockIdx.x
                                        + 10000 * blockIdx.y + 100000 * blockIdx.z;
    if (x == 0 && y == 0 && z == 0) {
        sizes[0] = gridDim.x; sizes[1] = gridDim.y; sizes[2] = gridDim.z;
        sizes[3] = blockDim.x; sizes[4] = blockDim.y; sizes[5] = blockDim.z;
    }
}
"""


def run_coordinates(grid, block, times=1):
    """The kernel's output and sizes, and the output expected from the block and thread of each element."""
    out = np.full((grid[2] * block[2], grid[1] * block[1], grid[0] * block[0]), -1, dtype=np.int32)
    sizes = np.zeros(6, dtype=np.int32)
    kernel = kr.compile_module(COORDINATES, ("coordinates",)).kernel("coordinates")
    for _ in range(times):
        kernel.run(grid, block, kr.marshal(kernel, (out, sizes), **ARRAYS))
    z, y, x = np.indices(out.shape)
    (bx, tx), (by, ty), (bz, tz) = divmod(x, block[0]), divmod(y, block[1]), divmod(z, block[2])
    return out, sizes.tolist(), tx + 10 * ty + 100 * tz + 1000 * bx + 10000 * by + 100000 * bz


def test_a_3d_grid_runs_every_block_and_thread():
    out, sizes, expected = run_coordinates((3, 2, 2), (4, 3, 2))
    np.testing.assert_array_equal(out, expected)
    assert sizes == [3, 2, 2, 4, 3, 2]


def test_launches_from_two_threads_at_once_keep_their_own_indices():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:  # ctypes lets go of the GIL: the two run side by side
        results = list(pool.map(lambda grid: run_coordinates(grid, (32, 8, 1), times=3), [(64, 32, 1), (32, 16, 4)]))
    for (out, sizes, expected), grid in zip(results, [(64, 32, 1), (32, 16, 4)]):
        np.testing.assert_array_equal(out, expected)
        assert sizes == [*grid, 32, 8, 1]


def test_a_launch_beyond_cuda_limits_is_refused():
    kernel = kr.compile_module(COORDINATES, ("coordinates",)).kernel("coordinates")
    values = [0, 0]  # never used: the sizes are checked first
    with pytest.raises(ValueError, match="more than 1024 threads"):
        kernel.run((1, 1, 1), (32, 33, 1), values)
    with pytest.raises(ValueError, match="grid"):
        kernel.run((0, 1, 1), (1, 1, 1), values)


# --- marshalling: CuPy's rules, checked against the C parameter types


@pytest.fixture
def lrn_float():
    return module("lrn.cu").kernel("lrn_forward<float>")


def lrn_args(**replace):
    """Arguments for lrn_forward<float>(const float*, float*, float*, 4 x long long, 3 x float), some replaced."""
    x = np.zeros((1, 2, 2, 2), dtype=np.float32)
    args = [x, np.empty_like(x), np.empty_like(x), 4, 2, 4, 1, np.float32(2), np.float32(1e-4), np.float32(0.75)]
    for i, value in replace.items():
        args[int(i[1:])] = value
    return tuple(args)


def test_marshal_accepts_cupys_rules(lrn_float):
    args = lrn_args()
    values = kr.marshal(lrn_float, args, **ARRAYS)
    assert values[0] == args[0].ctypes.data and values[1] == args[1].ctypes.data
    assert type(values[3]) is np.int64 and values[3] == 4  # a Python int is a long long
    assert type(values[7]) is np.float32  # a NumPy scalar is its own dtype
    lrn_float.run((1, 1, 1), (8, 1, 1), values)
    np.testing.assert_allclose(args[2], 2.0)  # scale = k + alpha * 0


@pytest.mark.parametrize("position, value, message", [
    (7, 2.0, "argument 7: the C parameter is float, but a Python float is passed as double"),
    (3, np.int32(4), "argument 3: the C parameter is long long, but a numpy.int32 is passed as int"),
    (3, 4.0, "argument 3: the C parameter is long long, but a Python float is passed as double"),
    (3, True, "argument 3: the C parameter is long long, but a Python bool is passed as bool"),
    (0, np.zeros(8), r"argument 0: the C parameter is const float\*, but an array of float64 is passed as double\*"),
    (1, np.zeros(8, np.int32), r"argument 1: the C parameter is float\*, but an array of int32 is passed as int\*"),
    (4, np.zeros(8, np.int64), r"argument 4: the C parameter is long long, but an array of int64"),
    (0, 12345, r"argument 0: the C parameter is const float\*, but a Python int is passed as long long"),
    (8, [1.0], "argument 8: the C parameter is float, but a list cannot be a kernel argument"),
    (8, None, "argument 8: the C parameter is float, but a NoneType cannot be a kernel argument"),
    (3, 2 ** 63, "argument 3: the Python int 9223372036854775808 does not fit in long long"),
])
def test_marshal_refuses_a_mismatch(lrn_float, position, value, message):
    with pytest.raises(TypeError, match=f"kernel lrn_forward<float> {message}"):
        kr.marshal(lrn_float, lrn_args(**{f"a{position}": value}), **ARRAYS)


def test_marshal_refuses_a_wrong_count(lrn_float):
    with pytest.raises(TypeError, match="kernel lrn_forward<float> takes 10 arguments, 9 given"):
        kr.marshal(lrn_float, lrn_args()[:9], **ARRAYS)


def test_marshal_refuses_a_numpy_array_that_is_not_a_device_array(lrn_float):
    not_ours = dict(ARRAYS, is_array=lambda a: False)  # e.g. a NumPy array given to an emulated GPU
    with pytest.raises(TypeError, match="argument 0: .* numpy.ndarray cannot be a kernel argument"):
        kr.marshal(lrn_float, lrn_args(), **not_ours)


SCALARS = r"""
__global__ void scalars(bool flag, unsigned char* bytes, const int* counts, double* out, int n) {
    out[0] = flag ? bytes[0] + counts[0] + n : -1.0;
}
"""


def test_bool_int_and_byte_parameters():
    kernel = kr.compile_module(SCALARS, ("scalars",)).kernel("scalars")
    assert [p.ctype for p in kernel.params] == ["bool", "unsigned char*", "const int*", "double*", "int"]
    assert [(p.pointer, p.const) for p in kernel.params[1:3]] == [(True, False), (True, True)]
    out = np.zeros(1)
    args = (True, np.array([200], np.uint8), np.array([30], np.int32), out, np.int32(4))
    kernel.run((1, 1, 1), (1, 1, 1), kr.marshal(kernel, args, **ARRAYS))
    assert out[0] == 234
    with pytest.raises(TypeError, match="argument 0: the C parameter is bool, but a Python int is passed as long long"):
        kr.marshal(kernel, (1,) + args[1:], **ARRAYS)
    with pytest.raises(TypeError, match="argument 4: the C parameter is int, but a Python int is passed as long long"):
        kr.marshal(kernel, args[:4] + (4,), **ARRAYS)
    with pytest.raises(TypeError, match="argument 4: a numpy.int32 is needed"):  # run checks what it is given too
        kernel.run((1, 1, 1), (1, 1, 1), kr.marshal(kernel, args, **ARRAYS)[:4] + [np.int64(4)])


TABLES = r"""
__global__ void gather(const float* const* in, float* const* out, const unsigned long long* sizes, int n) {
    for (int k = 0; k < n; ++k)
        for (unsigned long long i = 0; i < sizes[k]; ++i) out[k][i] = 2 * in[k][i];
}
"""


def test_tables_of_pointers_are_arrays_of_addresses():
    kernel = kr.compile_module(TABLES, ("gather",)).kernel("gather")
    assert [p.ctype for p in kernel.params] == ["const float* const*", "float* const*",
                                                "const unsigned long long*", "int"]
    # a table's `const` is that of the arrays it points to: the first only read, the second written
    assert [(p.table, p.const) for p in kernel.params[:2]] == [(True, True), (True, False)]
    ins = [np.arange(3, dtype=np.float32), np.arange(5, dtype=np.float32)]
    outs = [np.zeros_like(a) for a in ins]
    table = lambda arrays: np.array([a.ctypes.data for a in arrays], dtype=np.uint64)  # noqa: E731
    args = (table(ins), table(outs), np.array([3, 5], dtype=np.uint64), np.int32(2))
    kernel.run((1, 1, 1), (1, 1, 1), kr.marshal(kernel, args, **ARRAYS))
    for a, b in zip(ins, outs):
        np.testing.assert_array_equal(b, 2 * a)
    with pytest.raises(TypeError, match=r"argument 0: the C parameter is const float\* const\*, but an array of "
                                        r"float32 is passed as float\*"):
        kr.marshal(kernel, (ins[0],) + args[1:], **ARRAYS)


def test_a_writable_table_is_refused_at_kernel():
    """float** would let the kernel change the table itself; minidl's tables are T* const*."""
    compiled = kr.compile_module("__global__ void k(float** x) {}\n", ("k",))
    with pytest.raises(TypeError, match="kernel k: parameter 0 has a type the emulator does not support"):
        compiled.kernel("k")


def test_an_unsupported_parameter_type_is_refused_at_kernel():
    compiled = kr.compile_module("struct S { int a; };\n__global__ void k(float* x, S s) {}\n", ("k",))
    with pytest.raises(TypeError, match="kernel k: parameter 1 has a type the emulator does not support"):
        compiled.kernel("k")


# --- compile errors


def test_syncthreads_and_shared_memory_are_compile_errors():
    source = ("template <typename T>\n__global__ void k(T* x) {\n    __syncthreads();\n}\n"
              "template __global__ void k<float>(float*);\n")
    with pytest.raises(kr.CompileError, match=r"source.cu:3:.*__syncthreads\(\) is not supported: the CUDA "
                                              r"emulator runs threads one after another"):
        kr.compile_module(source, ("k<float>",))
    with pytest.raises(kr.CompileError, match="__shared__ memory is not supported"):
        kr.compile_module("__global__ void k(float* x) {\n    __shared__ float tile[32];\n}\n", ("k",))


def test_a_compile_error_shows_gccs_diagnostics():
    with pytest.raises(kr.CompileError, match=r"source.cu:2:\d+: error: expected ';'"):
        kr.compile_module("__global__ void k(float* x) {\n    x[0] = 1\n}\n", ("k",))


def test_an_unknown_name_expression_is_a_compile_error_naming_it():
    with open(lrn.CU.path) as f:
        source = f.read()
    # (not `half`: lrn.cu includes cuda_fp16.h, which declares it)
    with pytest.raises(kr.CompileError, match=r"name expression lrn_forward<quarter>:.*error: .quarter. was not "
                                              r"declared"):
        kr.compile_module(source, ("lrn_forward<float>", "lrn_forward<quarter>"), kernels.compile_options(lrn.CU.path))
    with pytest.raises(kr.CompileError, match="name expression no_such_kernel<float>:"):
        kr.compile_module(source, ("no_such_kernel<float>",), kernels.compile_options(lrn.CU.path))


def test_kernel_wants_a_compiled_name_expression():
    with pytest.raises(ValueError, match="'lrn_forward<int>' is not one of the name expressions"):
        module("lrn.cu").kernel("lrn_forward<int>")


def test_min_is_ambiguous_where_nvcc_finds_it_ambiguous():
    with pytest.raises(kr.CompileError, match="ambiguous"):
        kr.compile_module("__global__ void k(long long* x, int i) {\n    x[0] = min(i, x[1]);\n}\n", ("k",))


# --- the cache


def test_a_second_compile_takes_the_cached_library(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDL_CACHE", str(tmp_path))
    monkeypatch.setattr(kr, "_modules", {})
    kr.compile_module(COORDINATES, ("coordinates",))
    (library,) = (tmp_path / "emulator").iterdir()
    built = library.stat().st_mtime_ns

    def no_compiler(*args, **kwargs):
        raise AssertionError(f"g++ ran again: {args}")
    monkeypatch.setattr(kr, "_modules", {})  # as a new process would: only the file is left
    monkeypatch.setattr(kr.subprocess, "run", no_compiler)
    kernel = kr.compile_module(COORDINATES, ("coordinates",)).kernel("coordinates")
    assert kernel.params[0].ctype == "int*"
    assert [p.name for p in (tmp_path / "emulator").iterdir()] == [library.name]  # no partial files left
    assert library.stat().st_mtime_ns == built


TWICE = '#include "twice.cuh"\n__global__ void k(long long* x) {\n    x[0] = twice(x[0]);\n}\n'


def test_include_folders_come_from_the_options_and_an_edited_header_recompiles(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kr, "_modules", {})
    header = tmp_path / "include" / "twice.cuh"
    header.parent.mkdir()
    header.write_text("__device__ inline long long twice(long long v) { return 2 * v; }\n")
    with pytest.raises(kr.CompileError, match="twice.cuh"):  # as with NVRTC: only the folders named are searched
        kr.compile_module(TWICE, ("k",))

    def run():
        x = np.array([21], dtype=np.int64)
        kernel = kr.compile_module(TWICE, ("k",), ("--std=c++14", f"-I{header.parent}")).kernel("k")
        kernel.run((1, 1, 1), (1, 1, 1), kr.marshal(kernel, (x,), **ARRAYS))
        return x[0]
    assert run() == 42
    header.write_text("__device__ inline long long twice(long long v) { return 3 * v; }\n")
    assert run() == 63  # the same source, but a new library: the header is part of the cache key


MATH = r"""
__device__ __forceinline__ float square(float v) { return v * v; }

__global__ void math(const float* __restrict__ x, float* __restrict__ y, double* z, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
        float v = x[i];
        y[i] = isnan(v) ? -1.0f : expf(v) + logf(fabs(v) + 1.0f) + sqrtf(square(v)) + rsqrtf(2.0f) + powf(2.0f, v)
                                  + fmaxf(v, 0.0f) + fminf(v, 0.0f) + max(v, 1.0f) + pow(v, 2);
        z[i] = exp((double)v) + pow((double)v, 2.0) + min(i, 3LL) + max(2u, 3u);
    }
}
"""


def test_device_math_functions():
    x = np.array([0.5, -2.0, 3.0, np.nan, 0.0], dtype=np.float32)
    y, z = np.empty_like(x), np.empty(5)
    kernel = kr.compile_module(MATH, ("math",)).kernel("math")
    kernel.run((2, 1, 1), (2, 1, 1), kr.marshal(kernel, (x, y, z, 5), **ARRAYS))
    v = x[[0, 1, 2, 4]].astype(np.float64)
    expected = (np.exp(v) + np.log(abs(v) + 1) + abs(v) + 2 ** -0.5 + 2 ** v + np.maximum(v, 0) + np.minimum(v, 0)
                + np.maximum(v, 1) + v ** 2)
    np.testing.assert_allclose(y[[0, 1, 2, 4]], expected, rtol=1e-6)
    assert y[3] == -1
    np.testing.assert_allclose(z[[0, 1, 2, 4]], np.exp(v) + v ** 2 + np.minimum([0, 1, 2, 4], 3) + 3, rtol=1e-12)


ATOMICS = """
__global__ void atomics(unsigned* inc, unsigned* add, int* signed_add, unsigned long long* wide, unsigned* old,
                        unsigned* last, long long total, unsigned wrap) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        old[i] = atomicInc(inc, wrap);
        atomicAdd(add, 2u);
        atomicAdd(signed_add, -3);
        atomicAdd(wide, 1ull << 40);
        __threadfence();
        if (old[i] == wrap) {
            atomicAdd(last, 1u);  // the last of each run of wrap + 1 arrivals
        }
    }
}
"""


def test_atomics_and_threadfence_as_cuda_defines_them():
    # atomicInc(p, v) stores (old >= v ? 0 : old + 1) and returns old: with v = n - 1 every n-th arrival finds
    # n - 1 and leaves 0, so a counter of n arrivals is zero again after them (activation.cu's last_of_group)
    inc, add, last = (np.zeros(1, np.uint32) for _ in range(3))
    signed_add, wide, old = np.zeros(1, np.int32), np.zeros(1, np.uint64), np.zeros(20, np.uint32)
    kernel = kr.compile_module(ATOMICS, ("atomics",)).kernel("atomics")
    kernel.run((2, 1, 1), (3, 1, 1), kr.marshal(kernel, (inc, add, signed_add, wide, old, last, 20, np.uint32(4)),
                                                **ARRAYS))
    np.testing.assert_array_equal(np.bincount(old), [4] * 5)  # 0, 1, ..., 4 four times, in the threads' order
    assert (inc[0], add[0], signed_add[0], wide[0], last[0]) == (0, 40, -60, 20 << 40, 4)
