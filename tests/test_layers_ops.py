"""Convolution, LRN, max pooling and dropout: NumPy references written here, float64
gradient checks, and (marker gpu) every CUDA kernel against the NumPy path at AlexNet's
real shapes, batch 128."""
import numpy as np
import pytest

from minidl import Tensor, device, gradcheck, kernels
from minidl.device import cupy
from minidl.errors import MinidlError
from minidl.functions import conv2d, dropout, local_response_norm, max_pool2d
from minidl.functions.dropout import seed as seed_dropout


def t(dev, array, grad=True):
    return Tensor(np.asarray(array, dtype=np.float64), requires_grad=grad, device=dev)


# --- references: direct loops over the formulas

def conv_reference(x, W, b, stride, pad, groups):
    n, c, h, w = x.shape
    out, cg, kh, kw = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    y = np.zeros((n, out, oh, ow))
    per_group = out // groups
    for o in range(out):
        g = o // per_group
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, g * cg:(g + 1) * cg, i * stride:i * stride + kh, j * stride:j * stride + kw]
                y[:, o, i, j] = (patch * W[o]).sum(axis=(1, 2, 3)) + (b[o] if b is not None else 0)
    return y


def lrn_reference(a, n, k, alpha, beta):
    """b[i] = a[i] / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a[j]^2)^beta"""
    channels = a.shape[1]
    out = np.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(axis=1)) ** beta
    return out


def pool_reference(x, k, s, pad):
    """Max and the flat input index of the first maximum in scan order, per window."""
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    y = np.empty((n, c, oh, ow))
    grad = np.zeros((n, c, h + 2 * pad, w + 2 * pad))
    for a in range(n):
        for b in range(c):
            for i in range(oh):
                for j in range(ow):
                    window = xp[a, b, i * s:i * s + k, j * s:j * s + k]
                    r, q = divmod(int(np.argmax(window)), k)  # argmax: the first maximum
                    y[a, b, i, j] = window[r, q]
                    grad[a, b, i * s + r, j * s + q] += 1.0
    return y, grad[:, :, pad:pad + h, pad:pad + w]


# --- convolution

@pytest.mark.parametrize("shape, wshape, stride, pad, groups, bias", [
    ((2, 4, 7, 6), (6, 2, 3, 3), 1, 1, 2, True),    # groups=2, odd sizes
    ((1, 3, 15, 15), (4, 3, 5, 5), 4, 2, 1, True),  # stride 4, pad 2, batch 1
    ((2, 3, 6, 9), (2, 3, 2, 3), 2, 0, 1, False),   # no bias, rectangular input
])
def test_conv2d_matches_loops_and_passes_gradcheck(dev, rng, shape, wshape, stride, pad, groups, bias):
    x, W = t(dev, rng.standard_normal(shape)), t(dev, rng.standard_normal(wshape))
    b = t(dev, rng.standard_normal(wshape[0])) if bias else None
    y = conv2d(x, W, b, stride, pad, groups)
    np.testing.assert_allclose(y.numpy(), conv_reference(x.numpy(), W.numpy(), None if b is None else b.numpy(),
                                                         stride, pad, groups), rtol=1e-10, atol=1e-10)
    inputs = (x, W, b) if bias else (x, W)
    gradcheck(lambda *a: conv2d(*a, stride=stride, pad=pad, groups=groups), *inputs)


def test_conv2d_skips_the_input_gradient_when_not_needed(rng):
    x = t("cpu", rng.standard_normal((1, 2, 5, 5)), grad=False)
    W = t("cpu", rng.standard_normal((3, 2, 3, 3)))
    conv2d(x, W).sum().backward()
    assert x.grad is None and W.grad is not None


@pytest.mark.parametrize("x_shape, w_shape, kwargs, message", [
    ((1, 3, 4, 9), (2, 3, 5, 5), {}, r"window 5 is larger than the padded input 4 \+ 2\*0"),
    ((1, 3, 8, 8), (2, 4, 3, 3), {}, r"input has 3 channels but W of shape \(2, 4, 3, 3\)"),
    ((1, 4, 8, 8), (3, 2, 3, 3), {"groups": 2}, r"3 output channels cannot be split into 2 groups"),
    ((3, 8, 8), (2, 3, 3, 3), {}, r"wants x of shape \(N, C, H, W\)"),
    ((1, 3, 8, 8), (2, 3, 3, 3), {"stride": 0}, r"stride must be at least 1"),
])
def test_conv2d_errors(x_shape, w_shape, kwargs, message):
    with pytest.raises(MinidlError, match=message):
        conv2d(Tensor(np.ones(x_shape)), Tensor(np.ones(w_shape)), **kwargs)


