"""Dynamic loss scaling (minidl.loss_scale): exact when nothing overflows, an overflow skipped without losing
the step's state, the scale's state on the device and in checkpoints; CPU and emulated GPUs alike."""
import os

import numpy as np
import pytest

from minidl import MinidlError, Tensor
from minidl.loss_scale import DynamicLossScale
from minidl.training.checkpoint import load_checkpoint
from minidl.training.train import train
from test_cli import dataset, image_dir, run, tiny_model  # noqa: F401 -- fixtures

DEVICES = ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)]


def weights(path):
    checkpoint = load_checkpoint(str(path))
    return checkpoint, {name: checkpoint.params[name] for name in sorted(checkpoint.params)}


def host(dev, array):
    """A one-element array's value, read on its device's stream."""
    with dev:
        return float((array.get() if dev.is_cuda else array).reshape(-1)[0])


def reference_update(scale, clean, bad, growth=2.0, backoff=0.5, interval=3):
    """The rule loss_scale.cu and the NumPy path implement, written out."""
    if bad:
        return scale * backoff, 0
    clean += 1
    if clean >= interval:
        return scale * growth, 0
    return scale, clean


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_scale_backs_off_on_a_bad_step_and_grows_after_clean_ones(where, dtype):
    """A random run of verdicts (0 or NaN): the state on the device follows the rule step by step, 1/S with it;
    the seed is S, a view shaped as the loss."""
    from minidl.device import device
    dev = device(where)
    scaler = DynamicLossScale(init_scale=2.0 ** 10, growth_interval=3)
    loss = Tensor(np.array(1.5, dtype), device=dev)
    seed = scaler.seed(loss)
    assert seed.shape == () and host(dev, seed) == 2.0 ** 10 and seed.dtype == dtype
    expected = (2.0 ** 10, 0)
    rng = np.random.default_rng(5)
    for bad in rng.random(40) < 0.3:
        verdict = Tensor(np.array([np.nan if bad else 0.0], dtype), device=dev).data
        scaler.update(verdict)
        expected = reference_update(*expected, bad)
        assert scaler.state() == expected
        assert host(dev, scaler.multipliers([dev])[dev]) == 1.0 / expected[0]


def test_growth_stops_short_of_infinity():
    scaler = DynamicLossScale(init_scale=2.0 ** 127, growth_interval=1)
    scaler.seed(Tensor(np.array(1.0, np.float32)))
    scaler.update(np.zeros(1, np.float32))
    assert scaler.state() == (2.0 ** 127, 0)  # 2^128 is infinite in float32


@pytest.mark.parametrize("bad", [dict(init_scale=3.0), dict(growth_factor=1.5), dict(backoff_factor=2.0),
                                 dict(growth_interval=0), dict(init_scale=float("inf"))])
def test_a_bad_setting_is_refused_in_one_line(bad):
    with pytest.raises(MinidlError, match="loss scale"):
        DynamicLossScale(**bad)


