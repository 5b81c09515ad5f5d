"""Every elementary function against central differences (float64), on the CPU and,
where there is a GPU, on CuPy; plus values against NumPy written out here."""
import numpy as np
import pytest

import minidl
import minidl.functions as F
from minidl import MinidlError, Tensor, gradcheck


def T(array, dev, requires_grad=True):
    return Tensor(np.asarray(array, dtype=np.float64), requires_grad=requires_grad, device=dev)


def away_from_zero(rng, shape, low=0.5, high=2.0):
    """Values with |v| in [low, high] and random signs: for div, pow, relu, log's kinks."""
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


def distinct(rng, shape):
    """A permutation of well separated values: max has no ties, even after a +-eps nudge."""
    return rng.permutation(np.arange(np.prod(shape), dtype=np.float64)).reshape(shape) * 0.1


# --- arithmetic


@pytest.mark.parametrize("fn", [F.add, F.sub, F.mul, F.div], ids=["add", "sub", "mul", "div"])
@pytest.mark.parametrize("shapes",
                         [((3, 4), (3, 4)), ((3, 1), (1, 4)), ((2, 3, 4), (4,)), ((), (2, 3))],
                         ids=["same", "3x1+1x4", "trailing", "0d"])
def test_binary_gradients(dev, rng, fn, shapes):
    a = T(away_from_zero(rng, shapes[0]), dev)
    b = T(away_from_zero(rng, shapes[1]), dev)
    assert gradcheck(fn, a, b)
    # the gradients come back to each input's own shape (sum_to), not the broadcast one
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


@pytest.mark.parametrize("name,fn,low", [
    ("neg", F.neg, 0.5),
    ("exp", F.exp, 0.5),
    ("log", lambda x: F.log(x * x), 0.5),  # x*x keeps log's argument positive on both signs
    ("pow2", lambda x: F.pow(x, 2), 0.5),
    ("pow3", lambda x: x ** 3, 0.5),
    ("pow-1", lambda x: x ** -1, 0.5),
    ("pow0.5", lambda x: F.pow(x * x, 0.5), 0.5),
    ("relu", F.relu, 0.1),  # never closer to the kink than 0.1 >> eps
], ids=lambda v: v if isinstance(v, str) else "")
def test_unary_gradients(dev, rng, name, fn, low):
    assert gradcheck(fn, T(away_from_zero(rng, (3, 4), low=low), dev))


def test_unary_values(dev):
    x = T([[-2.0, 0.5, 3.0]], dev)
    v = x.numpy()
    np.testing.assert_allclose(F.exp(x).numpy(), np.exp(v))
    np.testing.assert_allclose(F.log(x * x).numpy(), np.log(v * v))
    np.testing.assert_allclose((x ** 3).numpy(), v ** 3)
    np.testing.assert_array_equal(F.relu(x).numpy(), [[0.0, 0.5, 3.0]])
    np.testing.assert_array_equal((-x).numpy(), -v)


def test_pow_zero_has_gradient_zero_also_at_zero(dev):
    x = T([0.0, 1.5, -2.0], dev)
    (x ** 0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0.0, 0.0, 0.0])


def test_number_to_the_power_of_a_tensor(dev, rng):
    x = T(rng.standard_normal((3, 4)), dev)
    np.testing.assert_allclose((2.5 ** x).numpy(), 2.5 ** x.numpy())
    assert gradcheck(lambda x: 2.5 ** x, x)
    np.testing.assert_allclose((np.float32(2.5) ** x).numpy(), 2.5 ** x.numpy(), rtol=1e-6)
    with pytest.raises(MinidlError, match="positive number as base"):
        (-2.0) ** x


def test_pow_with_an_array_of_exponents(dev):
    x = T([1.5, 2.0, 3.0], dev)
    (x ** np.array([2.0, 0.0, 1.0])).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 0.0, 1.0])


def test_pow_refuses_a_tensor_exponent(dev):
    x = T([1.0, 2.0], dev)
    with pytest.raises(MinidlError, match="constant exponent"):
        x ** x


def test_relu_gradient_is_zero_below_zero(dev):
    x = T([-1.0, -0.1, 0.1, 2.0], dev)
    F.relu(x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [0, 0, 1, 1])


