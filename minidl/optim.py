"""The paper's optimiser (Section 5) and learning-rate schedule.

MomentumSGD keeps the learning rate and the weight decay inside the velocity:
    v <- momentum * v - weight_decay * lr * w - lr * dL/dw;   w <- w + v
(PyTorch's SGD keeps lr outside, v <- m*v + g; w <- w - lr*v, which differs once lr changes.)
On a GPU one kernel (optim.cu) updates every parameter of a device and dtype; on the CPU NumPy
updates in place, a block per core. Each step notes which parameters it left with a NaN or
infinite weight or velocity (a finite gradient can still overflow lr * g); `nonfinite()` reads it.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from minidl import kernels
from minidl.core import Tensor, no_grad
from minidl.cpu.threads import in_parallel

CU = kernels.KernelFile.beside(__file__, "optim.cu", ("momentum_update",))


class MomentumSGD:
    def __init__(self, params: Iterable[Tensor], lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 0.0005):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # Tensors, made on each parameter's device on first use
        self.velocities = [None] * len(self.params)
        # the last step's, unread: (device or None, params, flags nonzero where not finite)
        self._verdicts = []

    def step(self) -> None:
        with no_grad():
            self._verdicts = []
            # (device, dtype) -> launches, each [(p, (w, g, v)), ...]: made after the loop
            on_gpus = {}
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                v = self.velocities[i]
                if v is None:
                    with p.device:
                        v = Tensor(p.device.xp.zeros_like(p.data), device=p.device)
                # the layer was moved (Layer.to)
                elif v.device is not p.device or v.dtype != p.dtype:
                    v = Tensor(v.numpy().astype(p.dtype), device=p.device)
                self.velocities[i] = v
                if p.device.is_cuda:
                    launches = on_gpus.setdefault((p.device, p.dtype), [[]])
                    if any(q is p for q, _ in launches[-1]):
                        # listed twice (a shared layer): updated twice, as on the CPU, so in a
                        # second launch, not by two threads of one writing the same weight
                        launches.append([])
                    launches[-1].append((p, (p.data, p.grad.data, v.data)))
                else:
                    with p.device:
                        self._verdicts.append((None, [p],
                                               [not self._update_cpu(p.data, p.grad.data, v.data)]))
            for (device, dtype), launches in on_gpus.items():
                with device:
                    for launch in launches:
                        params, arrays = zip(*launch)
                        self._verdicts.append((device, params,
                                               self._update_gpu(device.xp, dtype, arrays)))

    def _update_cpu(self, w, g, v):
        """Update in place; True if every new weight and velocity is finite."""
        momentum, decay, lr = (w.dtype.type(c) for c in (self.momentum, self.weight_decay * self.lr,
                                                         self.lr))
        nonfinite_blocks = []

        def update(part):  # in place, a block at a time: for fc6 these arrays are 150 MB each
            v_part, w_part = v[part], w[part]
            # an overflow is found below, and reported once
            with np.errstate(over="ignore", invalid="ignore"):
                v_part *= momentum
                v_part -= decay * w_part
                v_part -= lr * g[part]
                w_part += v_part
            # while the block is in the cache
            if not (np.isfinite(v_part).all() and np.isfinite(w_part).all()):
                nonfinite_blocks.append(part)
        in_parallel(update, w, blocks=True)
        return not nonfinite_blocks

    def _update_gpu(self, xp, dtype, arrays):
        """One kernel over every (w, g, v) of the current GPU, all of `dtype`; returns the device
        row of flags it sets to 1 for each parameter it leaves with a weight or velocity that is not
        finite."""
        ws, gs, vs = zip(*arrays)
        # the kernel reads each array flat: a gradient may be a view (copied here, kept alive by
        # `gs`), while w and v are whole arrays (address_table refuses a non-contiguous one)
        gs = [xp.ascontiguousarray(g) for g in gs]
        ends = np.cumsum([w.size for w in ws]).tolist()
        # the last row: the flags, zeroed
        table = kernels.address_table([ws, gs, vs, ends, [0] * len(ws)])
        # Python floats: launch makes each the kernel's T, the same rounding as w.dtype.type in
        # _update_cpu
        kernels.launch(CU, "momentum_update", dtype, ends[-1], table[0], table[1], table[2],
                       table[3], table[4], len(ends), ends[-1], float(self.momentum),
                       float(self.weight_decay * self.lr), float(self.lr))
        return table[4]

    # On a GPU the kernel writes the verdict into a row of the address table it reads anyway: no
    # device work of its own, and the trainer reads it with the next step's loss, when the device
    # has nothing left to do (a copy, not a wait).
    def nonfinite(self) -> list[Tensor]:
        """The parameters the last step left with a NaN or infinite weight or velocity (empty if
        none, or if already read): one read per GPU launch, the flags the kernel wrote."""
        verdicts, self._verdicts = self._verdicts, []
        found = []
        for device, params, flags in verdicts:
            if device is not None:
                with device:
                    flags = flags.get()
            found += [p for p, flag in zip(params, flags) if flag]
        return found

    def grad_norm(self) -> float:
        """The L2 norm of all gradients, NaN or infinite if any gradient is: one read per device."""
        squares = {}  # device -> sum of squares, kept on the device until the read
        for p in self.params:
            if p.grad is not None:
                # overflow is the answer, not a warning
                with p.device, np.errstate(over="ignore", invalid="ignore"):
                    g = p.grad.data.reshape(-1)
                    # BLAS: cheaper than isfinite
                    squares[p.device] = squares.get(p.device, 0) + g.dot(g)
        total = 0.0
        for device, square in squares.items():
            with device:
                total += float(square)
        return math.sqrt(total)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state(self) -> list[np.ndarray | None]:
        """Velocities as host arrays (None where a parameter never had a gradient)."""
        return [None if v is None else v.numpy() for v in self.velocities]

    def load_state(self, velocities: Sequence[np.ndarray | None]) -> None:
        for i, (p, v) in enumerate(zip(self.params, velocities)):
            if v is None:
                self.velocities[i] = None
                continue
            self.velocities[i] = Tensor(np.asarray(v, dtype=p.dtype), device=p.device)


class PlateauSchedule:
    """Divide the learning rate by `factor` when validation error stops improving.

    After `patience` epochs without a new best error the rate drops; after
    `max_drops` drops, the next plateau ends training (the paper: three drops).
    """

    def __init__(self, lr: float, factor: float = 10.0, patience: int = 2, max_drops: int = 3):
        self.lr, self.factor, self.patience, self.max_drops = lr, factor, patience, max_drops
        self.best = float("inf")
        self.bad_epochs = 0
        self.drops = 0
        self.finished = False

    def step(self, val_error: float) -> float:
        """Record one epoch's validation error; returns the learning rate for the next epoch."""
        if val_error < self.best:
            self.best, self.bad_epochs = val_error, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= self.patience:
                self.bad_epochs = 0
                if self.drops == self.max_drops:
                    self.finished = True
                else:
                    self.drops += 1
                    self.lr /= self.factor
        return self.lr

    STATE_KEYS = ("lr", "factor", "patience", "max_drops", "best", "bad_epochs", "drops",
                  "finished")

    def state(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE_KEYS}

    def load_state(self, state: dict) -> None:
        for k in self.STATE_KEYS:
            setattr(self, k, type(getattr(self, k))(state[k]))
