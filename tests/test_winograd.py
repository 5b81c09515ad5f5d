"""Winograd 3x3 and 5x5 convolution (minidl/functions/winograd.py): its matrices, values against a
NumPy reference and the direct path, float64 gradient checks, float32 error, and the algorithm
choice."""
import numpy as np
import pytest

from minidl import Tensor, gradcheck
from minidl.cpu import threads as cpu_threads
from minidl.errors import MinidlError
from minidl.functions import conv2d, winograd
from minidl.functions.winograd import (TRANSFORMS, Transform, toom_cook, winograd_conv_backward,
                                       winograd_conv_forward)

KEYS = sorted(TRANSFORMS, key=lambda key: key[::-1])  # (m, r): F(m x m, r x r), the 3x3 ones first


def reference_conv(x, W, b, pad, groups):
    """Stride-1 convolution as a sum over the kernel offsets of shifted input windows (float64)."""
    n, c, h, w = x.shape
    out, cg, kh, kw = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - kh + 1, w + 2 * pad - kw + 1
    y = np.zeros((n, out, oh, ow))
    og = out // groups
    for g in range(groups):
        inputs = xp[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw",
                                                       inputs[:, :, i:i + oh, j:j + ow],
                                                       W[g * og:(g + 1) * og, :, i, j])
    return y if b is None else y + b.reshape(1, out, 1, 1)


def direct(x, W, b, pad, groups, gy):
    """y, gx, gW, gb of the direct (im2col + GEMM) path."""
    inputs = [Tensor(a, requires_grad=True) for a in (x, W) + ((b,) if b is not None else ())]
    y = conv2d(*inputs, pad=pad, groups=groups, algorithm="direct")
    y.backward(Tensor(gy))
    return [y.data] + [t.grad.data for t in inputs]


@pytest.mark.parametrize("m, r", KEYS)
def test_the_matrices_compute_a_one_dimensional_correlation(m, r, rng):
    f = TRANSFORMS[m, r]
    assert (f.m, f.r, f.t) == (m, r, m + r - 1)
    d, g = rng.standard_normal(f.t), rng.standard_normal(r)
    expected = [d[i:i + r] @ g for i in range(m)]
    np.testing.assert_allclose(f.AT @ ((f.G @ g) * (f.BT @ d)), expected, rtol=1e-12, atol=1e-12)


