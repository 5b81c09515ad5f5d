"""The CUDA kernels of issue 27's fixes against their NumPy paths, on fresh random inputs:
im2col/col2im with 32-bit index arithmetic (bit-identical results), lrn_backward with one
power per channel, max pooling that propagates NaN as PyTorch does, and the loss kernel
with a warp per row, and ReLU's backward kernels that also sum the bias's gradient (activation.cu). The kernels run on the emulator's runner with NumPy arrays (small
grids, so the grid-stride loops turn) and, marked gpu, through the functions on a GPU."""
import os

import numpy as np
import pytest

import minidl
from minidl import Tensor, kernels
from minidl.functions import activation, conv, lrn, max_pool2d, pooling, softmax_cross_entropy
from minidl_emulator import kernel_runner as kr

ARRAYS = dict(is_array=lambda a: isinstance(a, np.ndarray), array_dtype=lambda a: a.dtype,
              array_address=lambda a: a.ctypes.data)
CUDA = {np.float32: "float", np.float64: "double"}
DTYPES = [np.float32, np.float64]


def run(cu, name, dtype, args, grid=(3, 1, 1), block=(8, 1, 1)):
    """name<T> of the KernelFile `cu`, compiled as kernels.get_kernel compiles it, on NumPy arrays."""
    with open(cu.path) as f:
        module = kr.compile_module(f.read(), cu.name_expressions(), kernels.compile_options(cu.path))
    kernel = module.kernel(f"{name}<{CUDA[dtype]}>")
    kernel.run(grid, block, kr.marshal(kernel, tuple(args), **ARRAYS))


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh inputs every run


# --- im2col and col2im

CONV_SHAPES = [  # (N, C, H, W), (KH, KW), stride, pad
    ((2, 3, 7, 6), (3, 3), 2, 1), ((3, 2, 9, 11), (5, 5), 1, 2), ((1, 4, 15, 13), (11, 11), 4, 0),
    ((2, 3, 8, 8), (2, 3), 3, 1), ((2, 5, 4, 5), (1, 1), 1, 0),
]


