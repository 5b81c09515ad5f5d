"""Initialisers: functions (shape, rng) -> float32 NumPy array.

Parameters are drawn on the host from an explicit generator, so a model built
with the same seed has the same weights on any device.

Each draw is charged to the `parameter_budget` in force, before it allocates:
a checkpoint's network is rebuilt to hold exactly the checkpoint's values, so a
crafted class count is refused before it costs gigabytes.
"""
import contextlib
import contextvars
import math
from typing import Callable, Iterator, Tuple

import numpy as np

Initialiser = Callable[[Tuple[int, ...], np.random.Generator], np.ndarray]  # (shape, rng) -> float32 array

_budget = contextvars.ContextVar("parameter_budget", default=None)


@contextlib.contextmanager
def parameter_budget(values: int, refusal: Callable[[], Exception]) -> Iterator[None]:
    """Inside: drawing more than `values` parameter values in all raises `refusal()` (an exception).
    Budgets nest: a draw is charged to every budget in force."""
    token = _budget.set([values, refusal, _budget.get()])
    try:
        yield
    finally:
        _budget.reset(token)


def _charge(shape):
    budget = _budget.get()
    while budget is not None:
        budget[0] -= math.prod(shape)
        if budget[0] < 0:
            raise budget[1]()
        budget = budget[2]


def normal(std: float, mean: float = 0.0) -> Initialiser:
    """N(mean, std^2): the paper's N(0, 0.01^2) is normal(0.01)."""
    def draw(shape, rng):
        _charge(shape)
        return rng.normal(mean, std, size=shape).astype(np.float32)
    draw.__name__ = f"normal(std={std})"
    return draw


def constant(value: float) -> Initialiser:
    def draw(shape, rng):
        _charge(shape)
        return np.full(shape, value, dtype=np.float32)
    draw.__name__ = f"constant({value})"
    return draw


def he_normal(gain: float = math.sqrt(2.0)) -> Initialiser:
    """Kaiming/He: N(0, gain^2 / fan_in), fan_in = in_channels * kh * kw (or in_features)."""
    def draw(shape, rng):
        _charge(shape)
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0.0, gain / math.sqrt(fan_in), size=shape).astype(np.float32)
    draw.__name__ = "he_normal"
    return draw


zeros = constant(0.0)
