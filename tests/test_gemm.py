"""GEMMs on GPUs: 2-D cuBLAS products with transposes as flags, at the chosen precision, and bias + ReLU in one pass.

The GPU tests run on emulated GPUs (`pytest --emulate-gpus 2`), whose 2-D float32 GEMMs round their inputs to
TF32 under CuPy's TF32 compute type, as tensor cores read them.

TF32's tolerance: an input rounded to 10 mantissa bits is off by at most u = 2^-11 of itself, so a product by at
most (2u + u^2) of |a b|, and an FP32 sum of K of them adds at most K * 2^-24 of sum |a b|: each element of
C = A B is within (2u + u^2 + K 2^-24) (|A| |B|) of the exact product (the bound checked below). The errors
are independent roundings, so in practice they grow as sqrt(K), not K.
"""
import os

import numpy as np
import pytest

from minidl import Tensor, gradcheck
from minidl.device import device
from minidl.functions import conv2d, linear, relu
from minidl.functions.gemm import grouped_matmul, matmul
from minidl.errors import MinidlError
from minidl.precision import DEFAULT_PRECISION, PRECISIONS, precision, set_precision
from minidl.training.checkpoint import load_checkpoint
from test_cli import dataset, image_dir  # noqa: F401 -- the 3-class dataset fixtures
from test_gpu_end_to_end import train_on_the_cpu_and_two_gpus

EMULATED = bool(os.environ.get("MINIDL_EMULATE_GPUS"))
emulated_only = pytest.mark.skipif(not EMULATED, reason="reads the GPU emulator's ledger: run with --emulate-gpus 2")
U = 2.0 ** -11  # TF32's unit roundoff


def _grouped_on_gpu(a, b_transposed):
    """grouped_matmul(a, b) on cuda:0's stream, b given as its transpose (so the operand is an F-contiguous view)."""
    with device("cuda:0") as gpu:
        cp = gpu.xp
        return grouped_matmul(cp.asarray(a), cp.asarray(b_transposed).swapaxes(1, 2)).get()


def test_tf32_is_the_default_and_a_precision_is_checked():
    assert precision() == DEFAULT_PRECISION == "tf32" and PRECISIONS == ("tf32", "fp32", "fp16", "bf16")
    with pytest.raises(MinidlError, match=r"precision must be one of tf32, fp32, fp16, bf16; got 'fp64'"):
        set_precision("fp64")


@emulated_only
def test_round_to_tf32_keeps_10_mantissa_bits_to_nearest():
    from minidl_emulator.xp import round_to_tf32
    x = np.array([1, 1 + 2 ** -10, 1 + 2 ** -11, 1 + 2 ** -11 + 2 ** -20, -(1 + 2 ** -12), np.inf, -np.inf], np.float32)
    expected = np.array([1, 1 + 2 ** -10, 1 + 2 ** -10, 1 + 2 ** -10, -1, np.inf, -np.inf], np.float32)
    np.testing.assert_array_equal(round_to_tf32(x), expected)
    assert np.isnan(round_to_tf32(np.array([np.nan], np.float32))).all()


@pytest.mark.gpu
@emulated_only
@pytest.mark.parametrize("name, unit", [("tf32", "tf32"), ("fp32", "fp32-simt")])
def test_conv_gemms_are_2d_at_the_precision_without_copies(rng, charged, at_precision, name, unit):
    at_precision(name)
    x = Tensor(rng.standard_normal((2, 4, 9, 9)).astype(np.float32), device="cuda:0", requires_grad=True)
    W = Tensor(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), device="cuda:0", requires_grad=True)
    b = Tensor(np.zeros(6, np.float32), device="cuda:0", requires_grad=True)
    start = len(charged())
    conv2d(x, W, b, pad=1, groups=2).sum().backward()
    entries = charged()[start:]
    gemms = [e for e in entries if e.kind == "gemm"]
    assert len(gemms) == 3 * 2  # forward, weight and input gradients, per group
    assert {e.unit for e in gemms} == {unit} and {e.name for e in gemms} == {"dot (2-D)"}
    assert not [e for e in entries if e.hidden]


@pytest.mark.gpu
@emulated_only
def test_gemm_error_under_tf32_is_within_its_bound_and_fp32_is_exact_as_before(rng, at_precision):
    k = 512
    a = rng.standard_normal((2, 40, k)).astype(np.float32)
    b = rng.standard_normal((2, k, 30)).astype(np.float32)
    exact = a.astype(np.float64) @ b
    bound = (2 * U + U * U + k * 2.0 ** -24) * (np.abs(a).astype(np.float64) @ np.abs(b))
    errors = {}
    for name in PRECISIONS:
        at_precision(name)
        result = _grouped_on_gpu(a, np.ascontiguousarray(b.swapaxes(1, 2)))
        errors[name] = np.abs(result - exact)
        assert (errors[name] <= bound).all(), name
    # FP32: within FP32's own bound of the exact product, as the CPU's float32 product is
    fp32_bound = k * 2.0 ** -24 * (np.abs(a).astype(np.float64) @ np.abs(b))
    assert (errors["fp32"] <= fp32_bound).all() and (np.abs(a @ b - exact) <= fp32_bound).all()
    # TF32 is really emulated: its error is that of 10-bit inputs (sqrt(K) u |a||b| typically), far above FP32's
    typical = U * np.sqrt(k) / np.sqrt(3)  # rms of a rounding error u/sqrt(3) per input, summed over K products
    assert 0.2 * typical < np.sqrt(np.mean(errors["tf32"] ** 2)) < 5 * typical
    assert errors["tf32"].max() > 30 * errors["fp32"].max()