# --- local response normalization

@pytest.mark.parametrize("channels", [3, 7, 12])  # fewer than n, and a count that divides nothing
@pytest.mark.parametrize("alpha_over_n", [False, True])
def test_lrn_matches_the_formula_and_passes_gradcheck(dev, rng, channels, alpha_over_n):
    x = t(dev, rng.standard_normal((2, channels, 3, 4)) * 3)
    alpha = 0.05  # large, so the normalisation matters in the check
    y = local_response_norm(x, 5, 2.0, alpha, 0.75, alpha_over_n)
    expected = lrn_reference(x.numpy(), 5, 2.0, alpha / 5 if alpha_over_n else alpha, 0.75)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12)
    gradcheck(lambda x: local_response_norm(x, 5, 2.0, alpha, 0.75, alpha_over_n), x)


def test_lrn_paper_constants_are_the_default(rng):
    x = rng.standard_normal((1, 8, 2, 2)) * 40
    y = local_response_norm(Tensor(x)).numpy()
    np.testing.assert_allclose(y, lrn_reference(x, 5, 2.0, 1e-4, 0.75), rtol=1e-12)


@pytest.mark.parametrize("name, fn", [("local_response_norm", local_response_norm),
                                      ("max_pool2d", lambda x: max_pool2d(x, 3, 2, pad=1))])
def test_integer_tensors_are_refused(dev, name, fn):
    with pytest.raises(MinidlError, match=f"{name} needs floating-point x, got int32"):
        fn(Tensor(np.arange(32, dtype=np.int32).reshape(1, 8, 2, 2), device=dev))


# --- max pooling

@pytest.mark.parametrize("shape, k, s, pad", [((2, 3, 7, 9), 3, 2, 0), ((1, 2, 6, 6), 3, 2, 1),
                                              ((2, 1, 5, 5), 2, 1, 0), ((1, 2, 13, 13), 3, 2, 0),
                                              ((2, 2, 10, 11), 2, 3, 0)])  # gaps between the windows
def test_max_pool_matches_loops_and_passes_gradcheck(dev, rng, shape, k, s, pad):
    x = t(dev, rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01)  # distinct: no ties
    y = max_pool2d(x, k, s, pad)
    ref, ref_grad = pool_reference(x.numpy(), k, s, pad)
    np.testing.assert_array_equal(y.numpy(), ref)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), ref_grad)
    gradcheck(lambda x: max_pool2d(x, k, s, pad), t(dev, x.numpy()))


def test_max_pool_ties_send_the_gradient_to_the_first_in_scan_order(dev):
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = 2.0  # two equal maxima in the first window
    x[0, 0, 2:5, 2:5] = 1.0               # an all-equal window
    x[0, 0, 2, 2] = 1.0
    xt = t(dev, x)
    y = max_pool2d(xt, 3, 2)
    y.sum().backward()
    grad = xt.grad.numpy()[0, 0]
    _, ref_grad = pool_reference(x, 3, 2, 0)
    np.testing.assert_array_equal(grad, ref_grad[0, 0])
    assert grad[0, 1] == 1.0 and grad[1, 0] == 0.0  # (0, 1) comes first in scan order
    assert grad[2, 2] == 3.0 and grad[2:5, 2:5].sum() == 3.0  # the three windows it is first in
    assert grad.sum() == y.size  # exactly one element per window gets the gradient


@pytest.mark.parametrize("k, s, pad", [(3, 2, 0), (3, 2, 1), (2, 2, 0), (4, 3, 1)])
def test_max_pool_with_many_ties_follows_the_scan_order_reference(dev, rng, k, s, pad):
    x = rng.integers(0, 3, (2, 3, 9, 11)).astype(np.float64)  # three values: most windows tie
    xt = t(dev, x)
    y = max_pool2d(xt, k, s, pad)
    y.sum().backward()
    ref, ref_grad = pool_reference(x, k, s, pad)
    np.testing.assert_array_equal(y.numpy(), ref)
    np.testing.assert_array_equal(xt.grad.numpy(), ref_grad)


def test_max_pool_errors():
    with pytest.raises(MinidlError, match=r"window 3 is larger than the padded input 2"):
        max_pool2d(Tensor(np.ones((1, 1, 2, 8))), 3, 2)
    with pytest.raises(MinidlError, match=r"padding 2 must be less than half the window 3"):
        max_pool2d(Tensor(np.ones((1, 1, 8, 8))), 3, 2, 2)


