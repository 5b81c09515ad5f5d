"""float16 and bfloat16 in the two kernel files that test_kernels_half.py leaves out (issue 28): winograd.cu's
tile copies and the Winograd convolution on a GPU, and to_input.cu's network input in the compute dtype.

- gather_tiles widens 16-bit maps into float32 tiles (exact) and scatter_tiles sums float32 tiles in float and
  rounds once (half.cuh): bit for bit the float kernels on the same values, their results rounded once.
- The Winograd convolution of 16-bit x, W and gy computes in float32 (winograd.py), its GEMMs in exact FP32 whatever
  the precision (winograd.gemm_precision): y without a bias, gx and gW are bit for bit the float32 path's under the
  "fp32" precision on the same values rounded once; a float32 bias is then added in float32
  and rounded once more. Against the exact convolution (float64) of the same 16-bit values, rounded once to the
  16-bit dtype, an output is then within u |y| (y's rounding) + u |y + b| (the bias's) + u |y + b| (the
  reference's), u = 2^-11 for float16 and 2^-8 for bfloat16, plus the float32 path's error, at most
  2^-16 S here (S = |A^T| (|B^T| |d| |B|) |U| |A| with absolute values throughout, computed with winograd.py's
  CPU transforms; float32's error is a few hundred 2^-24 S at most for these sums of at most ~100 terms).
- crops_to_input computes in float exactly as its float32 instantiation and rounds once when it stores: its
  16-bit output is the float32 output rounded to the 16-bit dtype, bit for bit, and so is the NumPy path's.
"""
import numpy as np
import pytest

from minidl import kernels
from minidl.data.augment import Crops, crop_and_flip
from minidl.errors import MinidlError
from minidl.functions import to_input, winograd
from minidl.precision import DEFAULT_PRECISION, set_precision

from test_kernels_half import BF16, F16, HALVES, f32, gpu, host, to_gpu  # noqa: F401 -- gpu: a fixture

pytestmark = pytest.mark.gpu

UNIT_ROUNDOFF = {F16: 2.0 ** -11, BF16: 2.0 ** -8}


