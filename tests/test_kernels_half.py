"""minidl's own layer kernels on float16 and bfloat16 (issue 28): activation.cu, dropout.cu, conv.cu,
lrn.cu, pooling.cu and loss.cu, each launched through its Python wrapper on (emulated) GPUs with 16-bit
arrays, against a NumPy reference computed in float32 or float64 from the same 16-bit inputs and rounded
once to the 16-bit dtype at the end.

The kernels load T, compute in float and round once when they store (minidl/functions/half.cuh), so:
- exact (bit for bit) where the kernel rounds, once, a value that float computes exactly as the float32
  reference does: ReLU's backward, bias + ReLU (+ dropout), dropout, im2col, max pooling forward and
  backward (the backward's float sums are added in the reference's order);
- within 1 ulp of the 16-bit type where float's result may differ from the reference's in float's last
  bits (another summation order, libm's pow and exp against NumPy's float64): col2im, LRN and the loss's
  gradient. A float error of a few 2^-24 can move a value across a 16-bit rounding boundary only by one
  step of the 16-bit type (2^-11 relative for float16, 2^-8 for bfloat16).

Inputs are fresh random values every run, rounded to the 16-bit dtype first, without zeros (and without
ties, except in the test about ties). bfloat16 arrays cannot be Tensors yet (core.py's work, not this
one's), so the Functions' GPU paths are called directly (forward_gpu, backward_gpu) on cuda:0; float16 also
goes through the Function API once (test_float16_through_the_functions).
"""
import importlib

import ml_dtypes
import numpy as np
import pytest

from minidl import kernels
from minidl.device import cupy, device
from minidl.functions import activation, conv, loss, lrn, pooling

dropout = importlib.import_module("minidl.functions.dropout")  # the module (the package exports the function)

pytestmark = pytest.mark.gpu

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
HALVES = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16")]
GPU = "cuda:0"


@pytest.fixture
def gpu():
    dev = device(GPU)
    with dev:
        yield dev


def to_gpu(a):
    return cupy().asarray(np.ascontiguousarray(a))


def host(a):
    return cupy().asnumpy(a)


def f32(a):
    return np.asarray(a).astype(np.float32)


def away_from_zero(rng, shape, dtype, low=0.1, high=2.0):
    """Random magnitudes in [low, high), random signs, rounded to `dtype` (no zeros)."""
    return (rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)


def distinct(rng, shape, dtype):
    """Distinct values of `dtype` (no ties), magnitudes in [1/16, 16), random signs: a random choice of its
    bit patterns there."""
    lo, hi = (np.array([v], dtype=dtype).view(np.uint16)[0] for v in (1 / 16, 16))
    patterns = rng.choice(np.arange(lo, hi, dtype=np.uint16), int(np.prod(shape)), replace=False)
    patterns |= rng.choice(np.array([0, 0x8000], dtype=np.uint16), patterns.size)
    return patterns.view(dtype).reshape(shape)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint16)


def ordinal(a):
    """The 16-bit values in order, as integers: neighbours differ by one (+0 and -0 are both 0)."""
    b = bits(a).astype(np.int32)
    return np.where(b & 0x8000, -(b & 0x7fff), b)