def col2im_in_kernel_order(cols, h, w, stride, pad):
    """col2im's sums added in the kernel's order (oh, then ow, ascending: the offsets descending)."""
    c, kh, kw, n, oh, ow = cols.shape
    out = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=cols.dtype)
    for i in reversed(range(kh)):
        for j in reversed(range(kw)):
            out[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += cols[:, i, j].transpose(1, 0, 2, 3)
    return out[:, :, pad:pad + h, pad:pad + w]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, pad", CONV_SHAPES, ids=str)
@pytest.mark.parametrize("grid, block", [((3, 1, 1), (8, 1, 1)), ((64, 1, 1), (32, 1, 1))], ids=["small", "wide"])
def test_im2col_and_col2im_are_exact(dtype, shape, kernel, stride, pad, grid, block, rng):
    (n, c, h, w), (kh, kw) = shape, kernel
    oh, ow = conv.output_size(h, kh, stride, pad), conv.output_size(w, kw, stride, pad)
    x = rng.standard_normal(shape).astype(dtype)
    cols = np.full((c, kh, kw, n, oh, ow), np.nan, dtype=dtype)
    sizes = lambda total: [total, n, c, h, w, kh, kw, stride, pad, oh, ow]  # noqa: E731  Python ints: long long
    run(conv.CU, "im2col", dtype, [x, cols, *sizes(cols.size)], grid, block)
    np.testing.assert_array_equal(cols, conv.im2col_cpu(x, kh, kw, stride, pad, oh, ow))

    patches = rng.standard_normal(cols.shape).astype(dtype)
    back = np.full(shape, np.nan, dtype=dtype)
    run(conv.CU, "col2im", dtype, [patches, back, *sizes(back.size)], grid, block)
    np.testing.assert_array_equal(back, col2im_in_kernel_order(patches, h, w, stride, pad))  # bit for bit
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(back, conv.col2im_cpu(patches, h, w, stride, pad), **tolerance)


DIVIDE = r"""
#include "window.cuh"
__global__ void divide_all(const long long* a, const long long* b, long long* q, long long* r, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        QuotientRemainder d = divide(a[i], b[i]);
        q[i] = d.quotient;
        r[i] = d.remainder;
    }
}
"""


def test_divide_is_exact_on_both_sides_of_32_bits(rng):
    edges = [0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 32 + 1, 2 ** 40 + 12345, 2 ** 62 + 7]
    a = np.array(edges + list(rng.integers(0, 2 ** 62, 200)) + list(rng.integers(0, 2 ** 32, 200)), dtype=np.int64)
    b = np.concatenate([rng.integers(1, 2 ** 33, a.size // 2), rng.integers(1, 100, a.size - a.size // 2)])
    b = rng.permutation(np.concatenate([b[:-3], [1, 2 ** 32 - 1, 2 ** 32]])).astype(np.int64)
    q, r = np.full(a.shape, -1, dtype=np.int64), np.full(a.shape, -1, dtype=np.int64)
    folder = os.path.dirname(conv.CU.path)
    kernel = kr.compile_module(DIVIDE, ("divide_all",), (f"-I{folder}",)).kernel("divide_all")
    kernel.run((2, 1, 1), (16, 1, 1), kr.marshal(kernel, (a, b, q, r, a.size), **ARRAYS))
    np.testing.assert_array_equal(q, a // b)
    np.testing.assert_array_equal(r, a % b)


# --- LRN's backward, one power a channel (a ring of them up to 15 channels, computed again beyond)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, channels", [(1, 4), (5, 3), (5, 11), (15, 20), (17, 23), (21, 9)])
def test_lrn_backward_matches_numpy(dtype, n, channels, rng):
    x = (rng.standard_normal((2, channels, 3, 5)) * 2).astype(dtype)
    gy = rng.standard_normal(x.shape).astype(dtype)
    alpha, k, beta = rng.uniform(1e-3, 5e-2), rng.uniform(1.0, 3.0), rng.uniform(0.5, 0.9)
    function = lrn.LocalResponseNorm(n=n, k=k, alpha=alpha, beta=beta, alpha_over_n=False)
    function.forward_cpu(x)
    s = function.saved[1]
    expected = function.backward_cpu(gy)
    gx = np.full(x.shape, np.nan, dtype=dtype)
    t = np.dtype(dtype).type
    run(lrn.CU, "lrn_backward", dtype, [x, s, gy, gx, 2 * 3 * 5, channels, 3 * 5, n // 2, t(k), t(alpha), t(beta)])
    tolerance = dict(rtol=2e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(gx, expected, **tolerance)


# --- max pooling: a NaN is its window's maximum, the first NaN in scan order

def pool_reference(x, k, stride, pad):
    """Per window: the max (NaN if any element is NaN) and its offset kh*k + kw (the first max, or first NaN)."""
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    n, c, h, w = padded.shape
    oh, ow = (h - k) // stride + 1, (w - k) // stride + 1
    y, offset = np.empty((n, c, oh, ow), dtype=x.dtype), np.empty((n, c, oh, ow), dtype=np.int32)
    for index in np.ndindex(n, c, oh, ow):
        a, b, i, j = index
        window = padded[a, b, i * stride:i * stride + k, j * stride:j * stride + k].ravel()
        offset[index] = np.argmax(window)  # the first NaN where there is one, else the first maximum
        y[index] = window[offset[index]]
    return y, offset


def gradient_reference(offset, gy, shape, k, stride, pad):
    n, c, h, w = shape
    g = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=gy.dtype)
    for index in np.ndindex(*offset.shape):
        a, b, i, j = index
        r, q = divmod(int(offset[index]), k)
        g[a, b, i * stride + r, j * stride + q] += gy[index]
    return g[:, :, pad:pad + h, pad:pad + w]


def with_nans(rng, shape, dtype, count, k, stride, pad):
    """Distinct values (no ties) and `count` NaNs where windows read them (not in the gaps between windows)."""
    x = rng.permutation(int(np.prod(shape))).reshape(shape).astype(dtype) * dtype(0.01) - dtype(3)
    read = np.zeros((shape[2] + 2 * pad, shape[3] + 2 * pad), dtype=bool)
    for i in range(0, read.shape[0] - k + 1, stride):
        for j in range(0, read.shape[1] - k + 1, stride):
            read[i:i + k, j:j + k] = True
    read = np.broadcast_to(read[pad:pad + shape[2], pad:pad + shape[3]], shape)
    x[np.unravel_index(rng.choice(np.flatnonzero(read), count, replace=False), shape)] = np.nan
    return x


POOLS = [((2, 3, 9, 11), 3, 2, 0), ((2, 2, 8, 8), 3, 2, 1), ((1, 3, 10, 9), 2, 3, 0), ((2, 2, 7, 7), 4, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, k, stride, pad", POOLS, ids=str)
@pytest.mark.parametrize("nans", [0, 1, 5, 40])
def test_max_pool_kernel_and_numpy_propagate_nan_alike(dtype, shape, k, stride, pad, nans, rng):
    x = with_nans(rng, shape, dtype, nans, k, stride, pad)
    y_ref, offset_ref = pool_reference(x, k, stride, pad)
    gy = rng.uniform(0.5, 2.0, y_ref.shape).astype(dtype)
    if nans:
        assert np.isnan(y_ref).any()

    function = pooling.MaxPool2d(k, stride, pad)
    y_cpu = function.forward_cpu(x)
    np.testing.assert_array_equal(y_cpu, y_ref)  # NaN where NaN
    g_ref = gradient_reference(offset_ref, gy, shape, k, stride, pad)
    np.testing.assert_allclose(function.backward_cpu(gy), g_ref, rtol=1e-6)

    y = np.full(y_ref.shape, -7.0, dtype=dtype)
    offset = np.full(y_ref.shape, -7, dtype=np.int32)
    oh, ow = y.shape[2:]
    sizes = [y.size, shape[1], shape[2], shape[3], oh, ow, k, stride, pad]
    run(pooling.CU, "max_pool_forward", dtype, [x, y, offset, *sizes])
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(offset, offset_ref)
    gx = np.full(shape, np.nan, dtype=dtype)
    sizes[0] = gx.size
    run(pooling.CU, "max_pool_backward", dtype, [gy, offset, gx, *sizes])
    np.testing.assert_allclose(gx, g_ref, rtol=1e-6)


def test_a_nan_anywhere_in_a_window_is_its_maximum():
    for position in range(9):  # each place of a 3x3 window, and a second NaN after it
        x = np.arange(9, dtype=np.float64).reshape(1, 1, 3, 3)
        x.ravel()[position] = np.nan
        if position < 8:
            x.ravel()[8] = np.nan
        function = pooling.MaxPool2d(3, 1, 0)
        assert np.isnan(function.forward_cpu(x)).all()
        gx = function.backward_cpu(np.ones((1, 1, 1, 1)))
        assert gx.ravel()[position] == 1.0 and gx.sum() == 1.0  # the first NaN takes the gradient


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nans", [0, 7])
def test_max_pool_on_a_gpu_agrees_with_the_cpu(dtype, nans, rng):
    x = with_nans(rng, (2, 3, 13, 13), dtype, nans, 3, 2, 1)
    results = []
    for device in ("cpu", "cuda:0"):
        xt = Tensor(x, requires_grad=True, device=device)
        y = max_pool2d(xt, 3, 2, pad=1)
        y.backward(Tensor(np.linspace(1, 2, y.size, dtype=dtype).reshape(y.shape), device=device))
        results.append((y.numpy(), xt.grad.numpy()))
    (y_cpu, g_cpu), (y_gpu, g_gpu) = results
    np.testing.assert_array_equal(y_gpu, y_cpu)
    np.testing.assert_array_equal(g_gpu != 0, g_cpu != 0)  # the same elements chosen
    np.testing.assert_allclose(g_gpu, g_cpu, rtol=1e-6)  # summed in another order
    assert np.isnan(y_cpu).any() == bool(nans)


# --- the loss: a warp per row

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, classes", [(1, 1), (5, 37), (70, 1000), (300, 3)])
@pytest.mark.parametrize("grid, block", [((3, 1, 1), (64, 1, 1)), ((1000, 1, 1), (256, 1, 1))], ids=["few", "many"])
def test_log_softmax_nll_matches_numpy(dtype, rows, classes, grid, block, rng):
    from minidl.functions import loss
    logits = (rng.standard_normal((rows, classes)) * 5 + rng.uniform(-50, 50, (rows, 1))).astype(dtype)
    labels = rng.integers(0, classes, rows).astype(np.int32)
    labels[0] = classes  # out of range: that row's loss is NaN
    log_p = np.full(logits.shape, np.nan, dtype=dtype)
    labels[1:rows // 2] = logits[1:rows // 2].argmax(axis=1)  # half the rows right, for the top-1 flags
    row_loss, row_top1 = np.full(rows, -7.0, dtype=dtype), np.full(rows, -7.0, dtype=dtype)
    run(loss.CU, "log_softmax_nll", dtype, [logits, labels, log_p, row_loss, row_top1, rows, classes], grid, block)
    expected = loss.log_softmax_array(np, logits)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(log_p, expected, **tolerance)
    assert np.isnan(row_loss[0])
    np.testing.assert_array_equal(row_loss[1:], -log_p[np.arange(1, rows), labels[1:]])  # the same arithmetic
    np.testing.assert_array_equal(row_top1, logits.argmax(axis=1) == labels)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_nll_top1_takes_argmax_first_maximum_and_nan(dtype):
    """Ties go to the first maximum, and a NaN scores highest, as argmax rules; one row each way."""
    from minidl.functions import loss
    logits = np.array([[1, 5, 5, 2], [5, 5, 1, 2], [1, np.nan, 9, 2], [np.nan, 3, 9, np.nan],
                       [-np.inf, -np.inf, -np.inf, -3]], dtype=dtype)
    rows, classes = logits.shape
    for labels in ([1, 1, 2, 0, 3], [2, 0, 1, 2, 0]):
        labels = np.array(labels, dtype=np.int32)
        log_p, row_loss = np.empty_like(logits), np.empty(rows, dtype)
        row_top1 = np.full(rows, -7.0, dtype=dtype)
        run(loss.CU, "log_softmax_nll", dtype, [logits, labels, log_p, row_loss, row_top1, rows, classes],
            (2, 1, 1), (64, 1, 1))
        np.testing.assert_array_equal(row_top1, logits.argmax(axis=1) == labels)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_on_a_gpu_agrees_with_the_cpu(dtype, rng):
    logits = (rng.standard_normal((45, 300)) * 4).astype(dtype)
    labels = rng.integers(0, 300, 45)
    labels[:17] = logits[:17].argmax(axis=1)  # 17 rows right
    results = []
    for device in ("cpu", "cuda:0"):
        z = Tensor(logits, requires_grad=True, device=device)
        value, top1 = softmax_cross_entropy(z, labels, top1=True)
        value.backward()
        results.append((value.item(), z.grad.numpy(), top1.get() if hasattr(top1, "get") else top1))
    (loss_cpu, g_cpu, top1_cpu), (loss_gpu, g_gpu, top1_gpu) = results
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(loss_gpu, loss_cpu, rtol=rtol)
    np.testing.assert_allclose(g_gpu, g_cpu, rtol=rtol, atol=rtol * 1e-3)
    expected = (logits.argmax(axis=1) == labels).mean()
    assert top1_cpu.shape == top1_gpu.shape == (1,) and 17 <= round(expected * 45) < 45
    np.testing.assert_allclose([top1_cpu[0], top1_gpu[0]], expected, rtol=1e-6)


@pytest.mark.gpu
def test_a_kernel_object_is_made_once_per_file_gpu_name_and_type():
    from minidl.functions.pooling import CU
    with minidl.device("cuda:0"):
        first = kernels.get_kernel(CU, "max_pool_forward", np.float32)
        assert kernels.get_kernel(CU, "max_pool_forward", np.float32) is first
        assert kernels.get_kernel(CU, "max_pool_forward", np.float64) is not first
        assert kernels.get_kernel(CU, "max_pool_backward", np.float32) is not first


# --- ReLU's backward with the bias's gradient in the same launch (activation.cu, last_of_group)

def away_from_zero(rng, shape, dtype):
    """Random magnitudes in [0.1, 2), random signs (no zeros: y > 0 is never a tie)."""
    return (rng.uniform(0.1, 2.0, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)


def in_order(a, axis):
    """a summed along `axis` one term after another, in a's dtype: the kernels' order (np.sum's is pairwise)."""
    return np.take(np.cumsum(a, axis=axis), -1, axis=axis)


def run_with_bias(name, dtype, args, outputs, counters, grid, block):
    """Run `name` on NumPy arrays; its outputs (the arrays in `outputs`, all NaN before) and a check that every
    counter is 0 again."""
    for out in outputs:
        out.fill(np.nan)
    run(activation.CU, name, dtype, args, grid, block)
    assert not counters.any()  # the last of each group reset its counter: ready for the next launch
    return [out.copy() for out in outputs]


GRIDS = [((3, 1, 1), (32, 1, 1)), ((7, 1, 1), (64, 1, 1)), ((400, 1, 1), (256, 1, 1))]  # loops turn; a thread each
CNL_SHAPES = [(3, 5, 6, 7), (1, 1, 1, 1), (2, 1, 5, 9), (4, 3, 8, 8), (5, 2, 1, 3), (1, 4, 13, 13)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CNL_SHAPES, ids=str)
def test_relu_backward_to_cnl_sums_the_bias_in_its_order_the_same_bits_on_every_grid(dtype, shape, rng):
    n, c, h, w = shape
    l = h * w
    y, gy = away_from_zero(rng, shape, dtype), away_from_zero(rng, shape, dtype)
    g, gb = np.empty((c, n * l), dtype), np.empty(c, dtype)
    partials, counters = np.empty(c * n * 33, dtype), np.zeros(c * n + c, np.uint32)
    args = (y, gy, g, gb, partials, counters, n, c, l, c * n * 32)
    results = [run_with_bias("relu_backward_nchw_to_cnl", dtype, args, (g, gb), counters, grid, block)
               for grid, block in GRIDS]
    expected = (gy * (y > 0)).transpose(1, 0, 2, 3).reshape(c, n, l)
    np.testing.assert_array_equal(results[0][0], expected.reshape(c, n * l))
    # thread (c, n, j) adds l = j, j + 32, ...; the last of (c, n)'s 32 adds their sums, the last of c's N those
    padded = np.concatenate([expected, np.zeros((c, n, -l % 32), dtype)], axis=2).reshape(c, n, -1, 32)
    np.testing.assert_array_equal(results[0][1], in_order(in_order(in_order(padded, 2), 2), 1))
    for other in results[1:]:  # whichever thread finishes a group last, the same bits
        for got, first in zip(other, results[0]):
            np.testing.assert_array_equal(got, first)


ROWS_SHAPES = [(5, 7), (1, 1), (128, 33), (9, 3), (4, 1), (13, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, features", ROWS_SHAPES, ids=str)
@pytest.mark.parametrize("scale", [1.0, 1.0 / 0.7])
def test_relu_backward_bias_rows_sums_the_bias_in_its_order_the_same_bits_on_every_grid(dtype, rows, features,
                                                                                         scale, rng):
    per = activation.ROWS_PER_THREAD
    chunks = -(-rows // per)
    y, gy = away_from_zero(rng, (rows, features), dtype), away_from_zero(rng, (rows, features), dtype)
    gx, gb = np.empty((rows, features), dtype), np.empty(features, dtype)
    partials, counters = np.empty(chunks * features, dtype), np.zeros(features, np.uint32)
    args = (y, gy, gx, gb, partials, counters, rows, features, per, chunks * features, dtype(scale))
    results = [run_with_bias("relu_backward_bias_rows", dtype, args, (gx, gb), counters, grid, block)
               for grid, block in GRIDS]
    expected = gy * np.where(y > 0, dtype(scale), dtype(0))
    np.testing.assert_array_equal(results[0][0], expected)
    # thread (k, f) adds rows k * per, ... of feature f; the last of f's chunks adds their sums
    padded = np.concatenate([expected, np.zeros((chunks * per - rows, features), dtype)]).reshape(chunks, per, -1)
    np.testing.assert_array_equal(results[0][1], in_order(in_order(padded, 1), 0))
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            np.testing.assert_array_equal(got, first)


@pytest.mark.gpu
def test_relu_backward_of_an_empty_batch_gives_zero_bias_gradients():
    """No (channel, sample) thread to add anything: the bias gradients are the empty sums, zeros, as NumPy's."""
    from minidl.functions import activation
    with minidl.device("cuda:0") as dev:
        y = dev.xp.ones((0, 3, 4, 4), np.float32)
        g, gb = activation.relu_grad_to_cnl(y, y)
        assert g.shape == (3, 0) and gb.get().tolist() == [0, 0, 0]
        rows = dev.xp.ones((0, 5), np.float32)
        g, gb = activation.relu_grad_rows(rows, rows)
        assert g.shape == (0, 5) and gb.get().tolist() == [0] * 5
