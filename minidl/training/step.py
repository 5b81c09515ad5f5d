"""One training step, shared by the trainer (train.py) and the benchmark (bench.py), and its judge.

A step reads nothing back from a GPU: StepGuard judges it on the devices (is the loss or a
gradient NaN or infinite?), the optimizer skips a bad one there, and the figures of the steps
wait on the output device for one read per log interval (benchmarks/NOTES.md, the step).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from minidl.core import Tensor
from minidl.device import Device
from minidl.functions import softmax_cross_entropy
from minidl.functions.transfer import copy_array
from minidl.layers import Layer, seed_dropout
from minidl.loss_scale import DynamicLossScale
from minidl.optim import MomentumSGD


class StepRecord(NamedTuple):
    """One step as read back: where it was taken, its rows, loss, top-1 count, and whether it was bad."""
    position: Any  # the caller's (e.g. (epoch, batch))
    rows: int
    number: int  # the optimizer's step number
    loss: float
    correct: int
    bad: bool  # its loss or a gradient was not finite: no parameter was updated


class StepsRead(NamedTuple):
    """What StepGuard.read() found: every step since the last read, and the updates that overflowed."""
    steps: list[StepRecord]
    overflowed: list[tuple[Tensor, int]]  # (parameter, step number), as MomentumSGD.nonfinite()

    def position_of(self, number: int) -> Any:
        return next((s.position for s in self.steps if s.number == number), self.steps[-1].position)


class StepGuard:
    """Judges every step on the devices and keeps its figures there, for one blocking read per interval.

    check(), after backward (and the ranks' averaging), enqueues the step's verdict, 0 or NaN (the loss
    or a gradient not finite), on every device with parameters, for MomentumSGD.step(halt=...): a bad
    step updates nothing. Unless `skip`, the verdict stays NaN for every later step until read, so the
    weights keep the state before the first bad step. read() is the one blocking read of the steps
    since the last: their records and the optimizer's flags of updates that overflowed.
    """

    def __init__(self, model: Layer, optimizer: MomentumSGD, *, skip: bool,
                 before_read: Optional[Callable[[], None]] = None, loss_scale: Optional[DynamicLossScale] = None):
        # under loss scaling an overflow is expected now and then: that step is skipped and the scale backs off
        self.loss_scale, skip = loss_scale, skip or loss_scale is not None
        self.hub, self.optimizer, self.skip, self.before_read = model.output_device, optimizer, skip, before_read
        self.verdict = None  # the last step's, on the hub
        self.pending = []  # (position, rows, optimizer step number) of each step not read yet
        # on the hub, per pending step: its loss and top-1 count as the step made them (kept, not copied: two
        # launches less a step), and its verdict in a row of `verdicts` (the kept one changes until read)
        self.losses, self.corrects = [], []
        self.verdicts = None
        self.sticky = {}  # without skip: per device, its verdict since the last read (a NaN stays)
        self.seed = None  # backward's seed, a 1 kept on the hub (made once, not once a step)

    def gradient_seed(self, loss: Tensor):
        """The gradient backward starts from: d(loss)/d(loss) = 1, one array kept on the loss's device; under
        loss scaling, the scale S."""
        if self.loss_scale is not None:
            return self.loss_scale.seed(loss)
        if self.seed is None or self.seed.shape != loss.shape or self.seed.dtype != loss.dtype:
            with loss.device:
                self.seed = loss.device.xp.ones(loss.shape, loss.dtype)
        return self.seed

    def check(self, loss: Tensor, top1: Any = None, rows: int = 0, position: Any = None) -> dict[Device, Any]:
        """Judge the step whose backward just ran: returns, per device, the halt for MomentumSGD.step.
        `top1`: the loss's top-1 fraction of its `rows` (softmax_cross_entropy(top1=True)), kept unread."""
        hub = self.hub
        into = None if self.skip else self._sticky(loss.dtype)
        # one pass per device over its gradients, into the kept verdicts unless skip: the other devices' first,
        # then the hub's, which judges their verdicts and the loss with its own gradients and notes the result
        # in the step's row of `verdicts` in the same pass
        others = [d for d in self._devices() if d is not hub]
        found = self.optimizer.nonfinite_gradients(into=into, devices=others) if others else {}
        also = [(hub, loss.data.reshape(1))] + [(hub, copy_array(mark, d, hub)) for d, mark in found.items()]
        with hub:
            noted = self._next_verdict(loss.dtype)
        # with skip the step's row is the hub's verdict itself; else the kept verdict, and the row noted with it
        found.update(self.optimizer.nonfinite_gradients(also=also, into={hub: noted} if self.skip else into,
                                                        noted=None if self.skip else {hub: noted}, devices=[hub]))
        verdict = found[hub]
        with hub:
            self.losses.append(loss.data.reshape(1))
            self.corrects.append(top1)
        self.pending.append((position, rows, self.optimizer.steps + 1))  # the number step() gives it
        self.verdict = verdict
        return {device: verdict if device is hub else copy_array(verdict, hub, device) for device in found}

    def multipliers(self, devices) -> Optional[dict[Device, Any]]:
        """MomentumSGD.step's gradient multipliers: 1/S on each device under loss scaling, else None."""
        return None if self.loss_scale is None else self.loss_scale.multipliers(devices)

    def stepped(self) -> None:
        """After the update: the loss scale from the step's verdict (backs off on a skipped step)."""
        if self.loss_scale is not None:
            self.loss_scale.update(self.verdict)

    def _devices(self):
        """The hub and every device with parameters."""
        return list(dict.fromkeys([self.hub] + [p.device for p in self.optimizer.params]))

    def _sticky(self, dtype):
        """Per device with parameters (and the hub), a zero made once, the verdict kept until read."""
        for device in self._devices():
            if device not in self.sticky:
                with device:
                    self.sticky[device] = device.xp.zeros(1, dtype=dtype)
        return self.sticky

    def _next_verdict(self, dtype):
        """The hub's zeroed cell for the next step's own verdict (the array grows, by doubling, past an
        interval's steps; read() zeroes it again)."""
        n = len(self.pending)
        if self.verdicts is None or n == len(self.verdicts) or self.verdicts.dtype != dtype:
            grown = self.hub.xp.zeros(max(16, 2 * n), dtype=dtype)
            if n:
                grown[:n] = self.verdicts
            self.verdicts = grown
        return self.verdicts[n:n + 1]

    def read(self) -> StepsRead:
        """Every step since the last read, in order, and the overflowed updates: one blocking read."""
        if not self.pending:
            return StepsRead([], [])
        if self.before_read is not None:
            self.before_read()
        flags = self.optimizer.flag_arrays()
        xp, counted = self.hub.xp, [c for c in self.corrects if c is not None]
        with self.hub:
            figures = [self.verdicts[:len(self.pending)], xp.concatenate(self.losses)]
            figures += [xp.concatenate(counted)] if counted else []
        host = read_together(self.hub, [(self.hub, a) for a in figures] + flags)
        overflowed = self.optimizer.nonfinite(host[len(figures):])
        corrects = iter(host[2] if counted else [])
        bad = [not math.isfinite(verdict) for verdict in host[0]]
        if not self.skip:  # the kept verdicts halted every step after a bad one, until this read
            bad = [any(bad[:k + 1]) for k in range(len(bad))]
        # a fraction of the rows, back to a count (exact: the fraction's error is far below half a row)
        steps = [StepRecord(position, rows, number, float(loss), 0 if c is None else round(next(corrects) * rows),
                            was_bad)
                 for (position, rows, number), was_bad, loss, c in zip(self.pending, bad, host[1], self.corrects)]
        self.pending, self.losses, self.corrects = [], [], []
        with self.hub:
            self.verdicts.fill(0)  # the steps' own verdicts are made NaN in place (check)
        for device, kept in self.sticky.items():  # a NaN kept verdict stops the run: nothing is left to carry
            with device:
                kept.fill(0)
        return StepsRead(steps, overflowed)


def read_together(hub: Device, arrays: list[tuple[Device, Any]]) -> list[np.ndarray]:
    """Host copies of arrays on several devices in one blocking read (gathered on `hub`, as float64)."""
    if not hub.is_cuda:
        return [np.asarray(copy_array(a, device, hub) if device is not hub else a) for device, a in arrays]
    with hub:
        parts = [(a if device is hub else copy_array(a, device, hub)).astype(np.float64).reshape(-1)
                 for device, a in arrays]
        host = hub.xp.concatenate(parts).get() if len(parts) > 1 else parts[0].get()
    ends = np.cumsum([a.size for _, a in arrays])[:-1]
    return [part.reshape(a.shape) for part, (_, a) in zip(np.split(host, ends), arrays)]


def train_step(model: Layer, optimizer: MomentumSGD, x: Tensor, labels, dropout_seed: int, *, first_row: int = 0,
               checked: bool = False, guard: Optional[StepGuard] = None, buckets=None,
               position: Any = None) -> tuple[Tensor, Tensor]:
    """Dropout masks, forward, loss, backward, the ranks' averaging and the update; returns (logits, loss).

    `labels` are the loss's (a Tensor on the output device, or host integers it checks);
    `checked` says they were checked against the classes already. `first_row` is the
    batch's first row in the global batch (the dropout masks are a function of it).
    `guard` judges the step on the devices (a bad one updates nothing); `buckets`
    (distributed.GradientBuckets) average the gradients over the ranks.
    """
    seed_dropout(model, dropout_seed, first_row=first_row)
    logits = model(x)
    loss, top1 = softmax_cross_entropy(logits, labels, checked=checked, top1=True)
    optimizer.zero_grad()
    if buckets is not None and guard is not None:  # a rank's bad loss makes every rank's step bad
        buckets.include(loss.data, loss.device)
    scaled = guard is not None and guard.loss_scale is not None
    with np.errstate(over="ignore", invalid="ignore") if scaled else contextlib.nullcontext():
        loss.backward(guard.gradient_seed(loss) if guard is not None else None)  # scaled: may overflow, then skipped
    if buckets is not None:
        buckets.average()
    halt = multiplier = None
    if guard is not None:
        halt = guard.check(loss, top1, len(logits.data), position)
        multiplier = guard.multipliers(halt)
    optimizer.step(halt, multiplier)
    if guard is not None:
        guard.stepped()
    return logits, loss


def labels_on_output(labels, model: Layer) -> Tensor:
    """A batch's labels as the loss kernels read them, int32 on the model's output device: from the host, or from
    the input device, where the loader uploaded them with the batch (a visible copy where the devices differ)."""
    if isinstance(labels, np.ndarray):
        return Tensor(labels.astype(np.int32), device=model.output_device)
    on_input = Tensor(labels, device=model.input_device)
    return on_input if model.input_device is model.output_device else on_input.to(model.output_device)