def test_the_cpu_ignores_the_precision(rng, at_precision):
    x, W = rng.standard_normal((2, 3, 7, 7)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    results = []
    for name in PRECISIONS:
        at_precision(name)
        results.append(conv2d(Tensor(x), Tensor(W), pad=1).numpy())
        results.append(matmul(x.reshape(6, -1), x.reshape(6, -1).T))
    np.testing.assert_array_equal(results[0], results[2])
    np.testing.assert_array_equal(results[1], results[3])


# --- bias + ReLU in one pass

def _t(dev, array, dtype=np.float64):
    return Tensor(np.asarray(array, dtype=dtype), requires_grad=True, device=dev)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("algorithm", ["direct", "winograd"])
def test_conv_with_relu_is_relu_of_conv_and_passes_gradcheck(dev, rng, bias, algorithm):
    x, W = _t(dev, rng.standard_normal((2, 4, 6, 5))), _t(dev, rng.standard_normal((6, 2, 3, 3)))
    b = _t(dev, rng.standard_normal(6)) if bias else None
    inputs = (x, W, b) if bias else (x, W)
    fused = conv2d(*inputs, pad=1, groups=2, algorithm=algorithm, activation="relu")
    apart = relu(conv2d(*inputs, pad=1, groups=2, algorithm=algorithm))
    np.testing.assert_array_equal(fused.numpy(), apart.numpy())
    gradcheck(lambda *a: conv2d(*a, pad=1, groups=2, algorithm=algorithm, activation="relu"), *inputs)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_relu_is_relu_of_linear_and_passes_gradcheck(dev, rng, bias):
    x, W = _t(dev, rng.standard_normal((5, 7))), _t(dev, rng.standard_normal((4, 7)))
    b = _t(dev, rng.standard_normal(4)) if bias else None
    inputs = (x, W, b) if bias else (x, W)
    np.testing.assert_array_equal(linear(*inputs, activation="relu").numpy(), relu(linear(*inputs)).numpy())
    gradcheck(lambda *a: linear(*a, activation="relu"), *inputs)


@pytest.mark.gpu
def test_fused_float32_matches_the_cpu_and_propagates_nan(rng, at_precision):
    at_precision("fp32")
    x = rng.standard_normal((3, 4, 5, 5)).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    W, b = rng.standard_normal((6, 4, 3, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    results = []
    for dev in ("cpu", "cuda:0"):
        tensors = [Tensor(a, device=dev, requires_grad=True) for a in (x, W, b)]
        y = conv2d(*tensors, pad=1, activation="relu")
        y.sum().backward()
        results.append([y.numpy()] + [t.grad.numpy() for t in tensors[1:]])
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)
    assert np.isnan(results[1][0]).sum() == np.isnan(results[0][0]).sum() > 0


def _backward_names(charged, function, arrays):
    """The names of the device operations of function(*tensors).sum().backward() on cuda:0 (syncs left out)."""
    tensors = [Tensor(a, device="cuda:0", requires_grad=True) for a in arrays]
    start = len(charged())
    function(*tensors).sum().backward()
    return [e.name for e in charged()[start:] if e.kind != "sync"]


@pytest.mark.gpu
@emulated_only
def test_bias_and_relu_are_one_pass_each_way(rng, charged):
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in ((2, 3, 6, 6), (4, 3, 3, 3), (4,))]
    fused = _backward_names(charged, lambda x, W, b: conv2d(x, W, b, activation="relu"), arrays)
    apart = _backward_names(charged, lambda x, W, b: relu(conv2d(x, W, b)), arrays)
    # the add and the maximum in one kernel; ReLU's mask, the transposition for the GEMMs and the bias's sum in
    # another
    assert "kernel bias_relu_cnl_to_nchw<float>" in fused and "add" not in fused
    assert "kernel relu_backward_nchw_to_cnl<float>" in fused and "reshape" not in fused
    assert fused.count("sum") == 1 and apart.count("sum") == 2  # the loss's; apart, the bias's gradient's too
    assert len(fused) == len(apart) - 3


@pytest.mark.gpu
@emulated_only
def test_a_linear_layers_relu_backward_sums_its_bias_in_the_same_launch(rng, charged):
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in ((6, 5), (7, 5), (7,))]
    fused = _backward_names(charged, lambda x, W, b: linear(x, W, b, activation="relu"), arrays)
    apart = _backward_names(charged, lambda x, W, b: relu(linear(x, W, b)), arrays)
    assert "kernel relu_backward_bias_rows<float>" in fused
    assert fused.count("sum") == 1 and apart.count("sum") == 2  # the loss's; apart, the bias's gradient's too
    assert len(fused) == len(apart) - 2  # one kernel for the add and the maximum, one for the mask and the sum


