"""The training step reads nothing back from a GPU: it is judged on the devices, read once per interval."""
import os

import numpy as np
import pytest

from minidl.core import Tensor
from minidl.device import device
from minidl.layers import Linear, Parameter
from minidl.optim import MomentumSGD
from minidl.training.step import StepGuard, train_step
from minidl.training.train import train
from test_cli import dataset, image_dir  # noqa: F401 -- fixtures

# a model on two devices, a crossing between them as AlexNet's towers have
TWO_DEVICES = '''
from minidl.layers import Flatten, Layer, Linear, ReLU

CONFIG = dict(momentum=0.9, weight_decay=0.0005, lr_drop_factor=10, lr_drops=3, init="he", devices=("cuda:0", "cuda:1"),
              input_size=11, batch_size=4, epochs=2, lr=0.01, plateau_patience=5, input_scale=1 / 255)


class TwoDevices(Layer):
    def __init__(self, num_classes, devices, seed):
        super().__init__(device=None)
        self.flat = Flatten(device=devices[1])
        self.hidden, self.relu = Linear(3 * 11 * 11, 8, device=devices[1], rng=seed), ReLU(device=devices[1])
        self.out = Linear(8, num_classes, device=devices[0], rng=seed + 1)
        self.input_device, self.output_device = self.hidden.device, self.out.device

    def forward(self, x):
        return self.out(self.relu(self.hidden(self.flat(x))).to(self.output_device))


def build_model(num_classes, devices, init, seed):
    return TwoDevices(num_classes, devices, seed)
'''


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("MINIDL_EMULATE_GPUS"), reason="counts the emulator's waits: --emulate-gpus 2")
def test_a_step_without_a_log_line_reads_nothing_back(dataset, tmp_path, monkeypatch):
    """Every host wait for a device (a blocking read, a synchronize) is counted: between two log lines,
    five steps make one, the interval's read."""
    from minidl_emulator import streams
    waits = [0]
    plain = streams.host_waits_for
    monkeypatch.setattr(streams, "host_waits_for", lambda known: (waits.__setitem__(0, waits[0] + 1), plain(known)))
    model = tmp_path / "two.py"
    model.write_text(TWO_DEVICES)
    at_log = []
    train(model, data=dataset, devices="cuda:0,cuda:1", out_dir=tmp_path / "run", log_every=5, max_steps=10,
          epochs=5, batch_size=2, checkpoint_seconds=1e9,
          progress=lambda event: at_log.append(waits[0]) if event["kind"] == "step" else None)
    assert len(at_log) >= 2 and at_log[1] - at_log[0] == 1, at_log


class _Hub:
    def __init__(self, device):
        self.output_device = device


@pytest.mark.parametrize("where", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("skip", [True, False])
def test_a_bad_gradient_on_one_device_skips_the_update_on_every_device(where, skip):
    """Judged on the devices: a NaN gradient on the second device leaves the first's parameter alone too;
    with skip the next good step updates, without it the verdict stays until read."""
    dev0, dev1 = (device("cuda:0"), device("cuda:1")) if where == "cuda" else (device("cpu"),) * 2
    a, b = Parameter(np.ones(3, np.float32), device=dev0), Parameter(np.ones(3, np.float32), device=dev1)
    opt = MomentumSGD([a, b], lr=0.1, momentum=0.0, weight_decay=0.0)
    guard = StepGuard(_Hub(dev0), opt, skip=skip)
    for step, bad in enumerate((False, True, False)):
        a.grad = Parameter(np.ones(3, np.float32), device=dev0)
        b.grad = Parameter(np.array([1, np.nan if bad else 1, 1], np.float32), device=dev1)
        opt.step(guard.check(Tensor(np.float32(0.5), device=dev0), position=(0, step)))
    read = guard.read()
    assert [s.bad for s in read.steps] == [False, True, not skip] and read.overflowed == []
    assert [s.position for s in read.steps] == [(0, 0), (0, 1), (0, 2)] and [s.loss for s in read.steps] == [0.5] * 3
    expected = 1 - 0.1 * (2 if skip else 1)  # the first step, and with skip the third
    np.testing.assert_allclose(a.numpy(), expected)
    np.testing.assert_allclose(b.numpy(), expected)
    assert guard.read().steps == []  # read once


def test_train_step_with_a_guard_judges_and_updates_on_the_cpu():
    layer = Linear(4, 3, rng=0)
    opt = MomentumSGD(layer.params(), lr=0.1)
    layer.input_device = layer.output_device = layer.device
    guard = StepGuard(layer, opt, skip=False)
    before = layer.W.numpy().copy()
    x = Tensor(np.ones((2, 4), np.float32))
    train_step(layer, opt, x, Tensor(np.array([0, 2], np.int32)), 0, checked=True, guard=guard, position=(0, 0))
    step, = guard.read().steps
    assert not step.bad and step.rows == 2 and np.isfinite(step.loss) and step.correct in (0, 1, 2)
    assert not np.array_equal(layer.W.numpy(), before)


@pytest.mark.gpu
@pytest.mark.skipif(not os.environ.get("MINIDL_EMULATE_GPUS"), reason="counts the emulator's copies: --emulate-gpus 2")
def test_the_check_uploads_each_devices_tables_once_and_notes_each_steps_verdict(charged):
    """The check's pass on each device uploads the update's table with its own, in one copy, and the step's
    verdict is made in its row of the kept verdicts by the hub's pass: no add, no assignment after it."""
    dev0, dev1 = device("cuda:0"), device("cuda:1")
    a, b = Parameter(np.ones(3, np.float32), device=dev0), Parameter(np.ones(5, np.float32), device=dev1)
    opt = MomentumSGD([a, b], lr=0.1, momentum=0.0, weight_decay=0.0)
    guard = StepGuard(_Hub(dev0), opt, skip=True)
    for interval, bads in enumerate([(False, True, False), (False, False)]):
        for step, bad in enumerate(bads):
            a.grad = Parameter(np.ones(3, np.float32), device=dev0)
            b.grad = Parameter(np.array([1, np.inf if bad else 1, 1, 1, 1], np.float32), device=dev1)
            loss = Tensor(np.float32(0.5), device=dev0)
            before = len(charged())
            opt.step(guard.check(loss, position=(interval, step)))
            ops = charged()[before:]
            uploads = [e for e in ops if e.kind == "copy" and e.unit == "h2d"]
            assert sorted(e.device for e in uploads) == [0, 1], ops  # one table copy a device
            if (interval, step) != (0, 0):  # the first step also makes the velocities and the flags
                # with skip, the second device's verdict starts from a new zero; the hub's is its kept row
                assert [(e.name, e.device) for e in ops if e.kind == "elementwise"] == [("zeros", 1)], ops
        assert [s.bad for s in guard.read().steps] == list(bads)
    np.testing.assert_allclose(a.numpy(), 1 - 0.1 * 4, rtol=1e-6)  # 4 of the 5 steps updated
