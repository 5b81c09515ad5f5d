"""The harness itself: it must fail on wrong gradients, or every other gradient test
could pass vacuously."""
import numpy as np
import pytest

import minidl.functions as F
from minidl import Function, Tensor, gradcheck


class ScaledSquare(Function):
    """y = x * x, with a backward off by `factor` (1.0 is the correct one)."""

    def __init__(self, factor=1.0):
        self.factor = factor

    def forward(self, x):
        self.save(x)
        return x * x

    def backward(self, gy):
        (x,) = self.saved
        return gy * 2 * x * self.factor


class WrongSecondInput(Function):
    """y = a * b with b's gradient off by a factor: the message must name input 1."""

    def forward(self, a, b):
        self.save(a, b)
        return a * b

    def backward(self, gy):
        a, b = self.saved
        return gy * b, gy * a * 1.01


class NoGradient(Function):
    """Forgets to return a gradient for its input."""

    def forward(self, x):
        return 3 * x

    def backward(self, gy):
        return None


class NanGradient(Function):
    def forward(self, x):
        return x.copy()

    def backward(self, gy):
        return gy * np.nan


def T(array, dev):
    return Tensor(np.asarray(array, dtype=np.float64), requires_grad=True, device=dev)


def test_a_correct_function_passes(dev, rng):
    assert gradcheck(lambda x: ScaledSquare()(x), T(rng.standard_normal((3, 4)), dev)) is True


@pytest.mark.parametrize("factor", [1.5, 0.5, -1.0, 1.001])
def test_a_wrong_backward_fails_and_says_where(dev, rng, factor):
    x = T(rng.standard_normal((3, 4)), dev)
    with pytest.raises(AssertionError, match=r"gradient of input 0 \(shape \(3, 4\)\) is wrong at \(\d+, \d+\): "
                                             r"analytic .*, numeric .*, \|diff\| .* > .*; \d+ of 12 elements off"):
        gradcheck(lambda x: ScaledSquare(factor)(x), x)


def test_the_message_names_the_wrong_input(dev, rng):
    a, b = T(rng.uniform(1, 2, 5), dev), T(rng.uniform(1, 2, 5), dev)
    with pytest.raises(AssertionError, match=r"gradient of input 1 \(shape \(5,\)\)"):
        gradcheck(lambda a, b: WrongSecondInput()(a, b), a, b)


def test_only_one_wrong_element_is_caught(rng):
    class OneOff(Function):
        def forward(self, x):
            return x * 2

        def backward(self, gy):
            g = gy * 2
            g[1, 2] += 1e-3
            return g

    with pytest.raises(AssertionError, match=r"is wrong at \(1, 2\).*1 of 6 elements off"):
        gradcheck(lambda x: OneOff()(x), Tensor(rng.standard_normal((2, 3)), requires_grad=True))


def test_a_missing_gradient_fails(rng):
    with pytest.raises(AssertionError, match=r"gradient of input 0.*analytic 0, numeric"):
        gradcheck(lambda x: NoGradient()(x), Tensor(rng.standard_normal(4), requires_grad=True))


def test_a_nan_gradient_fails(rng):
    with pytest.raises(AssertionError, match=r"gradient of input 0.*analytic nan"):
        gradcheck(lambda x: NanGradient()(x), Tensor(rng.standard_normal(4), requires_grad=True))


class NanForward(Function):
    """A finite backward over a forward that is NaN: the numeric gradient is NaN."""

    def forward(self, x):
        return x * np.nan

    def backward(self, gy):
        return gy * 2


def test_a_nan_numeric_gradient_fails(rng):
    # |analytic - NaN| > bound is False, so only an explicit finiteness check catches this
    with pytest.raises(AssertionError, match=r"gradient of input 0.*numeric nan"):
        gradcheck(lambda x: NanForward()(x), Tensor(rng.standard_normal(3), requires_grad=True))


def test_inputs_without_requires_grad_are_constants(rng):
    a = Tensor(rng.standard_normal(3), requires_grad=True)
    c = Tensor(rng.standard_normal(3))
    assert gradcheck(lambda a, c: a * c, a, c)
    assert c.grad is None


def test_raw_arrays_become_checked_inputs(rng):
    assert gradcheck(lambda a, b: a * b, rng.standard_normal(3), rng.standard_normal(3))


def test_float32_inputs_are_refused(rng):
    with pytest.raises(ValueError, match=r"gradcheck wants float64 inputs; input 0 is float32"):
        gradcheck(lambda x: x * 2, Tensor(rng.standard_normal(3).astype(np.float32), requires_grad=True))


def test_nothing_to_check_is_refused(rng):
    with pytest.raises(ValueError, match=r"at least one input with requires_grad=True"):
        gradcheck(lambda x: x * 2, Tensor(rng.standard_normal(3)))


def test_inputs_are_restored(dev, rng):
    x = T(rng.standard_normal((2, 3)), dev)
    before = x.numpy()
    gradcheck(lambda x: F.exp(x), x)
    np.testing.assert_array_equal(x.numpy(), before)


def test_non_contiguous_input(rng):
    # a transposed array: the perturbation must reach the data (else numeric would be 0)
    x = Tensor(rng.standard_normal((4, 3)).T, requires_grad=True)
    assert gradcheck(lambda x: x * x, x)
    with pytest.raises(AssertionError):
        gradcheck(lambda x: ScaledSquare(2.0)(x), Tensor(rng.standard_normal((4, 3)).T, requires_grad=True))


def test_scalar_output(dev, rng):
    assert gradcheck(lambda x: (x * x).sum(), T(rng.standard_normal(4), dev))
    with pytest.raises(AssertionError):
        gradcheck(lambda x: ScaledSquare(1.1)(x).sum(), T(rng.standard_normal(4), dev))