def assert_exact(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(bits(got), bits(expected))


def assert_ulps(got, expected, ulps=1):
    """got within `ulps` steps of the 16-bit type of expected (both finite)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.all(np.isfinite(f32(got))) and np.all(np.isfinite(f32(expected)))
    distance = np.abs(ordinal(got) - ordinal(expected))
    assert distance.max() <= ulps, f"{int(distance.max())} ulps apart at {np.unravel_index(distance.argmax(), got.shape)}"


def test_the_layer_kernels_are_compiled_for_the_16_bit_types():
    for module in (activation, conv, dropout, loss, lrn, pooling):
        assert module.CU.types == kernels.HALF_TYPES
        assert {e[e.index("<"):] for e in module.CU.name_expressions()} == {
            "<float>", "<double>", "<__half>", "<__nv_bfloat16>"}


# --- activation.cu and dropout.cu: one float operation (or none) and one rounding: exact

@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("scale", [1.0, 1.0 / 0.7])
def test_relu_backward(dtype, scale, gpu, rng):
    y, gy = away_from_zero(rng, (37, 29), dtype), away_from_zero(rng, (37, 29), dtype)
    gx = host(activation.relu_grad(to_gpu(y), to_gpu(gy), scale))
    # scale is packed as a float32: the reference multiplies by the same float
    expected = (f32(gy) * np.where(f32(y) > 0, np.float32(scale), np.float32(0))).astype(dtype)
    assert_exact(gx, expected)


@pytest.mark.parametrize("dtype", HALVES)
def test_relu_backward_keeps_a_nan_gradient_where_y_is_negative(dtype, gpu, rng):
    y, gy = -np.abs(away_from_zero(rng, (64,), dtype)), away_from_zero(rng, (64,), dtype)
    gy[5] = np.nan
    gx = f32(host(activation.relu_grad(to_gpu(y), to_gpu(gy))))
    assert np.isnan(gx[5]) and np.all(gx[np.arange(64) != 5] == 0)


@pytest.mark.parametrize("dtype", HALVES)
def test_bias_relu_rows(dtype, gpu, rng):
    y, b = away_from_zero(rng, (23, 41), dtype), away_from_zero(rng, (41,), dtype)
    out = activation.bias_relu_rows(y_gpu := to_gpu(y), to_gpu(b))
    assert out is y_gpu  # in place
    assert_exact(host(out), np.maximum(f32(y) + f32(b), 0).astype(dtype))


@pytest.mark.parametrize("dtype", HALVES)
def test_bias_relu_dropout_rows_is_the_unfused_layers_bit_for_bit(dtype, gpu, rng):
    y, b = away_from_zero(rng, (23, 41), dtype), away_from_zero(rng, (41,), dtype)
    p, key, start = 0.4, int(rng.integers(0, 2 ** 62)), int(rng.integers(0, 10 ** 6))
    fused = host(activation.bias_relu_rows(to_gpu(y), to_gpu(b), dropout=(p, key, start)))
    # the ReLU's value rounded to the dtype, then times the float32 mask, rounded again: as the two layers
    relu = np.maximum(f32(y) + f32(b), 0).astype(dtype)
    expected = (f32(relu) * dropout.scaled_mask(key, start, y.shape, p, np.float32)).astype(dtype)
    assert_exact(fused, expected)
    unfused = dropout.Dropout(p, None)
    unfused.key, unfused.start = key, start
    assert_exact(host(unfused._apply_gpu(activation.bias_relu_rows(to_gpu(y), to_gpu(b)))), fused)
    assert 0 < np.count_nonzero(f32(fused) == 0) < fused.size  # some dropped, some kept


@pytest.mark.parametrize("dtype", HALVES)
def test_bias_relu_cnl_to_nchw(dtype, gpu, rng):
    n, c, oh, ow = 3, 5, 6, 7
    cnl, b = away_from_zero(rng, (c, n, oh * ow), dtype), away_from_zero(rng, (c,), dtype)
    y = host(activation.bias_relu_cnl_to_nchw(to_gpu(cnl), to_gpu(b), n, c, oh, ow))
    expected = np.maximum(f32(cnl).reshape(c, n, oh, ow).transpose(1, 0, 2, 3) + f32(b).reshape(1, c, 1, 1), 0)
    assert_exact(y, expected.astype(dtype))


def assert_float32_sum(got, terms, axis):
    """got: float32 sums of float32 `terms` along `axis`, each within float32's accumulation bound (count *
    2^-24 of the sum of magnitudes) of the exact sum."""
    assert got.dtype == np.float32
    exact = terms.astype(np.float64).sum(axis=axis)
    bound = terms.shape[axis] * 2.0 ** -24 * np.abs(terms.astype(np.float64)).sum(axis=axis)
    assert np.all(np.abs(got - exact) <= bound)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape", [(3, 5, 6, 7), (1, 1, 5, 5), (7, 2, 9, 11)], ids=str)
def test_relu_backward_to_cnl_and_its_bias_sum(dtype, shape, gpu, rng):
    n, c, h, w = shape  # N*H*W: 210, 25 and 693, none a multiple of 32
    y, gy = away_from_zero(rng, shape, dtype), away_from_zero(rng, shape, dtype)
    g, gb = activation.relu_grad_to_cnl(to_gpu(y), to_gpu(gy))
    expected = (f32(gy) * (f32(y) > 0)).transpose(1, 0, 2, 3).reshape(c, n * h * w)
    assert_exact(host(g), expected.astype(dtype))
    assert_float32_sum(host(gb), expected, axis=1)  # in float32, from the 16-bit gradient's values


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("scale", [1.0, 1.0 / 0.7])
@pytest.mark.parametrize("shape", [(37, 29), (1, 3), (128, 65)], ids=str)
def test_relu_backward_rows_and_its_bias_sum(dtype, scale, shape, gpu, rng):
    y, gy = away_from_zero(rng, shape, dtype), away_from_zero(rng, shape, dtype)
    gx, gb = activation.relu_grad_rows(to_gpu(y), to_gpu(gy), scale)
    expected = (f32(gy) * np.where(f32(y) > 0, np.float32(scale), np.float32(0))).astype(dtype)
    assert_exact(host(gx), expected)
    assert_float32_sum(host(gb), f32(expected), axis=0)  # the sum of the gradient as stored, rounded


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_apply(dtype, p, gpu, rng):
    x = away_from_zero(rng, (17, 53), dtype)
    d = dropout.Dropout(p, None)
    d.key, d.start = int(rng.integers(0, 2 ** 62)), int(rng.integers(0, 10 ** 6))
    y = host(d._apply_gpu(to_gpu(x)))
    mask = dropout.scaled_mask(d.key, d.start, x.shape, p, np.float32)  # 1/(1-p) as a float32, or 0
    assert_exact(y, (f32(x) * mask).astype(dtype))
    assert_exact(host(d.backward_gpu(to_gpu(x))), y)  # the same mask for the gradient


# --- conv.cu: im2col copies (exact); col2im sums in float, in another order than NumPy's (1 ulp)

CONVS = [((2, 3, 9, 9), 3, 2, 1), ((2, 2, 8, 7), 5, 1, 2), ((1, 3, 19, 19), 11, 4, 2)]


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape, k, stride, pad", CONVS, ids=str)
def test_im2col_and_col2im(dtype, shape, k, stride, pad, gpu, rng):
    n, c, h, w = shape
    oh, ow = conv.output_size(h, k, stride, pad), conv.output_size(w, k, stride, pad)
    x = away_from_zero(rng, shape, dtype)
    cols = host(conv.im2col_gpu(to_gpu(x), k, k, stride, pad, oh, ow))
    padded = np.pad(f32(x), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    assert_exact(cols, windows.transpose(1, 4, 5, 0, 2, 3).astype(dtype))  # (C, kh, kw, N, OH, OW)
    # col2im: standard-normal patches, so float's sums of 16-bit values are not all exact
    patches = rng.standard_normal(cols.shape).astype(dtype)
    patches[patches.astype(np.float32) == 0] = dtype.type(0.5)
    summed = host(conv.col2im_gpu(to_gpu(patches), h, w, stride, pad))
    expected = conv.col2im_cpu(patches.astype(np.float64), h, w, stride, pad)
    assert_ulps(summed, expected.astype(np.float32).astype(dtype))


# --- lrn.cu: float sums and powers (1 ulp); the sum of squares of 0..255 pixels overflows float16

def window_sum(values, n):
    out = np.zeros_like(values)
    lrn.window_sum(values, n, out)
    return out


def lrn_reference(x, n, k, alpha, beta):
    x = x.astype(np.float64)
    s = k + alpha * window_sum(x * x, n)
    return x * s ** -beta, s


LRNS = [dict(n=5, k=2.0, alpha=1e-4, beta=0.75), dict(n=3, k=1.0, alpha=0.3, beta=0.6)]


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("params", LRNS, ids=["alexnet", "strong"])
@pytest.mark.parametrize("pixels", [True, False], ids=["0..255", "normal"])
def test_lrn_forward_and_backward(dtype, params, pixels, gpu, rng):
    shape = (2, 11, 5, 6)
    x = (rng.integers(1, 256, shape) if pixels else rng.standard_normal(shape) * 3).astype(dtype)
    x[f32(x) == 0] = dtype.type(1)
    f = lrn.LocalResponseNorm(params["n"], params["k"], params["alpha"], params["beta"], False)
    f.device = gpu
    y = host(f.forward_gpu(to_gpu(x)))
    expected_y, expected_s = lrn_reference(x, **params)
    if pixels and dtype == F16:  # the squares' window sum (up to 5 * 255^2) is beyond float16's 65504
        assert (window_sum(f32(x) ** 2, params["n"]) > np.finfo(np.float16).max).any()
    assert_ulps(y, expected_y.astype(np.float32).astype(dtype))
    saved_x, saved_s = (host(a) for a in f.saved)
    assert_exact(saved_x, x)
    assert_ulps(saved_s, expected_s.astype(np.float32).astype(dtype))
    # backward from the saved (rounded) scale, as the kernel reads it
    gy = away_from_zero(rng, shape, dtype)
    gx = host(f.backward_gpu(to_gpu(gy)))
    s = f32(saved_s).astype(np.float64)
    g = f32(gy).astype(np.float64) * s ** -params["beta"]
    x64 = f32(x).astype(np.float64)
    expected_gx = g - 2 * params["alpha"] * params["beta"] * x64 * window_sum(g * x64 / s, params["n"])
    assert_ulps(gx, expected_gx.astype(np.float32).astype(dtype))


# --- pooling.cu: comparisons and copies (exact); the backward's float sums in the reference's order (exact)

def pool_reference(x, k, stride, pad):
    """The max of each window of float32 x and its offset kh*k + kw (the first maximum), -inf padding."""
    padded = np.pad(f32(x), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    flat = windows.reshape(windows.shape[:4] + (k * k,))
    offset = flat.argmax(axis=-1)
    return np.take_along_axis(flat, offset[..., None], -1)[..., 0], offset.astype(np.int32)


def scatter_reference(offset, gy, shape, k, stride, pad):
    """Each gradient added, in float32, to its window's maximum, the outputs in row-major order (the
    kernel's order for each input element)."""
    n, c, h, w = shape
    g = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=np.float32)
    for index in np.ndindex(*offset.shape):
        a, b, i, j = index
        r, q = divmod(int(offset[index]), k)
        g[a, b, i * stride + r, j * stride + q] += np.float32(gy[index])
    return g[:, :, pad:pad + h, pad:pad + w]