# Lavin & Gray 2016, sections 4.1 and 4.2: the hand-written 3x3 matrices minidl used before
# toom_cook
LAVIN_GRAY = {
    (2, 3): ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
             [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
             [[1, 1, 1, 0], [0, 1, -1, -1]]),
    (4, 3): ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
              [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
             [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
             [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


@pytest.mark.parametrize("key", sorted(LAVIN_GRAY))
def test_the_generated_3x3_matrices_are_lavin_and_grays(key):
    """The same matrices up to the signs of some positions' rows and columns, which cancel in each
    position's product A^T[:, j] (G g)_j (B^T d)_j: the same arithmetic, bit for bit. F(4x4) is
    equal outright."""
    f = TRANSFORMS[key]
    ours = (f.BT, f.G, f.AT)
    theirs = [np.array(matrix, dtype=np.float64) for matrix in LAVIN_GRAY[key]]
    for got, want in zip(ours, theirs):
        np.testing.assert_array_equal(np.abs(got), np.abs(want))
    for j in range(f.t):
        np.testing.assert_array_equal(np.einsum("i,k,l->ikl", f.AT[:, j], f.G[j], f.BT[j]),
                                      np.einsum("i,k,l->ikl", theirs[2][:, j], theirs[1][j],
                                                theirs[0][j]))
    if key == (4, 3):
        for got, want in zip(ours, theirs):
            np.testing.assert_array_equal(got, want)


def test_bad_points_or_matrices_are_refused():
    with pytest.raises(ValueError, match=r"F\(2, 3\) needs 3 distinct finite points"):
        toom_cook(2, 3, (0, 1, 1))
    BT, G, AT = toom_cook(2, 3, (0, 1, -1))
    G[1][0] *= 2
    with pytest.raises(ValueError,
                       match=r"F\(2, 3\): the matrices are off the correlation by 5.0e-01"):
        Transform(BT, G, AT)


def cases(r):
    """(shape, out, pad, groups, bias) for r x r filters: sizes odd and even, pad 0 and (r - 1) / 2,
    groups 1 and 2."""
    same = r // 2
    return [
        ((2, 3, 7, 7), 5, same, 1, True),          # odd size, padded
        ((3, 4, 8, 6), 6, 0, 2, False),            # even sizes, no padding, groups
        ((2, 6, 13, 13), 4, same, 2, True),        # AlexNet's conv3-conv5 map size
        ((1, 2, r, r + 2), 2, 0, 1, True),         # one output row: tiles mostly overhang
    # conv2's: 9 tiles of F(3x3) exactly
    ] + ([((2, 4, 27, 27), 6, same, 1, True)] if r == 5 else [])


@pytest.mark.parametrize("m, r, shape, out, pad, groups, bias",
                         [(m, r) + case for m, r in KEYS for case in cases(r)])
def test_matches_the_reference_and_the_direct_path(rng, m, r, shape, out, pad, groups, bias):
    x = rng.standard_normal(shape)
    W = rng.standard_normal((out, shape[1] // groups, r, r))
    b = rng.standard_normal(out) if bias else None
    y, saved = winograd_conv_forward(x, W, b, pad, groups, m)
    np.testing.assert_allclose(y, reference_conv(x, W, b, pad, groups), rtol=1e-10, atol=1e-10)
    gy = rng.standard_normal(y.shape)
    gx, gW, gb = winograd_conv_backward(gy, W.shape, saved, (True, True, bias))
    expected = direct(x, W, b, pad, groups, gy)
    for got, want in zip((y, gx, gW, gb), expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert y.flags.c_contiguous and y.dtype == x.dtype


# strided: (x shape, W shape, stride, pad, groups); the filters' side in stride x stride blocks is 3
# or 5
# AlexNet's conv1, smaller: 3x3 in 4x4 blocks
STRIDED = [((2, 3, 31, 31), (6, 3, 11, 11), 4, 0, 1),
           ((2, 3, 30, 29), (6, 3, 11, 11), 4, 2, 1),   # padded, sizes not multiples of the stride
           # 5x5 at stride 2: 3x3 over 4x the channels; groups
           ((2, 4, 13, 12), (4, 2, 5, 5), 2, 1, 2),
           # 6x6 at stride 2: 3x3, no padding of the filters
           ((2, 3, 19, 19), (4, 3, 6, 6), 2, 1, 1),
           ((1, 2, 23, 23), (3, 2, 10, 10), 2, 0, 1)]   # 10x10 at stride 2: 5x5 blocks


@pytest.mark.parametrize("x_shape, W_shape, stride, pad, groups", STRIDED)
def test_strided_convolutions_match_the_direct_path(rng, x_shape, W_shape, stride, pad, groups):
    x, W = rng.standard_normal(x_shape), rng.standard_normal(W_shape)
    b = rng.standard_normal(W_shape[0])
    y, saved = winograd_conv_forward(x, W, b, pad, groups, stride=stride)
    gy = rng.standard_normal(y.shape)
    gx, gW, gb = winograd_conv_backward(gy, W.shape, saved, (True, True, True))
    inputs = [Tensor(a, requires_grad=True) for a in (x, W, b)]
    y_direct = conv2d(*inputs, stride=stride, pad=pad, groups=groups, algorithm="direct")
    y_direct.backward(Tensor(gy))
    for got, want in zip((y, gx, gW, gb), [y_direct.data] + [t.grad.data for t in inputs]):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_strided_convolutions_pass_gradcheck(rng):
    x = Tensor(rng.standard_normal((2, 2, 14, 13)), requires_grad=True)
    W = Tensor(rng.standard_normal((3, 2, 7, 7)), requires_grad=True)  # 3x3 in blocks of 3x3 pixels
    b = Tensor(rng.standard_normal(3), requires_grad=True)
    gradcheck(lambda *a: conv2d(*a, stride=3, pad=1, algorithm="winograd"), x, W, b)


def test_conv1s_blocks_hold_each_pixel_once(rng):
    """11x11 at stride 4 over 227x227: 57x57 blocks of 4x4 pixels as 48 channels, padded with zeros
    past 227."""
    x = rng.standard_normal((1, 3, 227, 227))
    blocks = winograd.to_blocks(x, 4, 0, 57, 57)
    assert blocks.shape == (1, 48, 57, 57)
    # channel 1, offset (2, 3) in block (10, 20)
    assert blocks[0, 1 * 16 + 2 * 4 + 3, 10, 20] == x[0, 1, 42, 83]
    assert np.count_nonzero(blocks) == x.size and np.isclose(blocks.sum(), x.sum())
    np.testing.assert_array_equal(winograd.from_blocks(blocks, 4, 0, x.shape), x)


@pytest.mark.parametrize("m, r", KEYS)
@pytest.mark.parametrize("shape, out, same_pad, groups",
                         [((2, 4, 5, 6), 6, True, 2), ((3, 2, 6, 5), 3, False, 1)])
def test_gradients_pass_gradcheck(rng, monkeypatch, m, r, shape, out, same_pad, groups):
    # conv2d's choice, fixed for the check
    monkeypatch.setattr(winograd, "fastest_tile", lambda oh, ow, r: m)
    pad = r // 2 if same_pad else 0
    x = Tensor(rng.standard_normal(shape), requires_grad=True)
    W = Tensor(rng.standard_normal((out, shape[1] // groups, r, r)), requires_grad=True)
    b = Tensor(rng.standard_normal(out), requires_grad=True)
    gradcheck(lambda *a: conv2d(*a, pad=pad, groups=groups, algorithm="winograd"), x, W, b)


def test_only_the_wanted_gradients_are_computed(rng):
    x = Tensor(rng.standard_normal((2, 3, 6, 6)))  # an image: no gradient wanted
    W = Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True)
    conv2d(x, W, pad=1, algorithm="winograd").sum().backward()
    assert x.grad is None and W.grad.shape == W.shape
    _, saved = winograd_conv_forward(x.data, W.data, pad=1)
    assert winograd_conv_backward(np.ones((2, 4, 6, 6)), W.shape, saved,
                                  (False, True, False))[::2] == (None, None)


@pytest.mark.parametrize("m, r, bound",
                         [(2, 3, 3e-6), (4, 3, 5e-5), (5, 3, 5e-5), (2, 5, 2e-5), (3, 5, 5e-5),
                                         (4, 5, 5e-5)])
def test_float32_error_against_float64_direct(rng, m, r, bound):
    """Relative to the largest value, at AlexNet's shapes (batch 4): for 3x3 conv4's, where F(2x2)
    is close to the direct float32 path (about 4e-7 here), F(4x4) some 10x worse (about 1e-5), from
    its larger matrix entries; for 5x5 conv2's (48 -> 128, 27x27), where F(2x2) is off by about 5e-6
    and F(3x3) and F(4x4) by about 1.5e-5 (the direct path 4e-7)."""
    c, out, size = (192, 192, 13) if r == 3 else (48, 128, 27)
    x = rng.standard_normal((4, c, size, size))
    # He's scale: outputs about 1
    W = rng.standard_normal((out, c, r, r)) * np.sqrt(2 / (c * r * r))
    gy = rng.standard_normal((4, out, size, size))
    exact = direct(x, W, None, r // 2, 1, gy)
    y, saved = winograd_conv_forward(x.astype(np.float32), W.astype(np.float32), None, r // 2, 1, m)
    gx, gW, _ = winograd_conv_backward(gy.astype(np.float32), W.shape, saved, (True, True, False))
    for name, got, want in zip(("y", "gx", "gW"), (y, gx, gW), exact):
        assert got.dtype == np.float32
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < bound, f"{name}: relative error {error:.2e} with F({m}x{m}, {r}x{r})"


def test_tile_choice_counts_multiplications():
    # 49 * 3*3 = 441 against 36 * 4*4 = 576 and 16 * 7*7 = 784
    assert winograd.fastest_tile(13, 13) == 5
    assert winograd.fastest_tile(6, 6) == 2    # 144 each: the tie goes to the more accurate
    assert winograd.fastest_tile(1, 1) == 2
    # conv2: 64 * 7*7 = 3136, 49 * 9*9 = 3969, 36 * 14*14 = 7056
    assert winograd.fastest_tile(27, 27, 5) == 4
    assert winograd.fastest_tile(6, 6, 5) == 3    # 49 * 2*2 = 196, 64 * 2*2 = 256, 36 * 3*3 = 324
    assert winograd.fastest_tile(2, 2, 5) == 2


def calls_to_winograd(monkeypatch):
    calls = []
    real = winograd.winograd_conv_forward

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(winograd, "winograd_conv_forward", spy)
    return calls


def test_auto_takes_winograd_for_3x3_and_5x5_in_blocks_with_enough_channels(rng, monkeypatch):
    monkeypatch.delenv("MINIDL_CONV_ALGORITHM", raising=False)
    calls = calls_to_winograd(monkeypatch)
    x = Tensor(rng.standard_normal((1, 32, 9, 9)))
    conv2d(x, Tensor(rng.standard_normal((16, 32, 3, 3))), pad=1)
    conv2d(x, Tensor(rng.standard_normal((32, 16, 3, 3))), groups=2)
    conv2d(x, Tensor(rng.standard_normal((16, 32, 5, 5))), pad=2)
    # 3x3 in 2x2 blocks of pixels
    conv2d(x, Tensor(rng.standard_normal((16, 32, 5, 5))), stride=2)
    conv2d(Tensor(rng.standard_normal((1, 3, 27, 27))),
           Tensor(rng.standard_normal((16, 3, 11, 11))), stride=4)
    conv2d(x, Tensor(rng.standard_normal((16, 32, 3, 3))), stride=2)         # 2x2 in blocks: direct
    conv2d(x, Tensor(rng.standard_normal((16, 32, 7, 7))))                   # 7x7: direct
    conv2d(x, Tensor(rng.standard_normal((16, 32, 3, 5))))                   # not square: direct
    conv2d(x, Tensor(rng.standard_normal((8, 32, 3, 3))))                    # 8 outputs: direct
    conv2d(x[:, :8], Tensor(rng.standard_normal((16, 8, 5, 5))))             # 8 inputs: direct
    # 12 inputs in blocks: direct
    conv2d(x[:, :3], Tensor(rng.standard_normal((16, 3, 6, 6))), stride=2)
    # a strided convolution is computed by a second call, on its blocks
    assert calls == [(16, 32, 3, 3), (32, 16, 3, 3), (16, 32, 5, 5), (16, 32, 5, 5),
                     (16, 128, 3, 3), (16, 3, 11, 11), (16, 48, 3, 3)]


@pytest.mark.parametrize("how", ["argument", "environment", "layer"])
def test_the_direct_path_stays_selectable(rng, monkeypatch, how):
    from minidl.layers import Conv2d
    calls = calls_to_winograd(monkeypatch)
    x = Tensor(rng.standard_normal((2, 3, 7, 7)), requires_grad=True)
    W = Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True)
    if how == "argument":
        y = conv2d(x, W, pad=1, algorithm="direct")
    elif how == "environment":
        monkeypatch.setenv("MINIDL_CONV_ALGORITHM", "direct")
        y = conv2d(x, W, pad=1)
    else:
        layer = Conv2d(3, 4, 3, pad=1, algorithm="direct", rng=0)
        y = layer(x)
    y.sum().backward()
    assert calls == [] and x.grad is not None


@pytest.mark.parametrize("m, r", KEYS)
def test_results_do_not_depend_on_the_core_count(rng, monkeypatch, m, r):
    shapes = (5, 6, 13, 13), (8, 3, r, r), (5, 8, 13, 13)
    x, W, gy = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)

    # a slab per image, so that the cores share them out
    monkeypatch.setattr(winograd, "SLAB_BYTES", 1)

    def step(cores):
        monkeypatch.setattr(cpu_threads, "core_count", lambda: cores)  # batch 5: uneven shares
        y, saved = winograd_conv_forward(x, W, None, r // 2, 2, m)
        return (y,) + winograd_conv_backward(gy, W.shape, saved, (True, True, True))
    for single, split in zip(step(1), step(3)):
        np.testing.assert_array_equal(single, split)


def test_results_do_not_depend_on_the_core_count_with_fewer_slabs_than_cores(rng, monkeypatch):
    """Images past OpenBLAS's threading threshold (8192 columns: 64 channels of 18 x 18 tiles here),
    a slab each, two slabs: on 2 or 4 cores alike, the products on one BLAS thread either way."""
    x = rng.standard_normal((2, 64, 70, 70)).astype(np.float32)
    W = rng.standard_normal((8, 64, 5, 5)).astype(np.float32)
    gy = rng.standard_normal((2, 8, 70, 70)).astype(np.float32)
    monkeypatch.setattr(winograd, "SLAB_BYTES", 1)

    def step(cores):
        monkeypatch.setattr(cpu_threads, "core_count", lambda: cores)
        y, saved = winograd_conv_forward(x, W, None, 2, 1, 4)
        return (y,) + winograd_conv_backward(gy, W.shape, saved, (True, True, False))[:2]
    for two, four, one in zip(step(2), step(4), step(1)):
        np.testing.assert_array_equal(two, four)
        np.testing.assert_array_equal(two, one)


def test_inputs_of_any_layout_give_the_same_convolution(rng):
    """Reversed channels and a batch broadcast from one image: views whose rows the fast transpose
    (minidl/cpu/openblas.py) cannot take, against the same values in a fresh array."""
    W = rng.standard_normal((6, 3, 3, 3))
    image = rng.standard_normal((1, 3, 9, 9))
    for x in (rng.standard_normal((2, 3, 9, 9))[:, ::-1], np.broadcast_to(image, (2, 3, 9, 9))):
        for dtype in (np.float32, np.float64):
            y, _ = winograd_conv_forward(x.astype(dtype, copy=False), W.astype(dtype), pad=1)
            want, _ = winograd_conv_forward(np.array(x, dtype=dtype), W.astype(dtype), pad=1)
            np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("b, a", [(8, 8), (4, 8), (8, 4), (3, 5)])
def test_the_tile_transform_by_sides_is_the_kronecker_product(rng, b, a):
    """kron_product applies P along each side of the tiles in turn; that is kron(P, P), also for the
    rectangular output transform A^T and its adjoint A."""
    P = rng.standard_normal((b, a))
    x = rng.standard_normal((a, a, 7))
    out = np.empty((b, b, 7))
    winograd.kron_product(P, x, out)
    np.testing.assert_allclose(out.reshape(b * b, 7), np.kron(P, P) @ x.reshape(a * a, 7),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m, r", [(4, 5), (5, 3)])
def test_slabs_of_any_size_give_the_same_convolution(rng, monkeypatch, m, r):
    """The CPU transforms the tiles a few images at a time; one image per slab and the whole batch
    in one agree (to rounding: the BLAS may round a column by where it falls in a product)."""
    x, gy = rng.standard_normal((5, 6, 13, 13)), rng.standard_normal((5, 8, 13, 13))
    W = rng.standard_normal((8, 6, r, r))

    def convolution(slab_bytes):
        monkeypatch.setattr(winograd, "SLAB_BYTES", slab_bytes)
        y, saved = winograd_conv_forward(x, W, None, r // 2, 1, m)
        return (y,) + winograd_conv_backward(gy, W.shape, saved, (True, True, False))[:2]
    for one_image, whole_batch in zip(convolution(1), convolution(1 << 30)):
        np.testing.assert_allclose(one_image, whole_batch, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, W_shape, message", [
    (dict(algorithm="fast"), (2, 3, 3, 3),
     r"conv2d algorithm must be one of auto, direct, winograd; got 'fast'"),
    (dict(algorithm="winograd"), (2, 3, 7, 7),
     r"Winograd algorithm is for 3x3 or 5x5 filters, or strided ones"),
    (dict(algorithm="winograd", stride=2), (2, 3, 3, 3),
     r"got W of shape \(2, 3, 3, 3\) with stride 2"),
])
def test_bad_choices_are_refused(kwargs, W_shape, message):
    with pytest.raises(MinidlError, match=message):
        conv2d(Tensor(np.ones((1, 3, 8, 8))), Tensor(np.ones(W_shape)), **kwargs)


def test_a_bad_environment_variable_is_refused(monkeypatch):
    monkeypatch.setenv("MINIDL_CONV_ALGORITHM", "Winograd")
    with pytest.raises(MinidlError,
                       match=r"MINIDL_CONV_ALGORITHM must be one of auto, direct, winograd"):
        conv2d(Tensor(np.ones((1, 3, 8, 8))), Tensor(np.ones((2, 3, 3, 3))))


@pytest.mark.parametrize("W_shape, kwargs, message", [
    ((2, 3, 7, 7), {},
     r"winograd convolution is for 3x3 or 5x5 filters, .* "
     r"got W of shape \(2, 3, 7, 7\) at stride 1"),
    ((2, 3, 3, 5), {},
     r"winograd convolution is for 3x3 or 5x5 filters, .* got W of shape \(2, 3, 3, 5\)"),
    ((2, 3, 3, 3), {"stride": 2},
     r"or strided ones that are 3x3 or 5x5 in stride x stride blocks; .* at stride 2"),
    ((2, 3, 3, 3), {"tile": 3}, r"winograd tile for 3x3 filters must be one of \[2, 4, 5\], got 3"),
    ((2, 3, 5, 5), {"tile": 5}, r"winograd tile for 5x5 filters must be one of \[2, 3, 4\], got 5"),
    ((2, 4, 3, 3), {}, r"input has 3 channels but W of shape \(2, 4, 3, 3\)"),
])
def test_winograd_refuses_bad_input(W_shape, kwargs, message):
    with pytest.raises(MinidlError, match=message):
        winograd_conv_forward(np.ones((1, 3, 8, 8)), np.ones(W_shape), **kwargs)


@pytest.mark.gpu
def test_auto_keeps_gpus_on_the_direct_path(rng, monkeypatch):
    monkeypatch.delenv("MINIDL_CONV_ALGORITHM", raising=False)
    calls = calls_to_winograd(monkeypatch)
    x = Tensor(rng.standard_normal((2, 32, 7, 7)), device="cuda:0")
    W = Tensor(rng.standard_normal((16, 32, 3, 3)), device="cuda:0")
    conv2d(x, W, pad=1)
    assert calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("m, r", KEYS)
@pytest.mark.parametrize("shape, out, same_pad, groups",
                         [((2, 4, 7, 6), 6, True, 2), ((3, 2, 6, 5), 3, False, 1)])
def test_on_a_gpu_matches_the_cpu_and_passes_gradcheck(rng, monkeypatch, m, r, shape, out, same_pad,
                                                       groups):
    monkeypatch.setattr(winograd, "fastest_tile", lambda oh, ow, r: m)
    # for 5x5 the input tiles overlap by 4: up to 4 tiles a pixel per side
    pad = r // 2 if same_pad else 0
    arrays = [rng.standard_normal(shape), rng.standard_normal((out, shape[1] // groups, r, r)),
              rng.standard_normal(out)]
    gy = rng.standard_normal((shape[0], out, shape[2] + 2 * pad - r + 1,
                              shape[3] + 2 * pad - r + 1))
    results = []
    for dev in ("cpu", "cuda:0"):
        inputs = [Tensor(a, requires_grad=True, device=dev) for a in arrays]
        y = conv2d(*inputs, pad=pad, groups=groups, algorithm="winograd")
        y.backward(Tensor(gy, device=dev))
        results.append([y.numpy()] + [t.grad.numpy() for t in inputs])
    for on_cpu, on_gpu in zip(*results):
        np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-10, atol=1e-10)
    inputs = [Tensor(a, requires_grad=True, device="cuda:0") for a in arrays]
    gradcheck(lambda *a: conv2d(*a, pad=pad, groups=groups, algorithm="winograd"), *inputs)


@pytest.mark.gpu
@pytest.mark.parametrize("x_shape, W_shape, stride, pad, groups", STRIDED[1:3])
def test_strided_on_a_gpu_matches_the_cpu(rng, x_shape, W_shape, stride, pad, groups):
    arrays = [rng.standard_normal(x_shape), rng.standard_normal(W_shape),
              rng.standard_normal(W_shape[0])]
    results = []
    for dev in ("cpu", "cuda:0"):
        inputs = [Tensor(a, requires_grad=True, device=dev) for a in arrays]
        y = conv2d(*inputs, stride=stride, pad=pad, groups=groups, algorithm="winograd")
        y.backward(Tensor(np.cos(np.arange(y.size)).reshape(y.shape), device=dev))
        results.append([y.numpy()] + [t.grad.numpy() for t in inputs])
    for on_cpu, on_gpu in zip(*results):
        np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-10, atol=1e-10)


def test_conv1s_float32_error_against_float64_direct(rng):
    """AlexNet's conv1 (11x11 at stride 4, 3 -> 48, 227x227, batch 2) by F(5x5, 3x3) over 4x4 blocks
    of pixels: about 1e-5 of the largest value, as F(5x5, 3x3) at stride 1."""
    x = rng.standard_normal((2, 3, 227, 227))
    W = rng.standard_normal((48, 3, 11, 11)) * np.sqrt(2 / 363)
    gy = rng.standard_normal((2, 48, 55, 55))
    inputs = [Tensor(x, requires_grad=True), Tensor(W, requires_grad=True)]
    exact = conv2d(*inputs, stride=4, algorithm="direct")
    exact.backward(Tensor(gy))
    y, saved = winograd_conv_forward(x.astype(np.float32), W.astype(np.float32), stride=4)
    gx, gW, _ = winograd_conv_backward(gy.astype(np.float32), W.shape, saved, (True, True, False))
    for name, got, want in zip(("y", "gx", "gW"), (y, gx, gW),
                               [exact.data] + [t.grad.data for t in inputs]):
        assert got.dtype == np.float32
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < 5e-5, f"{name}: relative error {error:.2e}"
