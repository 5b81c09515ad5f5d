"""Initialisers: functions (shape, rng) -> float32 NumPy array.

Parameters are drawn on the host from an explicit generator, so a model built
with the same seed has the same weights on any device.
"""
import math

import numpy as np


def normal(std, mean=0.0):
    """N(mean, std^2): the paper's N(0, 0.01^2) is normal(0.01)."""
    def draw(shape, rng):
        return rng.normal(mean, std, size=shape).astype(np.float32)
    draw.__name__ = f"normal(std={std})"
    return draw


def constant(value):
    def draw(shape, rng):
        return np.full(shape, value, dtype=np.float32)
    draw.__name__ = f"constant({value})"
    return draw


def he_normal(gain=math.sqrt(2.0)):
    """Kaiming/He: N(0, gain^2 / fan_in), fan_in = in_channels * kh * kw (or in_features)."""
    def draw(shape, rng):
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0.0, gain / math.sqrt(fan_in), size=shape).astype(np.float32)
    draw.__name__ = "he_normal"
    return draw


zeros = constant(0.0)
