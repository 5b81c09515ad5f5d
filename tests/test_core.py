"""The autograd engine: graph building, backward order and bookkeeping, memory, errors."""
import gc
import threading
import weakref

import numpy as np
import pytest

import minidl
import minidl.functions as F
from minidl import Function, MinidlError, Tensor, gradcheck, no_grad


def T(array, dev, requires_grad=True):
    return Tensor(np.asarray(array, dtype=np.float64), requires_grad=requires_grad, device=dev)


# --- creating tensors


def test_python_floats_become_float32_arrays_keep_their_dtype():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(1.5).dtype == np.float32
    assert Tensor(np.ones(2)).dtype == np.float64
    assert Tensor([1, 2]).dtype.kind == "i"
    # NumPy scalars are what 0-d arithmetic returns: rounding them to float32 would
    # quietly make a float64 graph float32 at its first full reduction
    assert Tensor(np.float64(0.1)).dtype == np.float64
    assert Tensor(np.float64(0.1)).item() == 0.1


def test_tensor_basics(dev):
    x = T(np.arange(6.0).reshape(2, 3), dev)
    assert x.shape == (2, 3) and x.ndim == 2 and x.size == 6 and len(x) == 2
    assert x.device is dev and x.requires_grad and x.creator is None
    host = x.numpy()
    host[0, 0] = 99  # numpy() is a copy
    assert x.numpy()[0, 0] == 0
    assert T(3.5, dev).item() == 3.5
    d = x.detach()
    assert not d.requires_grad and d.creator is None
    assert "requires_grad=True" in repr(x) and str(dev) in repr(x)
    assert Tensor(x).data is x.data  # a Tensor of a Tensor wraps the same data


@pytest.mark.parametrize("bad", [np.array([1, "a"], dtype=object), np.array(["ab"]), "text",
                                 np.array([1 + 2j])], ids=["object", "str-array", "str", "complex"])
def test_non_numeric_data_is_refused(bad):
    with pytest.raises(MinidlError, match=r"a Tensor holds numbers, not dtype"):
        Tensor(bad)


def test_object_dtype_message_names_the_dtype():
    with pytest.raises(MinidlError, match=r"not dtype object"):
        Tensor(np.array([None, 1], dtype=object))


# --- operators and broadcasting


def test_operators_match_numpy(dev, rng):
    a, b = T(rng.uniform(1, 2, (2, 3)), dev), T(rng.uniform(1, 2, (2, 3)), dev)
    m = T(rng.standard_normal((3, 4)), dev)
    va, vb, vm = a.numpy(), b.numpy(), m.numpy()
    for got, want in [(a + b, va + vb), (a - b, va - vb), (a * b, va * vb), (a / b, va / vb),
                      (a ** 2, va ** 2), (a @ m, va @ vm), (-a, -va), (a[1], va[1]), (a[:, 1:], va[:, 1:])]:
        assert isinstance(got, Tensor) and got.creator is not None
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_operator_gradients(dev, rng):
    a, b = T(rng.uniform(1, 2, (2, 3)), dev), T(rng.uniform(1, 2, (2, 3)), dev)
    m = T(rng.standard_normal((3, 4)), dev)
    assert gradcheck(lambda a, b, m: ((a + b) * (a - b) / b - a ** 2 + -b)[:, 1:] @ m[1:], a, b, m)


def test_broadcasting_gradients_reduce_to_each_shape(dev, rng):
    col, row = T(rng.standard_normal((3, 1)), dev), T(rng.uniform(1, 2, (1, 4)), dev)
    assert (col + row).shape == (3, 4)
    assert gradcheck(lambda c, r: c + r, col, row)
    assert gradcheck(lambda c, r: c * r - r / (c * c + 1), col, row)
    col.grad = row.grad = None  # gradcheck leaves its gradients behind
    (col * row).sum().backward()
    np.testing.assert_allclose(col.grad.numpy(), np.broadcast_to(row.numpy().sum(), (3, 1)))