# --- matrix products


def test_matmul_gradient_and_value(dev, rng):
    a, b = T(rng.standard_normal((3, 4)), dev), T(rng.standard_normal((4, 2)), dev)
    np.testing.assert_allclose(F.matmul(a, b).numpy(), a.numpy() @ b.numpy())
    assert gradcheck(F.matmul, a, b)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_gradient_and_value(dev, rng, bias):
    x, W = T(rng.standard_normal((5, 4)), dev), T(rng.standard_normal((3, 4)), dev)
    b = T(rng.standard_normal(3), dev)
    if bias:
        expected = x.numpy() @ W.numpy().T + b.numpy()
        np.testing.assert_allclose(F.linear(x, W, b).numpy(), expected)
        assert gradcheck(F.linear, x, W, b)
    else:
        np.testing.assert_allclose(F.linear(x, W).numpy(), x.numpy() @ W.numpy().T)
        assert gradcheck(F.linear, x, W)


def test_linear_refuses_a_bias_of_the_wrong_shape(dev, rng):
    x, W = T(rng.standard_normal((5, 4)), dev), T(rng.standard_normal((3, 4)), dev)
    with pytest.raises(MinidlError, match=r"bias of shape \(1, 3\) for 3 outputs"):
        F.linear(x, W, T(rng.standard_normal((1, 3)), dev))


def test_linear_with_constant_input_gives_weight_gradients_only(dev, rng):
    # the first layer's input needs no gradient: needs_grad must skip it, not crash
    x = T(rng.standard_normal((5, 4)), dev, requires_grad=False)
    W, b = T(rng.standard_normal((3, 4)), dev), T(rng.standard_normal(3), dev)
    assert gradcheck(lambda W, b: F.linear(x, W, b), W, b)
    assert x.grad is None


# --- reductions


@pytest.mark.parametrize("axis", [None, 0, 1, -1, (0, 2), (2, 0)], ids=str)
@pytest.mark.parametrize("keepdims", [False, True], ids=["drop", "keep"])
@pytest.mark.parametrize("name", ["sum", "mean"])
def test_sum_mean_gradients_and_values(dev, rng, name, axis, keepdims):
    x = T(rng.standard_normal((2, 3, 4)), dev)
    fn = getattr(F, name)
    y = fn(x, axis=axis, keepdims=keepdims)
    expected = getattr(np, name)(x.numpy(), axis=axis, keepdims=keepdims)
    assert y.shape == expected.shape
    assert y.dtype == np.float64  # a full reduction too: NumPy returns a scalar there
    np.testing.assert_allclose(y.numpy(), expected)
    assert gradcheck(lambda x: fn(x, axis=axis, keepdims=keepdims), x)


@pytest.mark.parametrize("axis,keepdims",
                         [(None, False), (0, False), (1, True), (-1, False), ((0, 2), False)],
                         ids=str)
def test_max_gradient_and_value(dev, rng, axis, keepdims):
    x = T(distinct(rng, (2, 3, 4)), dev)
    y = F.max(x, axis=axis, keepdims=keepdims)
    np.testing.assert_array_equal(y.numpy(), np.max(x.numpy(), axis=axis, keepdims=keepdims))
    assert gradcheck(lambda x: x.max(axis=axis, keepdims=keepdims), x)


def test_max_splits_the_gradient_between_ties(dev):
    x = T([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]], dev)
    F.max(x, axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 0.5, 0.5], [1, 0, 0]])


# --- shape


def test_reshape_gradient(dev, rng):
    x = T(rng.standard_normal((2, 6)), dev)
    assert x.reshape(3, 4).shape == (3, 4) and x.reshape((4, -1)).shape == (4, 3)
    assert gradcheck(lambda x: F.reshape(x, (3, 2, 2)), x)
    assert F.flatten(T(np.zeros((2, 3, 4)), dev)).shape == (2, 12)


