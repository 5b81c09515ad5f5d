"""Numerical gradient checking: the test every Function must pass."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from minidl.core import Tensor


def gradcheck(fn: Callable[..., Tensor], *inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-4,
              seed: int = 0) -> bool:
    """Compare fn's analytic gradients with central differences, for every input.

    `fn(*inputs)` returns a Tensor of any shape; the check differentiates
    sum(fn(*inputs) * w) for a fixed random w, so every output element counts.
    Inputs that are Tensors with requires_grad are checked; use float64. Raises
    AssertionError naming the input, the worst element and both values.
    """
    from minidl.core import Tensor, no_grad  # here: `import minidl` loads no engine (minidl/__init__.py)
    inputs = [x if isinstance(x, Tensor) else Tensor(x, requires_grad=True) for x in inputs]
    checked = [i for i, x in enumerate(inputs) if x.requires_grad]
    if not checked:
        raise ValueError("gradcheck needs at least one input with requires_grad=True")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise ValueError(f"gradcheck wants float64 inputs; input {i} is {inputs[i].dtype}")
        if not inputs[i].data.flags.c_contiguous:
            # the perturbation below writes through a flat view, which needs contiguous data
            with inputs[i].device:
                inputs[i].data = inputs[i].device.xp.ascontiguousarray(inputs[i].data)

    out = fn(*inputs)
    xp = out.device.xp
    with out.device:  # on out's GPU, not whichever is current
        weights = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))

    def objective():
        with no_grad():
            y = fn(*inputs)
            with y.device:
                return float((y.data * weights).sum())

    for x in inputs:
        x.grad = None
    (out * Tensor(weights, device=out.device)).sum().backward()

    for i in checked:
        x = inputs[i]
        analytic = x.grad.numpy() if x.grad is not None else np.zeros(x.shape)
        _compare(i, x, analytic, _numeric_gradient(x, objective, eps), atol, rtol)
    return True


def _numeric_gradient(x, objective, eps):
    """Central differences of objective() in each element of x, perturbed in place and restored."""
    numeric = np.zeros(x.shape)
    flat = x.data.reshape(-1)  # a view: writing it perturbs the input
    host = x.numpy().reshape(-1)

    def perturb(j, value):  # on the input's device and stream, ordered with the functions' work
        with x.device:
            flat[j] = value
    for j in range(flat.size):
        original = host[j].item()
        perturb(j, original + eps)
        plus = objective()
        perturb(j, original - eps)
        minus = objective()
        perturb(j, original)
        numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
    return numeric


def _compare(i, x, analytic, numeric, atol, rtol):
    error = np.abs(analytic - numeric)
    bound = atol + rtol * np.abs(numeric)
    # NaN compares False: without the isfinite checks a NaN gradient would pass
    if (error > bound).any() or not (np.isfinite(analytic).all() and np.isfinite(numeric).all()):
        # plain ints: NumPy 2 would print the index as (np.int64(1), np.int64(2))
        worst = tuple(int(k) for k in np.unravel_index(np.argmax(error - bound), x.shape))
        raise AssertionError(
            f"gradient of input {i} (shape {x.shape}) is wrong at {worst}: analytic "
            f"{analytic[worst]:.8g}, numeric {numeric[worst]:.8g}, |diff| {error[worst]:.3g} "
            f"> {bound[worst]:.3g}; {int((error > bound).sum())} of {x.size} elements off")