def test_scalars_on_either_side(dev, rng):
    x = T(rng.uniform(1, 2, (2, 3)), dev)
    v = x.numpy()
    for got, want in [(x + 2, v + 2), (2 + x, 2 + v), (x - 2, v - 2), (2 - x, 2 - v), (x * 3, v * 3),
                      (3 * x, 3 * v), (x / 4, v / 4), (4 / x, 4 / v), (x * np.float64(1.5), v * 1.5)]:
        assert isinstance(got, Tensor) and got.dtype == np.float64  # the scalar takes x's dtype
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert gradcheck(lambda x: 2 - x * 3 + 4 / x - x / 2 + (1 + x), x)


def test_scalar_keeps_float32():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    assert (x * 0.1).dtype == np.float32 and (1.0 - x).dtype == np.float32


def test_float_scalar_with_an_integer_tensor_is_not_truncated():
    n = Tensor(np.array([1, 2, 3]))
    np.testing.assert_allclose((n * 0.5).numpy(), [0.5, 1.0, 1.5])
    assert (n + 1).dtype == n.dtype


def test_numpy_array_on_the_left():
    # __array_priority__ makes NumPy hand the operation to the Tensor's reflected method
    x = Tensor(np.random.default_rng(0).uniform(1, 2, (1, 4)), requires_grad=True)
    a = np.arange(1.0, 4.0).reshape(3, 1)
    for got, want in [(a + x, a + x.data), (a - x, a - x.data), (a * x, a * x.data), (a / x, a / x.data)]:
        assert isinstance(got, Tensor)
        np.testing.assert_allclose(got.numpy(), want)
    m = np.ones((2, 1))
    assert isinstance(m @ x, Tensor) and (m @ x).shape == (2, 4)
    assert gradcheck(lambda x: a * x - a / x + (m @ x).sum(axis=0), x)


def test_gradient_has_the_dtype_of_its_tensor():
    # a float64 constant next to a float32 parameter must not make the parameter's grad float64
    w = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    (np.arange(3.0) * w).sum().backward()
    assert w.grad.dtype == np.float32
    np.testing.assert_array_equal(w.grad.numpy(), [0, 1, 2])


# --- the graph: reuse, order, accumulation


def test_reuse_of_one_tensor(dev):
    x = T([1.0, -2.0, 3.0], dev)
    (x * x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, -4.0, 6.0])
    x.grad = None
    (x + x).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 2.0])
    assert gradcheck(lambda x: x * x * x + x, x)


def test_diamond_graph(dev, rng):
    # a = f(x); b = g(a); c = h(a); d = b + c: a's gradient must be complete (both
    # branches summed) before f's backward runs, which the generation order ensures
    x = T(rng.uniform(0.5, 1.5, (2, 3)), dev)

    def diamond(x):
        a = x * 2.0
        b = a ** 2
        c = F.exp(a).sum(axis=1, keepdims=True)
        return b + c

    assert gradcheck(diamond, x)
    x.grad = None
    diamond(x).sum().backward()
    v = x.numpy()
    # c (2, 1) is broadcast over 3 columns, so each exp term is counted 3 times
    np.testing.assert_allclose(x.grad.numpy(), 2 * (2 * 2 * v) + 3 * 2 * np.exp(2 * v))


def test_uneven_diamond(dev, rng):
    # one branch much longer than the other: a tensor used at generation 1 and at generation 6
    x = T(rng.uniform(0.5, 1.5, 4), dev)

    def fn(x):
        a = F.exp(x)
        long = a
        for _ in range(5):
            long = long * 1.5
        return long + a * a

    assert gradcheck(fn, x)


def test_a_minus_a_is_exactly_zero(dev, rng):
    x = T(rng.standard_normal((2, 3)), dev)
    a = x * 3.0
    (a - a).sum().backward()
    assert np.array_equal(x.grad.numpy(), np.zeros((2, 3)))
    x.grad = None
    (x - x).sum().backward()
    assert np.array_equal(x.grad.numpy(), np.zeros((2, 3)))