@pytest.mark.parametrize("axes", [None, (1, 0, 2), (2, 0, 1), (-1, 0, 1)], ids=str)
def test_transpose_gradient(dev, rng, axes):
    x = T(rng.standard_normal((2, 3, 4)), dev)
    np.testing.assert_array_equal(F.transpose(x, axes).numpy(), np.transpose(x.numpy(), axes))
    assert gradcheck(lambda x: F.transpose(x, axes), x)


def test_T_property(dev, rng):
    x = T(rng.standard_normal((2, 3)), dev)
    assert x.T.shape == (3, 2)
    assert gradcheck(lambda x: x.T, x)


@pytest.mark.parametrize("index", [
    (slice(1, 3),),
    (slice(None), slice(None, None, -2)),
    (1, slice(0, 2)),
    (np.array([0, 2, 2, 0]),),  # repeats: each use adds to the gradient
    (slice(None), np.array([3, 3, 1])),
    (np.array([0, 1, 0]), np.array([2, 2, 2])),
    (Ellipsis, 0),
], ids=["slice", "negstep", "int+slice", "repeats", "col-repeats", "pairs", "ellipsis"])
def test_getitem_gradient(dev, rng, index):
    x = T(rng.standard_normal((3, 4)), dev)
    # NumPy index arrays move to x's device
    np.testing.assert_array_equal(x[index].numpy(), x.numpy()[index])
    assert gradcheck(lambda x: x[index], x)


def test_getitem_repeats_count_every_time(dev):
    x = T(np.zeros(4), dev)
    with dev:  # an index array made on the device, on its stream
        index = dev.xp.asarray([0, 0, 2])
    x[index].sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2, 0, 1, 0])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_concat_gradient(dev, rng, axis):
    a, b = T(rng.standard_normal((2, 3)), dev), T(rng.standard_normal((2, 3)), dev)
    c = T(rng.standard_normal((2, 3)), dev)
    np.testing.assert_array_equal(F.concat([a, b, c], axis=axis).numpy(),
                                  np.concatenate([a.numpy(), b.numpy(), c.numpy()], axis=axis))
    assert gradcheck(lambda a, b, c: F.concat([a, b, c], axis=axis), a, b, c)


@pytest.mark.parametrize("axis", [0, 1])
def test_split_gradient_with_a_piece_unused(dev, rng, axis):
    x = T(rng.standard_normal((4, 5)), dev)
    sizes = [1, 2, 1] if axis == 0 else [2, 1, 2]
    parts = F.split(x, sizes, axis=axis)
    for part, expected in zip(parts, np.split(x.numpy(), np.cumsum(sizes)[:-1], axis=axis)):
        np.testing.assert_array_equal(part.numpy(), expected)
    # the middle piece is dropped: its gradient is zeros, the others' are exact
    assert gradcheck(lambda x: F.split(x, sizes, axis=axis)[0].sum() * 2
                     + (F.split(x, sizes, axis=axis)[2] ** 2).sum(), x)
    assert gradcheck(lambda x: F.split(x, sizes, axis=axis)[2], x)


def test_split_into_equal_count(dev, rng):
    x = T(rng.standard_normal((2, 6)), dev)
    parts = F.split(x, 3, axis=1)
    assert [p.shape for p in parts] == [(2, 2)] * 3
    assert gradcheck(lambda x: F.concat(F.split(x, 3, axis=1)[::-1], axis=0), x)


def test_split_piece_kept_but_unused_gets_no_gradient(dev):
    x = T(np.arange(6.0).reshape(2, 3), dev)
    first, rest = F.split(x, [1, 2], axis=1)  # `rest` stays alive but takes no part in the loss
    first.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[1, 0, 0], [1, 0, 0]])


@pytest.mark.parametrize("shape,to", [((3, 1), (2, 3, 4)), ((4,), (3, 4)), ((), (2, 2))], ids=str)
def test_broadcast_to_gradient(dev, rng, shape, to):
    x = T(rng.standard_normal(shape), dev)
    np.testing.assert_array_equal(F.broadcast_to(x, to).numpy(), np.broadcast_to(x.numpy(), to))
    assert gradcheck(lambda x: F.broadcast_to(x, to), x)


# --- loss