POOLS = [((2, 3, 9, 11), 3, 2, 0), ((2, 2, 8, 8), 3, 2, 1), ((2, 2, 7, 7), 4, 1, 1)]


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("shape, k, stride, pad", POOLS, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pool_forward_and_backward(dtype, shape, k, stride, pad, ties, gpu, rng):
    # ties: three values only, so most windows hold their maximum more than once (the first one wins)
    x = rng.choice(np.array([-1.5, 0.25, 3.0]), shape).astype(dtype) if ties else distinct(rng, shape, dtype)
    f = pooling.MaxPool2d(k, stride, pad)
    f.device = gpu
    y = host(f.forward_gpu(to_gpu(x)))
    expected_y, expected_offset = pool_reference(x, k, stride, pad)
    assert_exact(y, expected_y.astype(dtype))
    (argmax,) = f.saved
    np.testing.assert_array_equal(host(argmax), expected_offset)
    gy = away_from_zero(rng, y.shape, dtype)
    gx = host(f.backward_gpu(to_gpu(gy)))
    assert_exact(gx, scatter_reference(expected_offset, gy, shape, k, stride, pad).astype(dtype))


# --- loss.cu: float log-probabilities and loss; the logits' gradient rounded once (1 ulp)

@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("rows, classes", [(7, 10), (33, 100)])
def test_softmax_cross_entropy(dtype, rows, classes, gpu, rng):
    logits = (rng.standard_normal((rows, classes)) * 3).astype(dtype)
    labels = rng.integers(0, classes, rows).astype(np.int32)
    f = loss.SoftmaxCrossEntropy(labels_checked=True)
    f.device = gpu
    value = f.forward_gpu(to_gpu(logits), to_gpu(labels))
    assert value.dtype == np.float32 and value.shape == ()  # the loss in the accumulation type
    x = f32(logits).astype(np.float64)
    shifted = x - x.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_p[np.arange(rows), labels].mean()
    np.testing.assert_allclose(float(host(value)), expected_loss, rtol=1e-5)  # float32 arithmetic
    saved_log_p, _ = f.saved
    assert saved_log_p.dtype == np.float32
    np.testing.assert_allclose(host(saved_log_p), log_p, rtol=1e-5, atol=1e-5)
    gy = 0.75  # the loss's gradient, a float32 0-d array as autograd passes it
    gx, none = f.backward_gpu(cupy().asarray(np.float32(gy)))
    assert none is None and gx.dtype == dtype
    expected = np.exp(log_p)
    expected[np.arange(rows), labels] -= 1
    assert_ulps(host(gx), (expected * (gy / rows)).astype(np.float32).astype(dtype))


# --- float16 through the Function API (bfloat16 Tensors are core.py's part of issue 28)

def test_float16_through_the_functions(rng):
    import minidl.functions as F
    from minidl import Tensor
    x = away_from_zero(rng, (2, 8, 9, 9), F16)
    labels = rng.integers(0, 8, 2)
    t = Tensor(x, device=GPU, requires_grad=True)
    h = F.local_response_norm(F.relu(t))
    h = F.max_pool2d(h, 3, 2)
    value = F.softmax_cross_entropy(F.sum(h, axis=(2, 3)), labels)  # (2, 8) logits
    assert h.dtype == F16 and value.dtype == np.float32
    value.backward()
    assert t.grad.dtype == F16 and np.all(np.isfinite(f32(t.grad.numpy())))