def test_gradients_accumulate_over_two_backward_calls(dev):
    x = T([1.0, 2.0], dev)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [5.0, 5.0])
    x.zero_grad()
    assert x.grad is None


def test_intermediate_gradients_are_freed_unless_retained(dev):
    x = T([1.0, 2.0], dev)
    a = x * 2.0
    loss = (a * a).sum()
    loss.backward()
    assert a.grad is None and loss.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), [8.0, 16.0])

    x.grad = None
    a = x * 2.0
    loss = (a * a).sum()
    loss.backward(retain_grad=True)
    np.testing.assert_array_equal(a.grad.numpy(), [4.0, 8.0])
    assert loss.grad.item() == 1.0
    np.testing.assert_array_equal(x.grad.numpy(), [8.0, 16.0])


def test_saved_arrays_are_freed_after_backward(dev):
    x = T([1.0, 2.0], dev)
    y = x * x
    fn = y.creator
    assert fn.saved is not None
    y.sum().backward()
    assert fn.saved is None and fn.inputs == ()


def test_backward_twice_through_one_graph_is_a_clear_error(dev):
    x = T([1.0, 2.0], dev)
    loss = (x * x).sum()
    loss.backward()
    with pytest.raises(MinidlError, match=r"backward through the same graph twice.*run the forward again"):
        loss.backward()


def test_backward_with_an_explicit_gradient(dev):
    x = T([1.0, 2.0, 3.0], dev)
    (x * 2.0).backward(np.array([1.0, 0.0, -1.0]))
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 0.0, -2.0])
    x.grad = None
    (x * 2.0).backward(T([1.0, 1.0, 1.0], dev, requires_grad=False))
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 2.0])


@pytest.mark.gpu
def test_backward_refuses_a_gradient_on_another_device():
    x = T([1.0, 2.0], minidl.device("cpu"))
    with pytest.raises(MinidlError, match="gradient on cuda:0 for a tensor on cpu"):
        (x * 2.0).backward(T([1.0, 1.0], minidl.device("cuda:0"), requires_grad=False))


def test_backward_of_a_non_scalar_needs_a_gradient(dev):
    y = T([1.0, 2.0], dev) * 2.0
    with pytest.raises(MinidlError, match=r"backward of a tensor of shape \(2,\) needs a gradient argument"):
        y.backward()
    with pytest.raises(MinidlError, match=r"gradient of shape \(3,\) for a tensor of shape \(2,\)"):
        y.backward(np.ones(3))


def test_only_tensors_that_require_grad_get_one(dev):
    x, c = T([1.0, 2.0], dev), T([3.0, 4.0], dev, requires_grad=False)
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_array_equal(x.grad.numpy(), [3.0, 4.0])
    y = c * 2.0
    assert not y.requires_grad and y.creator is None  # no input wants a gradient: no graph


def test_a_bad_backward_shape_is_caught():
    class Wrong(Function):
        def forward(self, x):
            return x.sum(axis=0)

        def backward(self, gy):
            return gy  # should be broadcast back to the input's shape

    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(AssertionError, match=r"Wrong.backward gave a gradient of shape \(3,\) for an input "
                                             r"of shape \(2, 3\)"):
        Wrong()(x).sum().backward()


def test_function_needs_a_tensor_argument():
    with pytest.raises(MinidlError, match=r"needs at least one Tensor"):
        F.add(1.0, 2.0)


def test_matmul_shape_errors(dev):
    with pytest.raises(MinidlError, match=r"matmul of incompatible shapes \(2, 3\) and \(4, 5\)"):
        T(np.ones((2, 3)), dev) @ T(np.ones((4, 5)), dev)
    with pytest.raises(MinidlError, match=r"matmul supports 2-D operands"):
        T(np.ones((2, 3)), dev) @ T(np.ones(3), dev)
    with pytest.raises(MinidlError, match=r"linear wants x of shape \(batch, 4\) for a weight of shape \(3, 4\)"):
        F.linear(T(np.ones((2, 5)), dev), T(np.ones((3, 4)), dev))


