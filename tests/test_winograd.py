"""Winograd 3x3 convolution (minidl/functions/winograd.py): its matrices, values against a NumPy
reference and the direct path, float64 gradient checks, float32 error, and the algorithm choice."""
import numpy as np
import pytest

from minidl import Tensor, cpu_parallel, gradcheck
from minidl.errors import MinidlError
from minidl.functions import conv2d, winograd
from minidl.functions.winograd import TRANSFORMS, winograd_conv_backward, winograd_conv_forward


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
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", inputs[:, :, i:i + oh, j:j + ow],
                                                       W[g * og:(g + 1) * og, :, i, j])
    return y if b is None else y + b.reshape(1, out, 1, 1)


def direct(x, W, b, pad, groups, gy):
    """y, gx, gW, gb of the direct (im2col + GEMM) path."""
    inputs = [Tensor(a, requires_grad=True) for a in (x, W) + ((b,) if b is not None else ())]
    y = conv2d(*inputs, pad=pad, groups=groups, algorithm="direct")
    y.backward(Tensor(gy))
    return [y.data] + [t.grad.data for t in inputs]


@pytest.mark.parametrize("tile", sorted(TRANSFORMS))
def test_the_matrices_compute_a_one_dimensional_correlation(tile, rng):
    f = TRANSFORMS[tile]
    d, g = rng.standard_normal(f.t), rng.standard_normal(3)
    expected = [d[i:i + 3] @ g for i in range(f.m)]
    np.testing.assert_allclose(f.AT @ ((f.G @ g) * (f.BT @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile", sorted(TRANSFORMS))
@pytest.mark.parametrize("shape, out, pad, groups, bias", [
    ((2, 3, 7, 7), 5, 1, 1, True),     # odd size, padded
    ((3, 4, 8, 6), 6, 0, 2, False),    # even sizes, no padding, groups
    ((2, 6, 13, 13), 4, 1, 2, True),   # AlexNet's map size
    ((1, 2, 3, 5), 2, 0, 1, True),     # one output row: tiles mostly overhang
])
def test_matches_the_reference_and_the_direct_path(rng, tile, shape, out, pad, groups, bias):
    x = rng.standard_normal(shape)
    W = rng.standard_normal((out, shape[1] // groups, 3, 3))
    b = rng.standard_normal(out) if bias else None
    y, saved = winograd_conv_forward(x, W, b, pad, groups, tile)
    np.testing.assert_allclose(y, reference_conv(x, W, b, pad, groups), rtol=1e-10, atol=1e-10)
    gy = rng.standard_normal(y.shape)
    gx, gW, gb = winograd_conv_backward(gy, W.shape, saved, (True, True, bias))
    expected = direct(x, W, b, pad, groups, gy)
    for got, want in zip((y, gx, gW, gb), expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    assert y.flags.c_contiguous and y.dtype == x.dtype


@pytest.mark.parametrize("tile", sorted(TRANSFORMS))
@pytest.mark.parametrize("shape, out, pad, groups", [((2, 4, 5, 6), 6, 1, 2), ((3, 2, 6, 5), 3, 0, 1)])
def test_gradients_pass_gradcheck(rng, monkeypatch, tile, shape, out, pad, groups):
    monkeypatch.setattr(winograd, "fastest_tile", lambda oh, ow: tile)  # conv2d's choice, fixed for the check
    x = Tensor(rng.standard_normal(shape), requires_grad=True)
    W = Tensor(rng.standard_normal((out, shape[1] // groups, 3, 3)), requires_grad=True)
    b = Tensor(rng.standard_normal(out), requires_grad=True)
    gradcheck(lambda *a: conv2d(*a, pad=pad, groups=groups, algorithm="winograd"), x, W, b)


def test_only_the_wanted_gradients_are_computed(rng):
    x = Tensor(rng.standard_normal((2, 3, 6, 6)))  # an image: no gradient wanted
    W = Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True)
    conv2d(x, W, pad=1, algorithm="winograd").sum().backward()
    assert x.grad is None and W.grad.shape == W.shape
    _, saved = winograd_conv_forward(x.data, W.data, pad=1)
    assert winograd_conv_backward(np.ones((2, 4, 6, 6)), W.shape, saved, (False, True, False))[::2] == (None, None)


@pytest.mark.parametrize("tile, bound", [(2, 3e-6), (4, 5e-5)])
def test_float32_error_against_float64_direct(rng, tile, bound):
    """Relative to the largest value, at AlexNet conv4's shape (batch 4): F(2x2) is close to the direct
    float32 path (about 4e-7 here), F(4x4) some 10x worse (about 1e-5), from its larger matrix entries."""
    x = rng.standard_normal((4, 192, 13, 13))
    W = rng.standard_normal((192, 192, 3, 3)) * np.sqrt(2 / (192 * 9))  # He's scale: outputs about 1
    gy = rng.standard_normal((4, 192, 13, 13))
    exact = direct(x, W, None, 1, 1, gy)
    y, saved = winograd_conv_forward(x.astype(np.float32), W.astype(np.float32), None, 1, 1, tile)
    gx, gW, _ = winograd_conv_backward(gy.astype(np.float32), W.shape, saved, (True, True, False))
    for name, got, want in zip(("y", "gx", "gW"), (y, gx, gW), exact):
        assert got.dtype == np.float32
        error = np.abs(got - want).max() / np.abs(want).max()
        assert error < bound, f"{name}: relative error {error:.2e} with F({tile}x{tile}, 3x3)"


def test_tile_choice_counts_multiplications():
    assert winograd.fastest_tile(13, 13) == 4  # 36 * 4*4 = 576 against 16 * 7*7 = 784
    assert winograd.fastest_tile(6, 6) == 2    # 144 each: the tie goes to the more accurate
    assert winograd.fastest_tile(1, 1) == 2


def calls_to_winograd(monkeypatch):
    calls = []
    real = winograd.winograd_conv_forward

    def spy(*args, **kwargs):
        calls.append(args[1].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(winograd, "winograd_conv_forward", spy)
    return calls


def test_auto_takes_winograd_for_3x3_stride_1_with_enough_channels(rng, monkeypatch):
    monkeypatch.delenv("MINIDL_CONV_ALGORITHM", raising=False)
    calls = calls_to_winograd(monkeypatch)
    x = Tensor(rng.standard_normal((1, 32, 9, 9)))
    conv2d(x, Tensor(rng.standard_normal((16, 32, 3, 3))), pad=1)
    conv2d(x, Tensor(rng.standard_normal((32, 16, 3, 3))), groups=2)
    conv2d(x, Tensor(rng.standard_normal((16, 32, 3, 3))), stride=2)         # stride 2: direct
    conv2d(x, Tensor(rng.standard_normal((16, 32, 5, 5))))                   # 5x5: direct
    conv2d(x, Tensor(rng.standard_normal((8, 32, 3, 3))))                    # 8 outputs: direct
    conv2d(x[:, :8], Tensor(rng.standard_normal((16, 8, 3, 3))))             # 8 inputs: direct
    assert calls == [(16, 32, 3, 3), (32, 16, 3, 3)]


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


@pytest.mark.parametrize("tile", sorted(TRANSFORMS))
def test_results_do_not_depend_on_the_core_count(rng, monkeypatch, tile):
    shapes = (5, 6, 13, 13), (8, 3, 3, 3), (5, 8, 13, 13)
    x, W, gy = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)

    def step(cores):
        monkeypatch.setattr(cpu_parallel, "core_count", lambda: cores)  # batch 5: uneven shares
        y, saved = winograd_conv_forward(x, W, None, 1, 2, tile)
        return (y,) + winograd_conv_backward(gy, W.shape, saved, (True, True, True))
    for single, split in zip(step(1), step(3)):
        np.testing.assert_array_equal(single, split)


@pytest.mark.parametrize("kwargs, W_shape, message", [
    (dict(algorithm="fast"), (2, 3, 3, 3), r"conv2d algorithm must be one of auto, direct, winograd; got 'fast'"),
    (dict(algorithm="winograd"), (2, 3, 5, 5), r"Winograd algorithm is for 3x3 stride-1 convolutions"),
    (dict(algorithm="winograd", stride=2), (2, 3, 3, 3), r"Winograd algorithm is for 3x3 stride-1 convolutions"),
])
def test_bad_choices_are_refused(kwargs, W_shape, message):
    with pytest.raises(MinidlError, match=message):
        conv2d(Tensor(np.ones((1, 3, 8, 8))), Tensor(np.ones(W_shape)), **kwargs)


def test_a_bad_environment_variable_is_refused(monkeypatch):
    monkeypatch.setenv("MINIDL_CONV_ALGORITHM", "Winograd")
    with pytest.raises(MinidlError, match=r"MINIDL_CONV_ALGORITHM must be one of auto, direct, winograd"):
        conv2d(Tensor(np.ones((1, 3, 8, 8))), Tensor(np.ones((2, 3, 3, 3))))


@pytest.mark.parametrize("W_shape, kwargs, message", [
    ((2, 3, 5, 5), {}, r"winograd convolution is for 3x3 filters, got W of shape \(2, 3, 5, 5\)"),
    ((2, 3, 3, 3), {"tile": 3}, r"winograd tile must be one of \[2, 4\], got 3"),
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
@pytest.mark.parametrize("tile", sorted(TRANSFORMS))
@pytest.mark.parametrize("shape, out, pad, groups", [((2, 4, 7, 6), 6, 1, 2), ((3, 2, 6, 5), 3, 0, 1)])
def test_on_a_gpu_matches_the_cpu_and_passes_gradcheck(rng, monkeypatch, tile, shape, out, pad, groups):
    monkeypatch.setattr(winograd, "fastest_tile", lambda oh, ow: tile)
    arrays = [rng.standard_normal(shape), rng.standard_normal((out, shape[1] // groups, 3, 3)),
              rng.standard_normal(out)]
    gy = rng.standard_normal((shape[0], out, shape[2] + 2 * pad - 2, shape[3] + 2 * pad - 2))
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