ODD_SHAPES = [  # N*OH*OW not a multiple of 32, one output channel; rows not a multiple of ROWS_PER_THREAD
    pytest.param((3, 2, 5, 4), (1, 2, 3, 3), (5, 7), (1, 7), id="one channel, 3x20 outputs, 5 rows"),
    pytest.param((1, 3, 6, 6), (5, 3, 3, 3), (9, 3), (2, 3), id="one image, 36 outputs, 9 rows"),
]


@pytest.mark.parametrize("x_shape, W_shape, fc_x_shape, fc_W_shape", ODD_SHAPES)
def test_relu_layers_with_a_bias_pass_gradcheck_at_odd_shapes(dev, rng, x_shape, W_shape, fc_x_shape, fc_W_shape):
    x, W, b = (_t(dev, rng.standard_normal(s)) for s in (x_shape, W_shape, W_shape[:1]))
    gradcheck(lambda *a: conv2d(*a, pad=1, activation="relu"), x, W, b)
    x, W, b = (_t(dev, rng.standard_normal(s)) for s in (fc_x_shape, fc_W_shape, fc_W_shape[:1]))
    gradcheck(lambda *a: linear(*a, activation="relu"), x, W, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, W_shape, fc_x_shape, fc_W_shape", ODD_SHAPES)
def test_bias_gradients_match_the_cpu_and_repeat_bit_for_bit(dtype, x_shape, W_shape, fc_x_shape, fc_W_shape,
                                                             at_precision):
    at_precision("fp32")
    rng = np.random.default_rng()  # fresh inputs every run
    layers = ((lambda *a: conv2d(*a, pad=1, activation="relu"), x_shape, W_shape),
              (lambda *a: linear(*a, activation="relu"), fc_x_shape, fc_W_shape))
    for function, shape_x, shape_W in layers:
        arrays = [rng.standard_normal(s).astype(dtype) for s in (shape_x, shape_W, shape_W[:1])]
        gb, weights = [], None
        # twice on cuda:0, in a row: the counters the first launch used are zero again for the second
        for dev in ("cpu", "cuda:0", "cuda:0"):
            tensors = [Tensor(a, device=dev, requires_grad=True) for a in arrays]
            y = function(*tensors)
            weights = rng.uniform(0.5, 1.5, y.shape).astype(dtype) if weights is None else weights
            (y * Tensor(weights, device=dev)).sum().backward()  # a gradient of many values, not ones
            gb.append(tensors[2].grad.numpy())
        np.testing.assert_array_equal(gb[2], gb[1])  # the same bits every run
        np.testing.assert_allclose(gb[1], gb[0], rtol=1e-5 if dtype == np.float32 else 1e-12)


def test_the_layers_take_the_activation_and_refuse_others():
    from minidl.layers import Conv2d, Linear
    assert Conv2d(3, 4, 3, activation="relu").describe().endswith("+ ReLU")
    assert Linear(3, 4, activation="relu").describe() == "Linear(3->4) + ReLU"
    with pytest.raises(MinidlError, match="activation must be None or 'relu', got 'tanh'"):
        Linear(3, 4, activation="tanh")


# --- minidl train on emulated cuda:0,cuda:1 at TF32 against the CPU

@pytest.mark.gpu
def test_train_on_two_gpus_in_tf32_agrees_with_the_cpu_within_tf32s_tolerance(dataset, tmp_path, at_precision):
    (cpu_out, cpu_losses), (gpu_out, gpu_losses) = train_on_the_cpu_and_two_gpus(dataset, tmp_path, "tf32")
    cpu_ckpt, gpu_ckpt = load_checkpoint(cpu_out / "last.h5"), load_checkpoint(gpu_out / "last.h5")
    assert len(gpu_losses) == len(cpu_losses) >= 3
    # the first loss is one forward pass of the same weights: a few u per layer
    assert gpu_losses[0] == pytest.approx(cpu_losses[0], rel=20 * U, abs=2e-4)
    # later ones follow updates from gradients whose TF32 error is larger where sums cancel (conv1's weight
    # gradient: several % of its norm), and training amplifies a difference from step to step (here about 3x a
    # step: 0.15%, 0.5%, 1.4% after 2, 3, 4 steps), so four steps stay within 5%
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=5e-2)
    names = sorted(cpu_ckpt.params)
    cpu_weights = np.concatenate([cpu_ckpt.params[name].ravel() for name in names])
    gpu_weights = np.concatenate([gpu_ckpt.params[name].ravel() for name in names])
    # four updates of lr x gradient move the weights by a few % of their norm; the TF32 differences of those
    # updates are a small part of that (measured: 0.18% of the weights' norm)
    assert np.linalg.norm(gpu_weights - cpu_weights) <= 5e-3 * np.linalg.norm(cpu_weights)