def assert_exact(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(np.ascontiguousarray(got).view(np.uint16),
                                  np.ascontiguousarray(expected).view(np.uint16))


def test_the_kernel_files_types():
    assert winograd.CU.types == kernels.HALF_TYPES
    assert to_input.CU.types == (np.dtype(np.float32), F16, BF16)


# --- winograd.cu: the kernels alone

def tile_arguments(n, c, h, w, t, m, pad, r):
    oh, ow = h + 2 * pad - r + 1, w + 2 * pad - r + 1
    return (n, c, h, w, t, m, pad, -(-oh // m), -(-ow // m))


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("t, m, pad, r", [(6, 4, 1, 3), (4, 2, 0, 3), (8, 4, 2, 5), (4, 4, 0, 1)])
def test_gather_and_scatter_tiles_are_the_float_kernels_rounded_once(dtype, t, m, pad, r, gpu, rng):
    n, c, h, w = 2, 3, 9, 7
    shape = tile_arguments(n, c, h, w, t, m, pad, r)
    tiles_h, tiles_w = shape[-2:]
    x = rng.normal(0, 1, (n, c, h, w)).astype(dtype)
    size = t * t * n * tiles_h * tiles_w * c

    def gather(a):
        out = kernels.empty((size,), np.float32)  # the tiles: float32 for 16-bit maps too
        kernels.launch(winograd.CU, "gather_tiles", a.dtype, size, to_gpu(a), out, size, *shape)
        return host(out)
    gathered = gather(x)
    assert gathered.dtype == np.float32
    np.testing.assert_array_equal(gathered, gather(f32(x)))  # a widening copy, zeros past the edges

    tiles = rng.normal(0, 1, size).astype(np.float32)

    def scatter(dtype):
        out = kernels.empty((n, c, h, w), dtype)
        kernels.launch(winograd.CU, "scatter_tiles", dtype, out.size, to_gpu(tiles), out, out.size, *shape)
        return host(out)
    # the same float sums in the same order, then one rounding
    assert_exact(scatter(dtype), scatter(np.float32).astype(dtype))


# --- the Winograd convolution on a GPU in 16 bits

def direct_conv64(x, W, b, pad, groups):
    """The exact convolution (float64) of the given values."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    n, c, h, w = x.shape
    out, cg, k = W.shape[:3]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    y = np.zeros((n, out, oh, ow))
    og = out // groups
    for g in range(groups):
        for i in range(k):
            for j in range(k):
                patch = xp[:, g * cg:(g + 1) * cg, i:i + oh, j:j + ow]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, W[g * og:(g + 1) * og, :, i, j])
    return y + (0 if b is None else np.asarray(b, np.float64).reshape(1, -1, 1, 1))


def winograd_bound_scale(x, W, pad, groups, m, r):
    """S = |A^T| (|B^T| |d| |B|) |U| |A| for every output, by winograd.py's CPU transforms of absolute
    values (float64)."""
    f = winograd.TRANSFORMS[m, r]
    x, W = np.abs(np.asarray(x, np.float64)), np.asarray(W, np.float64)
    n, c, h, w = x.shape
    out = W.shape[0]
    oh, ow = h + 2 * pad - r + 1, w + 2 * pad - r + 1
    tiles_h, tiles_w = -(-oh // m), -(-ow // m)
    V = winograd.gather_cpu(x, np.abs(f.factor("input")), f.t, f.m, pad, tiles_h, tiles_w)
    V = V.reshape(f.t * f.t, -1, c)
    U = np.abs(winograd.transform_filters(f, W, groups))
    M = np.empty((f.t * f.t, V.shape[1], out))
    np.matmul(winograd.by_group(V, groups), U.swapaxes(-1, -2), out=winograd.by_group(M, groups))
    return winograd.scatter_cpu(M.reshape(f.t * f.t, -1), np.abs(f.factor("output")), f.m, f.m, 0,
                                (n, out, oh, ow), tiles_h, tiles_w)


CONVOLUTIONS = [(2, 3, 1, 1, True), (4, 3, 2, 1, False), (5, 3, 1, 1, True), (3, 5, 1, 1, True),
                (4, 5, 1, 1, False), (None, 11, 1, 4, True)]  # (tile, k, groups, stride, bias)


def winograd_on(x, W, b, pad, groups, tile, stride, gy):
    """winograd_conv_forward and _backward on the GPU: (y, gx, gW, gb) on the host."""
    y, saved = winograd.winograd_conv_forward(to_gpu(x), to_gpu(W), None if b is None else to_gpu(b), pad, groups,
                                              tile, stride)
    gx, gW, gb = winograd.winograd_conv_backward(to_gpu(gy), W.shape, saved, (True, True, b is not None))
    return [None if a is None else host(a) for a in (y, gx, gW, gb)]


def case_values(rng, dtype, k, groups, stride, bias):
    pad = 1 if stride > 1 else k // 2
    x = rng.normal(0, 1, (2, 4, 19, 17)).astype(dtype)
    W = rng.normal(0, 0.3, (6, 4 // groups, k, k)).astype(dtype)
    b = rng.normal(0, 1, 6).astype(np.float32) if bias else None
    oh, ow = (19 + 2 * pad - k) // stride + 1, (17 + 2 * pad - k) // stride + 1
    gy = rng.normal(0, 1, (2, 6, oh, ow)).astype(dtype)
    return x, W, b, pad, gy


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("tile, k, groups, stride, bias", CONVOLUTIONS)
def test_the_16_bit_winograd_convolution_is_the_float32_one_rounded_once(dtype, tile, k, groups, stride, bias,
                                                                          gpu, rng):
    x, W, b, pad, gy = case_values(rng, dtype, k, groups, stride, bias)
    y, gx, gW, gb = winograd_on(x, W, b, pad, groups, tile, stride, gy)  # under the default precision, tf32
    set_precision("fp32")  # the float32 path in exact FP32, as 16-bit maps' tiles are multiplied at any precision
    try:
        y32, gx32, gW32, gb32 = winograd_on(f32(x), f32(W), None, pad, groups, tile, stride, f32(gy))
    finally:
        set_precision(DEFAULT_PRECISION)
    expected_y = y32.astype(dtype) if b is None else (f32(y32.astype(dtype)) + b.reshape(1, -1, 1, 1)).astype(dtype)
    assert_exact(y, expected_y)
    assert_exact(gx, gx32.astype(dtype))
    assert_exact(gW, gW32.astype(dtype))
    if b is not None:  # float32 sums of the same values (in the order the reduction takes)
        assert gb.dtype == np.float32
        np.testing.assert_allclose(gb, f32(gy).sum(axis=(0, 2, 3)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("tile, k, groups, bias", [c[:3] + c[4:] for c in CONVOLUTIONS if c[3] == 1])
def test_the_16_bit_winograd_convolution_is_within_its_rounding_bound(dtype, tile, k, groups, bias, gpu, rng):
    x, W, b, pad, gy = case_values(rng, dtype, k, groups, 1, bias)
    y = winograd_on(x, W, b, pad, groups, tile, 1, gy)[0]
    assert y.dtype == dtype
    exact = direct_conv64(x, W, b, pad, groups)
    expected = exact.astype(np.float32).astype(dtype)
    u = UNIT_ROUNDOFF[dtype]
    S = winograd_bound_scale(x, W, pad, groups, tile, k)
    without_bias = exact - (0 if b is None else b.reshape(1, -1, 1, 1))
    bound = u * np.abs(without_bias) + 2 * u * np.abs(exact) + 2.0 ** -16 * S
    error = np.abs(f32(y) - f32(expected))
    assert np.all(error <= bound), f"{(error / bound).max():.2f} times the bound"


@pytest.mark.parametrize("stride, k", [(1, 3), (4, 11)])
def test_float16_winograd_through_conv2d(stride, k, rng):
    """conv2d(algorithm="winograd") on float16 Tensors with a float32 bias (the layers' mixed precision): float16
    y, gx and gW and a float32 gb, each within a few float16 ulps of the direct path's (both round float32
    results: 8 u of the largest value)."""
    import minidl.functions as F
    from minidl import Tensor
    x = rng.normal(0, 1, (2, 3, 19, 19)).astype(F16)
    W = rng.normal(0, 0.2, (4, 3, k, k)).astype(F16)
    b = rng.normal(0, 1, 4).astype(np.float32)
    outputs = []
    for algorithm in ("winograd", "direct"):
        t, w, bias = (Tensor(a, device="cuda:0", requires_grad=True) for a in (x, W, b))
        y = F.conv2d(t, w, bias, stride, 1, algorithm=algorithm)  # (no ReLU: its mask would differ where y ~ 0)
        F.sum(y).backward()
        outputs.append([f32(a.numpy()) for a in (y, t.grad, w.grad, bias.grad)])
        assert y.dtype == t.grad.dtype == w.grad.dtype == F16 and bias.grad.dtype == np.float32
    for got, want in zip(*outputs):
        assert np.abs(got - want).max() <= 8 * UNIT_ROUNDOFF[F16] * np.abs(want).max()


# --- to_input.cu: the network's input in 16 bits

def crops_case(rng, count=3, size=12, crop=9):
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    where = Crops(rng.integers(0, size - crop + 1, count), rng.integers(0, size - crop + 1, count),
                  rng.random(count) < 0.5)
    windows = crop_and_flip(images, crop, where._replace(flips=np.zeros(count, bool)))  # the device mirrors them
    mean = rng.uniform(0, 255, (size, size, 3)).astype(np.float32)
    shift = rng.normal(0, 20, (count, 3)).astype(np.float32)
    return images, where, windows, mean, shift, crop


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("scale", [1.0, 1 / 255, -0.3])
def test_the_input_in_16_bits_is_the_float32_input_rounded_once(dtype, scale, gpu, rng):
    images, where, windows, mean, shift, crop = crops_case(rng)
    reference = to_input.crops_to_input_cpu(crop_and_flip(images, crop, where), mean, where, shift, scale)
    assert reference.dtype == np.float32
    expected = reference.astype(dtype)
    feed = to_input.InputFeed("cuda:0", mean, scale, dtype=dtype)
    assert_exact(host(feed(windows, where, shift)), expected)
    assert_exact(host(to_input.InputFeed("cuda:0", mean, scale)(windows, where, shift)), reference)
    # the NumPy path: the same float32 values, rounded once (and into an `out` of the dtype)
    mirrored = crop_and_flip(images, crop, where)
    assert_exact(to_input.crops_to_input_cpu(mirrored, mean, where, shift, scale, dtype=dtype), expected)
    out = np.empty(expected.shape, dtype)
    assert_exact(to_input.crops_to_input_cpu(mirrored, mean, where, shift, scale, out=out), expected)
    assert_exact(to_input.InputFeed("cpu", mean, scale, dtype=dtype)(windows, where, shift), expected)


@pytest.mark.parametrize("precision, dtype", [("fp16", F16), ("bf16", BF16), ("fp32", np.dtype(np.float32)),
                                              ("tf32", np.dtype(np.float32))])
def test_the_feed_follows_the_precision_at_each_call(precision, dtype, gpu, rng):
    images, where, windows, mean, shift, crop = crops_case(rng)
    reference = to_input.crops_to_input_cpu(crop_and_flip(images, crop, where), mean, where, shift, 0.5)
    feed = to_input.InputFeed("cuda:0", mean, 0.5)
    assert host(feed(windows, where, shift)).dtype == np.float32  # the default precision: float32
    try:
        set_precision(precision)
        assert_exact(host(feed(windows, where, shift)), reference.astype(dtype))
        # a CPU feed stays float32 (the CPU's Functions compute 16-bit arrays in float32)
        assert to_input.InputFeed("cpu", mean, 0.5)(windows, where, shift).dtype == np.float32
        # a dtype given is kept whatever the precision
        assert host(to_input.InputFeed("cuda:0", mean, 0.5, np.float32)(windows, where, shift)).dtype == np.float32
    finally:
        set_precision(DEFAULT_PRECISION)


def test_another_input_dtype_is_refused(gpu, rng):
    images, where, windows, mean, shift, crop = crops_case(rng)
    with pytest.raises(MinidlError, match="the network's input is float32, float16, bfloat16, not float64"):
        to_input.InputFeed("cuda:0", mean, 1.0, dtype=np.float64)
    with pytest.raises(MinidlError, match="not float64"):
        to_input.crops_to_input_cpu(windows, mean, where, shift, 1.0, dtype=np.float64)