def test_alexnet_pool_sizes():
    for size, expected in [(55, 27), (27, 13), (13, 6)]:
        assert max_pool2d(Tensor(np.ones((1, 1, size, size))), 3, 2).shape == (1, 1, expected, expected)


# --- dropout

def test_dropout_is_inverted_and_seeded(dev):
    x = Tensor(np.ones((200, 500), np.float32), device=dev)
    seed_dropout(7)
    a = dropout(x, 0.5).numpy()
    seed_dropout(7)
    b = dropout(x, 0.5).numpy()
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a)) == {0.0, 2.0}
    assert abs((a == 0).mean() - 0.5) < 0.01 and abs(a.mean() - 1.0) < 0.02
    assert dropout(x, 0.5, train=False) is x and dropout(x, 0.0) is x


@pytest.mark.parametrize("p", [0.5, 0.3, 0.9])
def test_dropout_drops_a_fraction_p_independently(dev, p):
    x = Tensor(np.ones((200, 500), np.float32), device=dev)
    seed_dropout(11)
    first, second = dropout(x, p).numpy(), dropout(x, p).numpy()  # two calls: two masks
    assert set(np.unique(first)) == {0.0, np.float32(1 / (1 - p))}
    for y in (first, second):  # 1e5 draws: the fraction's standard deviation is below 0.0016
        assert abs((y == 0).mean() - p) < 0.01 and abs(y.mean() - 1.0) < 0.1
    assert abs(((first == 0) & (second == 0)).mean() - p * p) < 0.01
    kept = (first > 0).astype(float)  # neither neighbouring elements nor neighbouring rows are correlated
    assert abs(np.corrcoef(kept[:, :-1].ravel(), kept[:, 1:].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(kept[:-1].ravel(), kept[1:].ravel())[0, 1]) < 0.02


def test_dropout_masks_are_a_function_of_the_global_row(dev):
    """Rows a..b of a batch, given as a batch of their own with first_row=a (a data-parallel rank's share),
    draw the masks the whole batch draws for them."""
    x = np.ones((12, 3, 10), np.float32)
    seed_dropout(5)
    whole = dropout(Tensor(x, device=dev), 0.5).numpy()
    for a, b in ((0, 4), (4, 12), (7, 9)):
        seed_dropout(5, first_row=a)
        np.testing.assert_array_equal(dropout(Tensor(x[a:b], device=dev), 0.5).numpy(), whole[a:b])
    seed_dropout(6)
    assert not np.array_equal(dropout(Tensor(x, device=dev), 0.5).numpy(), whole)  # another seed, other masks


def test_dropout_gradient_uses_the_same_mask(dev, rng):
    x = t(dev, rng.standard_normal((4, 6)))
    seed_dropout(3)
    gradcheck(lambda x: (seed_dropout(3), dropout(x, 0.3))[1], x)


def test_dropout_probability_is_checked():
    with pytest.raises(MinidlError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        dropout(Tensor(np.ones(3)), 1.0)


# --- GPU: each kernel against the NumPy path at AlexNet's shapes, batch 128

def _relative(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _compare(fn, *arrays, tol, grad_tol=None):
    """fn on the CPU and on cuda:0, forward and backward with the same upstream gradient."""
    rng = np.random.default_rng(11)
    cpu = [Tensor(a, requires_grad=True) for a in arrays]
    gpu = [Tensor(a, requires_grad=True, device="cuda:0") for a in arrays]
    y_cpu, y_gpu = fn(*cpu), fn(*gpu)
    assert y_gpu.shape == y_cpu.shape and np.isfinite(y_gpu.numpy()).all()
    assert _relative(y_gpu.numpy(), y_cpu.numpy()) < tol
    gy = rng.uniform(0.5, 1.5, y_cpu.shape).astype(np.float32)
    y_cpu.backward(gy)
    y_gpu.backward(gy)
    for a, b in zip(cpu, gpu):
        assert _relative(b.grad.numpy(), a.grad.numpy()) < (grad_tol or tol)


@pytest.mark.gpu
def test_gpu_conv1_at_alexnet_shape():
    rng = np.random.default_rng(1)
    x = rng.uniform(0.1, 1.0, (128, 3, 227, 227)).astype(np.float32)
    W = rng.standard_normal((96, 3, 11, 11)).astype(np.float32) * 0.01
    b = rng.uniform(0.1, 1.0, 96).astype(np.float32)
    _compare(lambda x, W, b: conv2d(x, W, b, stride=4), x, W, b, tol=1e-3)


@pytest.mark.gpu
def test_gpu_grouped_conv2_at_alexnet_shape():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.1, 1.0, (128, 96, 27, 27)).astype(np.float32)
    W = rng.standard_normal((256, 48, 5, 5)).astype(np.float32) * 0.01
    _compare(lambda x, W: conv2d(x, W, pad=2, groups=2), x, W, tol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 96, 55, 55), (128, 256, 27, 27)])
