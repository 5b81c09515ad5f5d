"""Dynamic loss scaling, kept on the device (what PyTorch's GradScaler and Chainer's dynamic loss scale do).

In half precision small gradients flush to zero. Backward therefore starts from the scale S instead of 1,
so every gradient is S times the true one, and the update multiplies each by 1/S (MomentumSGD.step's
`multiplier`). Where the scaled gradients overflow, the step's verdict (StepGuard's non-finite check) is
NaN: the step is skipped and S halves. After `growth_interval` clean steps in a row S doubles.

S, growth and backoff are powers of two, so without an overflow a scaled step is the unscaled one bit for
bit. The state, [S, clean steps, 1/S], lives in one array on the loss's device and changes there
(loss_scale.cu; NumPy on the CPU): nothing is read back a step. state() reads it, for a checkpoint.
"""
from __future__ import annotations

import math

import numpy as np

from minidl import kernels
from minidl.core import Array, Tensor
from minidl.device import Device
from minidl.errors import MinidlError
from minidl.functions.transfer import copy_array

CU = kernels.KernelFile.beside(__file__, "loss_scale.cu", ("loss_scale_update",))


def _power_of_two(value: float) -> bool:
    return value > 0 and math.isfinite(value) and math.frexp(value)[0] == 0.5


class DynamicLossScale:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        for name, value in (("init_scale", init_scale), ("growth_factor", growth_factor),
                            ("backoff_factor", backoff_factor)):
            if not _power_of_two(float(value)):
                raise MinidlError(f"loss scale: {name} must be a power of two (exact unscaling), got {value}")
        if not growth_factor > 1 or not backoff_factor < 1:
            raise MinidlError(f"loss scale: growth_factor must be over 1 and backoff_factor under 1, got "
                              f"{growth_factor} and {backoff_factor}")
        if int(growth_interval) != growth_interval or growth_interval < 1:
            raise MinidlError(f"loss scale: growth_interval must be a whole number of steps, got {growth_interval}")
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self._start = (float(init_scale), 0)  # (scale, clean steps) until the state is made
        self.device, self.array = None, None  # [scale, clean steps, 1/scale] on the loss's device

    def seed(self, loss: Tensor) -> Array:
        """backward's starting gradient: S, shaped as the loss, on its device (a view of the state: no copy)."""
        if self.array is None or self.device is not loss.device or self.array.dtype != loss.dtype:
            scale, clean = self.state()
            self.device = loss.device
            with loss.device:
                self.array = loss.device.xp.asarray(np.array([scale, clean, 1.0 / scale], dtype=loss.dtype))
        return self.array[:1].reshape(loss.shape)

    def multipliers(self, devices) -> dict[Device, Array]:
        """1/S on each device, for MomentumSGD.step: the state's own element on its device, a copy elsewhere."""
        inverse = self.array[2:]
        return {device: inverse if device is self.device else copy_array(inverse, self.device, device)
                for device in devices}

    def update(self, verdict: Array) -> None:
        """After the step (its updates enqueued): S from the step's verdict, a one-element array on S's device,
        0 or NaN (the step was skipped)."""
        state = self.array
        if not self.device.is_cuda:  # loss_scale.cu's arithmetic, in the state's dtype
            T = state.dtype.type
            scale, clean = state[0], state[1]
            if not np.isfinite(verdict).all():
                scale, clean = scale * T(self.backoff_factor), T(0)
            else:
                clean = clean + T(1)
                if clean >= self.growth_interval:
                    with np.errstate(over="ignore"):
                        grown = scale * T(self.growth_factor)
                    scale, clean = grown if np.isfinite(grown) else scale, T(0)
            state[:] = (scale, clean, T(1) / scale)
            return
        with self.device:
            kernels.launch(CU, "loss_scale_update", state.dtype, 1, state, verdict.astype(state.dtype, copy=False),
                           self.growth_factor, self.backoff_factor, self.growth_interval)

    def state(self) -> tuple[float, int]:
        """(S, clean steps since the last change): a read from the device, for a checkpoint."""
        if self.array is None:
            return self._start
        with self.device:
            host = self.array.get() if self.device.is_cuda else self.array
        return float(host[0]), int(host[1])

    def load_state(self, scale: float, clean_steps: int) -> None:
        if not scale > 0 or not math.isfinite(scale):
            raise MinidlError(f"loss scale must be a positive number, got {scale}")
        self._start, self.device, self.array = (float(scale), int(clean_steps)), None, None