def test_shape_errors(dev):
    x = T(np.ones((2, 3)), dev)
    with pytest.raises(MinidlError, match=r"cannot reshape \(2, 3\) \(6 elements\) to \(4, 2\)"):
        x.reshape(4, 2)
    with pytest.raises(MinidlError, match=r"split sizes \[1, 1\] do not add up to 3"):
        F.split(x, [1, 1], axis=1)
    with pytest.raises(MinidlError, match=r"cannot split axis 1 of size 3 into 2 equal parts"):
        F.split(x, 2, axis=1)


# --- no_grad


def test_no_grad_builds_no_graph(dev):
    x = T([1.0, 2.0], dev)
    with no_grad():
        assert not minidl.grad_enabled()
        y = x * 2.0 + 1.0
        z = F.split(x, 2)[0]
    assert minidl.grad_enabled()
    for t in (y, z):
        assert t.creator is None and not t.requires_grad
    assert (x * 2.0).creator is not None  # on again after the block


def test_no_grad_nests_and_survives_an_exception():
    with no_grad():
        with no_grad():
            pass
        assert not minidl.grad_enabled()  # the inner block restores "off", not "on"
    with pytest.raises(ValueError):
        with no_grad():
            raise ValueError
    assert minidl.grad_enabled()


def test_no_grad_is_per_thread():
    # evaluation in one thread must not silently turn off training in another
    x = Tensor(np.ones(2), requires_grad=True)
    seen = {}

    def other_thread():
        seen["enabled"] = minidl.grad_enabled()
        seen["creator"] = (x * 2.0).creator

    with no_grad():
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert (x * 2.0).creator is None
    assert seen["enabled"] and seen["creator"] is not None


# --- depth and memory


def test_a_10000_deep_chain_backpropagates():
    # far past the recursion limit: backward must be iterative
    x = Tensor(np.array(2.0), requires_grad=True)
    y = x
    for _ in range(10000):
        y = y * 1.0001
    assert y.dtype == np.float64  # 0-d arithmetic must not round the chain to float32
    y.backward()
    np.testing.assert_allclose(x.grad.item(), 1.0001 ** 10000, rtol=1e-10)
    np.testing.assert_allclose(y.item(), 2 * 1.0001 ** 10000, rtol=1e-10)


def test_a_10000_deep_graph_is_freed_without_backward():
    x = Tensor(np.array(2.0), requires_grad=True)
    y = x
    for _ in range(10000):
        y = y * 1.0001
    node = y
    while node.creator.inputs[0].creator is not None:  # walk down to the first multiplication
        node = node.creator.inputs[0]
    first = weakref.ref(node.creator)
    del node
    gc.disable()
    try:
        del y
        assert first() is None
    finally:
        gc.enable()


def test_the_graph_is_freed_by_reference_counting():
    # outputs are held by weak reference: no Tensor <-> Function cycle for the gc to find
    x = Tensor(np.ones(3), requires_grad=True)
    gc.disable()
    try:
        y = (x * 2.0).sum()
        y_ref, fn_ref, mid_ref = weakref.ref(y), weakref.ref(y.creator), weakref.ref(y.creator.inputs[0])
        inner_ref = weakref.ref(y.creator.inputs[0].creator)
        del y
        assert y_ref() is None and fn_ref() is None and mid_ref() is None and inner_ref() is None
    finally:
        gc.enable()


def test_a_function_does_not_keep_its_outputs_alive():
    x = Tensor(np.ones(3), requires_grad=True)
    y = x * 2.0
    fn = y.creator
    assert fn.outputs[0]() is y
    del y
    assert fn.outputs[0]() is None


def test_backward_with_a_dropped_intermediate_output(dev):
    # intermediates are referenced only by the graph; backward must keep them alive itself
    x = T([1.0, 2.0], dev)
    loss = ((x * 2.0) * (x + 1.0)).sum()
    loss.backward()
    np.testing.assert_array_equal(x.grad.numpy(), 2 * (x.numpy() + 1) + 2 * x.numpy())