def test_gpu_lrn_at_alexnet_shapes(shape):
    x = np.random.default_rng(3).uniform(0.1, 30.0, shape).astype(np.float32)
    _compare(local_response_norm, x, tol=1e-5)
    _compare(lambda x: local_response_norm(x, alpha=5e-4, alpha_over_n=True), x, tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 96, 55, 55), (128, 256, 27, 27), (128, 256, 13, 13)])
def test_gpu_max_pool_at_alexnet_shapes(shape):
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)  # continuous: no ties
    _compare(lambda x: max_pool2d(x, 3, 2), x, tol=1e-7)


@pytest.mark.gpu
def test_gpu_max_pool_ties_agree_with_cpu():
    x = np.random.default_rng(5).integers(0, 3, (4, 8, 13, 13)).astype(np.float32)  # many ties
    _compare(lambda x: max_pool2d(x, 3, 2), x, tol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("fn", [lambda x: conv2d(x, Tensor(np.random.default_rng(0).standard_normal((4, 3, 3, 3)),
                                                                device=x.device), pad=1, stride=2),
                                lambda x: local_response_norm(x, alpha=0.05),
                                lambda x: max_pool2d(x, 3, 2, 1)])
def test_gpu_float64_gradcheck(fn):
    x = Tensor(np.random.default_rng(6).standard_normal((2, 3, 7, 7)), requires_grad=True, device="cuda:0")
    gradcheck(fn, x)


@pytest.mark.gpu
@pytest.mark.gpu_memory(30)
def test_gpu_kernel_beyond_two_to_the_31_elements():
    cp = cupy()
    n, c, h, w = 1, 96, 4736, 4736  # 2,153,… million elements > 2^31, about 8.6 GB of float32
    assert n * c * h * w > 2 ** 31
    x = cp.random.default_rng(7).random((n, c, h, w), dtype=cp.float32) + 0.5
    y = local_response_norm(Tensor(x, device="cuda:0")).data
    for row in (0, h // 2, h - 1):  # compare whole rows at the start, middle and far end
        ref = lrn_reference(cp.asnumpy(x[:, :, row:row + 1, :]).astype(np.float64), 5, 2.0, 1e-4, 0.75)
        np.testing.assert_allclose(cp.asnumpy(y[:, :, row:row + 1, :]), ref, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_launch_packs_every_argument_by_one_rule(rng):
    from minidl.functions.conv import CU, im2col_cpu
    dev = device("cuda:0")
    x = rng.standard_normal((3, 2, 5, 4)).astype(np.float32).transpose(1, 0, 2, 3)  # (N, C, H, W) = (2, 3, 5, 4)
    sizes = (2, 3, 5, 4, 3, 3, 2, 1, 3, 2)  # N, C, H, W, KH, KW, stride, pad, OH, OW: Python ints, long longs
    with dev:
        x_gpu = dev.xp.asarray(x.transpose(1, 0, 2, 3)).transpose(1, 0, 2, 3)  # not C-contiguous: passed as a copy
        cols = kernels.empty((3, 3, 3, 2, 3, 2), np.float32)
        kernels.launch(CU, "im2col", np.float32, cols.size, x_gpu, cols, cols.size, *sizes)
        np.testing.assert_array_equal(cols.get(), im2col_cpu(x, 3, 3, 2, 1, 3, 2))
        with pytest.raises(MinidlError, match="an array of float64 where float32"):
            kernels.launch(CU, "im2col", np.float32, cols.size, x_gpu.astype(np.float64), cols, cols.size, *sizes)
        with pytest.raises(MinidlError, match="a device array, int or float is needed, got int64"):
            kernels.launch(CU, "im2col", np.float32, cols.size, x_gpu, cols, np.int64(cols.size), *sizes)
        with pytest.raises(MinidlError, match="conv.cu has no kernel 'im2row'"):
            kernels.launch(CU, "im2row", np.float32, 1)
