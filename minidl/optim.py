"""The paper's optimiser (Section 5) and learning-rate schedule.

MomentumSGD keeps the learning rate and the weight decay inside the velocity:
    v <- momentum * v - weight_decay * lr * w - lr * dL/dw;   w <- w + v
(PyTorch's SGD keeps lr outside, v <- m*v + g; w <- w - lr*v, which differs once lr changes.)
On a GPU one kernel (optim.cu) updates every parameter of a device and dtype; on the CPU NumPy
updates in place, a block per core. Each step notes, on the device, which parameters it left with
a NaN or infinite weight or velocity (a finite gradient can still overflow lr * g); `nonfinite()`
reads it; `nonfinite_gradients` and `step(halt)` judge and skip a step on the devices.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from minidl import kernels
from minidl.core import Tensor, no_grad
from minidl.cpu.threads import in_parallel
from minidl.device import Device

CU = kernels.KernelFile.beside(__file__, "optim.cu", ("momentum_update", "momentum_update_to_half",
                                                     "momentum_update_to_bfloat16", "find_nonfinite"))
# the update that also writes the weights' kept 16-bit casts (minidl.layers.Parameter.cast), by their dtype
_CAST_KERNELS = {np.dtype(np.float16): "momentum_update_to_half",
                 np.dtype(ml_dtypes.bfloat16): "momentum_update_to_bfloat16"}
_STEP_TYPE = np.dtype(np.uint64)  # the kernel's row of step numbers (unsigned long long)


class MomentumSGD:
    def __init__(self, params: Iterable[Tensor], lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 0.0005):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        # Tensors, made on each parameter's device on first use
        self.velocities = [None] * len(self.params)
        self.steps = 0  # step() calls so far: the numbers nonfinite() names steps by
        # (device, dtype) -> (row of step numbers, its parameters): each parameter's first step since
        # the last nonfinite() that left it NaN or infinite, 0 if none; on the parameters' device
        self._flags = {}
        self._fills = {}  # (device, dtype, value) -> one element: the halt or multiplier no caller gave
        self._prepared = {}  # device -> [(host table, device table)] of this step's updates, uploaded with its check

    def step(self, halt: Mapping[Device, Any] | None = None, multiplier: Mapping[Device, Any] | None = None) -> None:
        """Update every parameter with a gradient (counted in `steps` either way).

        `halt[d]`, a one-element array on device d, leaves the parameters of d alone where it is
        not finite: a caller that judged the step on the devices skips it without a read back.
        `multiplier[d]`, a one-element array on d, multiplies d's gradients first (1/S under dynamic
        loss scaling: minidl.loss_scale).
        """
        self.steps += 1
        with no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None or p.device.is_cuda:
                    continue
                v = self._velocity(i, p)
                if halt is None or np.isfinite(halt[p.device]).all():  # on the CPU a read costs nothing
                    with p.device:
                        unscale = None if multiplier is None else float(multiplier[p.device][0])
                        if not self._update_cpu(p.data, p.grad.data, v.data, unscale):
                            self._flag_cpu(p)
                    if hasattr(p, "written"):
                        p.written()  # its kept cast, if any, is stale: the next forward casts again
            for (device, dtype, cast_dtype), launches in self._gpu_launches().items():
                with device:
                    stop = self._scalar(device, dtype, halt, 0)
                    scale = self._scalar(device, dtype, multiplier, 1)
                    for launch in launches:
                        self._update_gpu(device, dtype, cast_dtype, launch, stop, scale)
                        for p, (_, _, _, cast) in launch:
                            if hasattr(p, "written"):
                                p.written(cast)  # updated with the weights (unless the step is skipped: neither)
        self._prepared = {}

    def _gpu_launches(self) -> dict:
        """(device, dtype, dtype of the kept 16-bit casts or None) -> launches of the update, each
        [(p, (w, g, v, cast)), ...], for the parameters on GPUs with a gradient."""
        on_gpus = {}
        for i, p in enumerate(self.params):
            if p.grad is None or not p.device.is_cuda:
                continue
            v = self._velocity(i, p)
            # a layers.Parameter's kept cast (mixed precision) is written in the same pass
            cast = p.current_cast() if hasattr(p, "current_cast") else None
            launches = on_gpus.setdefault((p.device, p.dtype, None if cast is None else cast.dtype), [[]])
            if any(q is p for q, _ in launches[-1]):
                # listed twice (a shared layer): updated twice, as on the CPU, so in a
                # second launch, not by two threads of one writing the same weight
                launches.append([])
            launches[-1].append((p, (p.data, p.grad.data, v.data, cast)))
        return on_gpus

    def _velocity(self, i, p):
        v = self.velocities[i]
        if v is None:
            with p.device:
                v = Tensor(p.device.xp.zeros_like(p.data), device=p.device)
        elif v.device is not p.device or v.dtype != p.dtype:  # the layer was moved (Layer.to)
            v = Tensor(v.numpy().astype(p.dtype), device=p.device)
        self.velocities[i] = v
        return v

    def _scalar(self, device, dtype, given, fill):
        """given[device] as the kernel reads it (one element of `dtype`), or a `fill` made once: a halt of 0 (a
        step no caller judged), a multiplier of 1 (gradients not scaled)."""
        if given is not None:
            return device.xp.asarray(given[device], dtype=dtype)
        if (device, dtype, fill) not in self._fills:
            self._fills[device, dtype, fill] = device.xp.full(1, fill, dtype=dtype)
        return self._fills[device, dtype, fill]

    def _flag_row(self, device, dtype):
        """The row of step numbers of (device, dtype) and its parameters, made on first use."""
        members = list({id(p): p for p in self.params if p.device is device and p.dtype == dtype}.values())
        row = self._flags.get((device, dtype))
        if row is None or len(row[1]) != len(members):  # first use, or a layer moved here (Layer.to)
            with device:
                row = self._flags[device, dtype] = (device.xp.zeros(len(members), dtype=_STEP_TYPE), members)
        return row

    def _flag_cpu(self, p):
        flags, members = self._flag_row(p.device, p.dtype)
        k = next(k for k, q in enumerate(members) if q is p)
        if not flags[k]:
            flags[k] = self.steps

    def _update_cpu(self, w, g, v, unscale=None):
        """Update in place (the gradient times `unscale` if given); True if every new weight and velocity is
        finite."""
        momentum, decay, lr = (w.dtype.type(c) for c in (self.momentum, self.weight_decay * self.lr,
                                                         self.lr))
        nonfinite_blocks = []

        def update(part):  # in place, a block at a time: for fc6 these arrays are 150 MB each
            v_part, w_part = v[part], w[part]
            # an overflow is found below, and reported once
            with np.errstate(over="ignore", invalid="ignore"):
                v_part *= momentum
                v_part -= decay * w_part
                v_part -= lr * (g[part] if unscale is None else g[part] * w.dtype.type(unscale))
                w_part += v_part
            # while the block is in the cache
            if not (np.isfinite(v_part).all() and np.isfinite(w_part).all()):
                nonfinite_blocks.append(part)
        in_parallel(update, w, blocks=True)
        return not nonfinite_blocks

    def _update_gpu(self, device, dtype, cast_dtype, launch, halt, multiplier):
        """One kernel over every (w, g, v, cast) of the launch (all of `dtype`, on the current GPU), unless halt is
        not finite; a parameter it leaves with a weight or velocity that is not finite gets its slot of the
        device's flags. Where `cast_dtype` (float16 or bfloat16) is given, the kernel also writes each weight into
        its cast."""
        host, kept = self._update_table(device, dtype, cast_dtype, launch)
        # the table uploaded with the step's check (nonfinite_gradients) where it holds the same addresses
        table = next((t for h, t in self._prepared.get(device, ()) if np.array_equal(h, host)), None)
        table = kernels.upload_tables([host])[0] if table is None else table
        name = "momentum_update" if cast_dtype is None else _CAST_KERNELS[np.dtype(cast_dtype)]
        ends = host[-2, :len(launch)]
        # Python floats: launch makes each the kernel's T, the same rounding as w.dtype.type in _update_cpu
        kernels.launch(CU, name, dtype, int(ends[-1]), *table, self._flag_row(device, dtype)[0], halt, multiplier,
                       self.steps, len(launch), int(ends[-1]), float(self.momentum),
                       float(self.weight_decay * self.lr), float(self.lr))
        del kept  # the contiguous gradients stay alive until the launch is enqueued

    def _update_table(self, device, dtype, cast_dtype, launch):
        """The update's table on the host (address_rows: w, g, v, cast, ends, flag slots), and the contiguous
        gradients it points to, to keep alive."""
        params, arrays = zip(*launch)
        ws, gs, vs, casts = zip(*arrays)
        # the kernel reads each array flat: a gradient may be a view (copied here), while w and v are whole
        # arrays (address_rows refuses a non-contiguous one)
        gs = [device.xp.ascontiguousarray(g) for g in gs]
        slots = {id(q): k for k, q in enumerate(self._flag_row(device, dtype)[1])}
        rows = [ws, gs, vs] + ([casts] if cast_dtype is not None else [])
        rows += [np.cumsum([w.size for w in ws]).tolist(), [slots[id(q)] for q in params]]
        return kernels.address_rows(rows), gs

    def _update_tables(self, device) -> list[np.ndarray]:
        """The host tables of the updates step() will launch on `device`, as its gradients stand now (not those
        with a gradient to copy first: step() makes that copy, at another address)."""
        return [self._update_table(device, dtype, cast_dtype, launch)[0]
                for (on, dtype, cast_dtype), launches in self._gpu_launches().items() if on is device
                for launch in launches if all(g.flags.c_contiguous for _, (_, g, _, _) in launch)]

    def nonfinite_gradients(self, also: Sequence[tuple[Device, Any]] = (),
                            into: Mapping[Device, Any] | None = None, noted: Mapping[Device, Any] | None = None,
                            devices: Sequence[Device] | None = None) -> dict:
        """Per device with gradients, a one-element array, enqueued and not read back: 0 where every
        gradient element there is finite, else NaN (its dtype the parameters').

        `also`: (device, array) pairs judged with that device's gradients (e.g. the loss), in the same
        pass. `into[d]`, a one-element array of d, takes d's verdict in place of a new zero: a NaN
        already there stays (a verdict kept over several steps). `noted[d]`, a zeroed one-element array of d
        and its gradients' dtype, is made NaN too in the same pass (a step's own record). `devices`: only
        these devices' gradients (and `also`), e.g. the others' first, to be judged with the last.
        """
        groups = {}  # (device, dtype) -> {id: array}: a shared parameter once
        for p in self.params:
            if p.grad is not None and (devices is None or p.device in devices):
                groups.setdefault((p.device, p.dtype), {})[id(p)] = p.grad.data
        for device, array in also:
            groups.setdefault((device, array.dtype), {})[id(array)] = array
        found, noted_in = {}, set()  # noted_in: the devices whose `noted` cell a pass has made
        for (device, dtype), arrays in groups.items():
            cell = None if into is None or device in found else into.get(device)
            cell = cell if cell is None or cell.dtype == dtype else None  # then added in below
            note = (noted or {}).get(device)
            note = note if note is not None and note.dtype == dtype and device not in noted_in else None
            with device:
                # the device's update tables go up with its first pass's, in one copy (step() finds them)
                updates = self._update_tables(device) if device.is_cuda and device not in found else []
                mark, uploaded = _find_nonfinite(device, dtype, list(arrays.values()), cell, note, updates)
                if updates:
                    self._prepared[device] = list(zip(updates, uploaded))
                if note is not None:
                    noted_in.add(device)
                elif device in (noted or {}):  # a pass of another dtype: added in (rare: one dtype a device)
                    noted[device] += mark
                if device in found:  # another dtype on the device: into its verdict, in place
                    found[device] += mark
                else:
                    found[device] = mark
        for device, cell in (into or {}).items():
            if device in found and found[device] is not cell:
                with device:
                    cell += found[device]
                found[device] = cell
        return found

    def flag_arrays(self) -> list[tuple[Device, Any]]:
        """(device, row) of each row of step numbers nonfinite() reads, for a caller that reads them
        all at once and passes the host copies to nonfinite()."""
        return [(device, flags) for (device, _), (flags, _) in self._flags.items()]

    def nonfinite(self, values: Sequence[np.ndarray] | None = None) -> list[tuple[Tensor, int]]:
        """The parameters the steps since the last call left with a NaN or infinite weight or velocity,
        each with the number of the first step that did, in step order; then clears the rows.

        `values` are the host copies of flag_arrays(), read by the caller; else one read each here.
        """
        rows = list(self._flags.items())
        if values is None:
            values = [_host_copy(device, flags) for (device, _), (flags, _) in rows]
        found = []
        for ((device, _), (flags, members)), host in zip(rows, values):
            host = np.asarray(host).reshape(-1)
            if host.any():
                found += [(p, int(n)) for p, n in zip(members, host) if n]
                with device:
                    flags.fill(0)
        return sorted(found, key=lambda pair: pair[1])

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


def _host_copy(device, array):
    with device:  # on the device's stream
        return array.get() if device.is_cuda else array


def _all_finite(g) -> bool:
    """Whether every element of a host array is finite (BLAS's dot first: finite only if they all are)."""
    flat = g.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(flat.dot(flat)):
            return True
    return bool(np.isfinite(flat).all())  # the squares overflowed, or an element is not finite


def _find_nonfinite(device, dtype, arrays, found=None, noted=None, tables=()):
    """The one-element verdict of `arrays` (of `dtype`, on the current device): NaN if any element is not
    finite, made in `found` if given (else in a new zero), and in `noted` too if given; and on a GPU the host
    `tables` on the device, uploaded in the same copy as the pass's own table."""
    if not device.is_cuda:
        mark = np.array([0.0 if all(map(_all_finite, arrays)) else np.nan], dtype=dtype)
        for cell in (found, noted):
            if cell is not None:
                cell += mark
        return (mark if found is None else found), []
    xp = device.xp
    arrays = [xp.ascontiguousarray(g) for g in arrays]  # kept alive here until the launch is enqueued
    ends = np.cumsum([g.size for g in arrays]).tolist()
    table, *uploaded = kernels.upload_tables([kernels.address_rows([arrays, ends])] + list(tables))
    if found is None:
        found = xp.zeros(1, dtype=dtype)
    kernels.launch(CU, "find_nonfinite", dtype, ends[-1], table[0], table[1], found,
                   found if noted is None else noted, len(ends), ends[-1])
    return found, uploaded


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
