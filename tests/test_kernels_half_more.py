"""float16 and bfloat16 in the two kernel files that test_kernels_half.py leaves out (issue 28): winograd.cu's
tile copies and the Winograd convolution on a GPU, and to_input.cu's network input in the compute dtype.

- gather_tiles copies and scatter_tiles sums in float and rounds once (half.cuh): the 16-bit kernels equal,
  bit for bit, the float kernels on the same values (exact in float) with their results rounded once.
- crops_to_input computes in float exactly as its float32 instantiation and rounds once when it stores: its
  16-bit output is the float32 output rounded to the 16-bit dtype, bit for bit, and so is the NumPy path's.
- The Winograd convolution stores its tiles V = B^T d B, products M = V U and output blocks Y = A^T M A in
  16 bits, each a float32 result rounded once (relative error u: 2^-11 for float16, 2^-8 for bfloat16), and
  adds the float32 bias with one more rounding. Against the exact convolution of the same 16-bit inputs
  (float64, rounded once to the 16-bit dtype), the error of an output is then at most
  3u S + 2u |y| (+ float32's own error, ~2^-24 S), S = |A^T| (|B^T| |d| |B|) |U| |A| with absolute values
  throughout (the bound of |Y| and of every intermediate that feeds it): V's rounding reaches M as u |V||U|,
  M's own is u |M|, both carried by |A^T| . |A| (2u S); Y's rounding is u |Y| <= u S; the bias's rounding and
  the reference's are u |y| each. S is computed with winograd.py's CPU transforms on |d| and |B^T|, |A^T|.
"""
import ml_dtypes
import numpy as np
import pytest

from minidl import kernels
from minidl.device import cupy, device
from minidl.errors import MinidlError
from minidl.functions import to_input, winograd
from minidl.data.augment import Crops, crop_and_flip
from minidl.precision import DEFAULT_PRECISION, set_precision

pytestmark = pytest.mark.gpu

F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
HALVES = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16")]
UNIT_ROUNDOFF = {F16: 2.0 ** -11, BF16: 2.0 ** -8}


@pytest.fixture
def gpu():
    dev = device("cuda:0")
    with dev:
        yield dev


def to_gpu(a):
    return cupy().asarray(np.ascontiguousarray(a))


def host(a):
    return cupy().asnumpy(a)


def f32(a):
    return np.asarray(a).astype(np.float32)


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
        out = kernels.empty((size,), a.dtype)
        kernels.launch(winograd.CU, "gather_tiles", a.dtype, size, to_gpu(a), out, size, *shape)
        return host(out)
    assert_exact(gather(x), gather(f32(x)).astype(dtype))  # a copy, zeros past the edges

    tiles = rng.normal(0, 1, size).astype(dtype)

    def scatter(a):
        out = kernels.empty((n, c, h, w), a.dtype)
        kernels.launch(winograd.CU, "scatter_tiles", a.dtype, out.size, to_gpu(a), out, out.size, *shape)
        return host(out)
    # the same float sums in the same order, then one rounding
    assert_exact(scatter(tiles), scatter(f32(tiles)).astype(dtype))


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


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("m, r, groups, bias", [(2, 3, 1, True), (4, 3, 2, False), (5, 3, 1, True),
                                                (3, 5, 1, True), (4, 5, 1, False)])
def test_the_winograd_convolution_in_16_bits_is_within_its_rounding_bound(dtype, m, r, groups, bias, gpu, rng):
    pad = r // 2
    x = rng.normal(0, 1, (2, 4, 11, 10)).astype(dtype)
    W = rng.normal(0, 0.3, (6, 4 // groups, r, r)).astype(dtype)
    b = rng.normal(0, 1, 6).astype(np.float32) if bias else None
    y, saved = winograd.winograd_conv_forward(to_gpu(x), to_gpu(W), None if b is None else to_gpu(b), pad, groups, m)
    assert y.dtype == dtype and y.shape == (2, 6, 11, 10)
    exact = direct_conv64(x, W, b, pad, groups)
    got, expected = f32(host(y)), f32(exact.astype(np.float32).astype(dtype))
    u = UNIT_ROUNDOFF[dtype]
    S = winograd_bound_scale(x, W, pad, groups, m, r)
    bound = 3 * u * S + 2 * u * np.abs(exact) + 2.0 ** -20 * S
    error = np.abs(got - expected)
    assert np.all(error <= bound), f"{(error / bound).max():.2f} times the bound"


@pytest.mark.parametrize("dtype", HALVES)
def test_the_winograd_gradients_in_16_bits_track_float32(dtype, gpu, rng):
    """gx and gW come back in the 16-bit dtype, gb in float32, each near the float32 path's on the same values
    (a sanity check: each value is a sum of many rounded ones, so relative to the largest value, not a bound)."""
    x = rng.normal(0, 1, (2, 4, 9, 9)).astype(dtype)
    W = rng.normal(0, 0.3, (6, 4, 3, 3)).astype(dtype)
    gy = rng.normal(0, 1, (2, 6, 9, 9)).astype(dtype)
    results = []
    for cast in (lambda a: a, f32):
        y, saved = winograd.winograd_conv_forward(to_gpu(cast(x)), to_gpu(cast(W)), None, 1, 1, 4)
        results.append([host(g) for g in winograd.winograd_conv_backward(to_gpu(cast(gy)), W.shape, saved,
                                                                          (True, True, True))])
    (gx, gW, gb), (gx32, gW32, gb32) = results
    assert gx.dtype == gW.dtype == dtype and gb.dtype == np.float32
    u = UNIT_ROUNDOFF[dtype]
    for got, want in ((gx, gx32), (gW, gW32), (gb, gb32)):
        assert np.abs(f32(got) - want).max() <= 16 * u * np.abs(want).max()


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