def numpy_softmax_cross_entropy(logits, labels):
    """The textbook formula: mean over rows of log(sum(exp(row))) - row[label]."""
    logits = logits.astype(np.float64)
    shift = logits.max(axis=1, keepdims=True)  # exp of +-1e4 overflows without it
    log_z = np.log(np.exp(logits - shift).sum(axis=1)) + shift[:, 0]
    return np.mean(log_z - logits[np.arange(len(labels)), labels])


def test_softmax_cross_entropy_value_and_gradient(dev, rng):
    logits = T(rng.standard_normal((5, 4)), dev)
    labels = np.array([0, 3, 1, 1, 2])
    loss = F.softmax_cross_entropy(logits, labels)
    assert loss.shape == () and loss.dtype == np.float64
    np.testing.assert_allclose(loss.item(), numpy_softmax_cross_entropy(logits.numpy(), labels),
                               rtol=1e-12)
    assert gradcheck(lambda z: F.softmax_cross_entropy(z, labels), logits)
    # d loss / d logits = (softmax - onehot) / n
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(axis=1, keepdims=True)
    logits.grad = None
    F.softmax_cross_entropy(logits, labels).backward()
    np.testing.assert_allclose(logits.grad.numpy(), (p - np.eye(4)[labels]) / 5, rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_is_stable_for_huge_logits(dev, dtype):
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    labels = np.array([1, 2, 0])
    logits = Tensor(z, requires_grad=True, device=dev)
    loss = F.softmax_cross_entropy(logits, labels)
    loss.backward()
    assert np.isfinite(loss.item()) and np.isfinite(logits.grad.numpy()).all()
    # row 0: 2e4; row 1: 0; row 2: log 2 -> mean
    np.testing.assert_allclose(loss.item(), (2e4 + 0 + np.log(2)) / 3, rtol=1e-6)
    np.testing.assert_allclose(loss.item(), numpy_softmax_cross_entropy(z, labels), rtol=1e-6)
    np.testing.assert_allclose(logits.grad.numpy(),
                               [[1 / 3, -1 / 3, 0], [0, 0, 0], [-1 / 6, 1 / 6, 0]], atol=1e-7)


def test_softmax_cross_entropy_rejects_bad_labels(dev):
    logits = T(np.zeros((2, 3)), dev)
    with pytest.raises(MinidlError, match=r"a label is outside 0\.\.2"):
        F.softmax_cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(MinidlError, match=r"labels must be integers"):
        F.softmax_cross_entropy(logits, np.array([0.0, 1.0]))
    with pytest.raises(MinidlError, match=r"labels of shape \(3,\) for logits of shape \(2, 3\)"):
        F.softmax_cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(MinidlError, match=r"wants logits of shape \(batch, classes\)"):
        F.softmax_cross_entropy(T(np.zeros(3), dev), np.array([0]))


def test_softmax_sums_to_one(dev, rng):
    p = F.softmax(T(rng.standard_normal((3, 5)) * 1e3, dev))
    np.testing.assert_allclose(p.numpy().sum(axis=1), 1.0)
    assert p.creator is None


# --- transfer


def test_copy_to_cpu_passes_the_gradient_back(dev, rng):
    x = T(rng.standard_normal((3, 4)), dev)
    y = F.copy(x, "cpu")
    assert y.device is minidl.device("cpu") and isinstance(y.data, np.ndarray)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    assert y.data is not x.data  # a copy: changing one must not change the other
    assert gradcheck(lambda x: F.copy(x, "cpu") * 3.0, x)
    assert x.grad.device is dev  # the gradient comes back to the source's device


def test_copy_to_own_device_and_to(dev, rng):
    x = T(rng.standard_normal(3), dev)
    assert x.to(dev) is x  # already there: no copy, no graph
    assert gradcheck(lambda x: F.copy(x, dev), x)


def test_astype_gradient_returns_in_the_input_dtype(dev, rng):
    x = T(rng.standard_normal((3, 4)), dev)
    y = x.astype(np.float32)
    assert y.dtype == np.float32
    # the trip through float32 rounds at ~1e-7: a coarser step keeps the check meaningful
    assert gradcheck(lambda x: (F.astype(x, np.float32) * 2.0).astype(np.float64), x, eps=1e-2,
                     atol=1e-3)
    assert x.grad.dtype == np.float64