@pytest.mark.parametrize("devices", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_training_with_a_power_of_two_scale_is_training_without_it_bit_for_bit(dataset, tiny_model, tmp_path,
                                                                                 devices):
    """S = 2^16 multiplies every gradient exactly and the update divides exactly: the same weights, velocities and
    losses as a run without scaling; the checkpoint holds the scale's state."""
    common = dict(data=dataset, devices=devices, batch_size=4, max_steps=5, log_every=1, epochs=1)
    plain = train(tiny_model, out_dir=tmp_path / "plain", **common)
    scaled = train(tiny_model, out_dir=tmp_path / "scaled", loss_scale=True, **common)
    (a, wa), (b, wb) = weights(tmp_path / "plain" / "last.h5"), weights(tmp_path / "scaled" / "last.h5")
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
        np.testing.assert_array_equal(a.momentum[name], b.momentum[name], err_msg=name)
    assert plain["interval_loss"] == scaled["interval_loss"]
    assert a.loss_scale is None
    assert b.loss_scale == dict(scale=2.0 ** 16, clean_steps=b["step"], growth_interval=2000) and b["step"] >= 3


@pytest.mark.parametrize("where", DEVICES)
def test_an_injected_overflow_is_skipped_without_losing_the_steps_state(where):
    """A scale so large the scaled gradients overflow: that step changes no weight and no velocity, S halves
    until the gradients are finite, and the first step taken then is exactly an unscaled step from the state
    before the overflow (weights, velocities). The loss reported is the unscaled loss."""
    from minidl.device import device
    from minidl.layers import Linear
    from minidl.optim import MomentumSGD
    from minidl.training.step import StepGuard, train_step
    dev = device(where)
    rng = np.random.default_rng(3)
    x_host = rng.uniform(-50, 50, (6, 5)).astype(np.float32)  # weight gradients of tens: 2^127 times them overflow
    labels_host = np.array([0, 2, 1, 1, 0, 2], np.int32)
    runs = {}
    for scaled in (True, False):
        layer = Linear(5, 3, rng=0, device=dev)
        layer.input_device = layer.output_device = layer.device
        opt = MomentumSGD(layer.params(), lr=0.1)
        warm = StepGuard(layer, opt, skip=False)  # one plain step first: velocities that are not zero
        x, labels = Tensor(x_host, device=dev), Tensor(labels_host, device=dev)
        train_step(layer, opt, x, labels, 0, checked=True, guard=warm)
        before = [p.numpy().copy() for p in layer.params()] + [v.numpy().copy() for v in opt.velocities]
        scaler = DynamicLossScale(init_scale=2.0 ** 127, growth_interval=1000) if scaled else None
        guard = StepGuard(layer, opt, skip=False, loss_scale=scaler)
        bad_steps = 0
        while True:
            train_step(layer, opt, x, labels, 1, checked=True, guard=guard)
            step, = guard.read().steps
            if not step.bad:
                break
            bad_steps += 1
            after = [p.numpy() for p in layer.params()] + [v.numpy() for v in opt.velocities]
            for kept, now in zip(before, after):
                np.testing.assert_array_equal(kept, now)  # the overflowed step changed nothing
            assert np.isfinite(step.loss)  # the loss itself is not scaled
            assert scaler.state() == (2.0 ** (127 - bad_steps), 0)
        runs[scaled] = ([p.numpy() for p in layer.params()] + [v.numpy() for v in opt.velocities], step.loss,
                        bad_steps)
    assert runs[True][2] >= 1 and runs[False][2] == 0
    assert runs[True][1] == runs[False][1]
    for a, b in zip(runs[True][0], runs[False][0]):
        np.testing.assert_array_equal(a, b)


def test_a_resumed_run_continues_the_scale_exactly(dataset, tiny_model, tmp_path):
    """Stopped after 2 steps with a growth every 3 clean steps, resumed from last.h5: the same weights and the
    same scale as a run never stopped (the clean-step count is in the checkpoint)."""
    import minidl.training.train as training
    original = training.DynamicLossScale
    try:
        training.DynamicLossScale = lambda: original(init_scale=2.0 ** 4, growth_interval=3)
        common = dict(data=dataset, devices="cpu", batch_size=4, log_every=1, epochs=1)
        train(tiny_model, out_dir=tmp_path / "straight", loss_scale=True, max_steps=5, **common)
        train(tiny_model, out_dir=tmp_path / "resumed", loss_scale=True, max_steps=2, **common)
        assert load_checkpoint(str(tmp_path / "resumed" / "last.h5")).loss_scale["clean_steps"] == 2
        train(tiny_model, resume=str(tmp_path / "resumed" / "last.h5"), out_dir=tmp_path / "resumed", max_steps=5,
              **{k: v for k, v in common.items() if k not in ("batch_size",)})
    finally:
        training.DynamicLossScale = original
    (a, wa), (b, wb) = weights(tmp_path / "straight" / "last.h5"), weights(tmp_path / "resumed" / "last.h5")
    steps = a["step"]
    assert steps == b["step"] >= 4
    assert a.loss_scale == b.loss_scale == dict(scale=2.0 ** 4 * 2 ** (steps // 3), clean_steps=steps % 3,
                                                growth_interval=3)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def test_the_cli_takes_loss_scale_and_a_corrupt_scale_is_refused(dataset, tiny_model, tmp_path):
    code, output = run("train", tiny_model, "--data", dataset, "--devices", "cpu", "--out", tmp_path / "run",
                       "--epochs", "1", "--loss-scale")
    assert code == 0, output
    checkpoint = tmp_path / "run" / "last.h5"
    assert load_checkpoint(str(checkpoint)).loss_scale["scale"] == 2.0 ** 16
    import h5py
    with h5py.File(checkpoint, "r+") as f:
        f["loss_scale"].attrs["scale"] = -1.0
    code, output = run("train", tiny_model, "--resume", checkpoint, "--out", tmp_path / "run")
    assert code != 0 and "loss_scale attribute" in output and "Traceback" not in output
