"""The paper's momentum update and the plateau schedule."""
import numpy as np
import pytest

from minidl.layers import Parameter
from minidl.optim import MomentumSGD, PlateauSchedule


def test_momentum_sgd_follows_the_paper_formula(dev):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((4, 3))
    grads = [rng.standard_normal((4, 3)) for _ in range(3)]
    lrs = [0.01, 0.01, 0.001]  # the paper's v keeps lr inside: a change of lr shows the difference
    p = Parameter(w0.copy(), device=dev)
    opt = MomentumSGD([p], lr=0.01, momentum=0.9, weight_decay=0.0005)
    w, v = w0.copy(), np.zeros_like(w0)
    for g, lr in zip(grads, lrs):
        opt.lr = lr
        p.grad = Parameter(g, device=dev)
        opt.step()
        v = 0.9 * v - 0.0005 * lr * w - lr * g
        w = w + v
        np.testing.assert_allclose(p.numpy(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_step_names_the_parameters_it_left_non_finite_once(dev, dtype):
    """Finite gradients times a rate that overflows the update in one parameter (the gradient of b
    is 1e12 times a's): the step names b, with its number, once; a finite step names none. A weight
    that overflows while its velocity does not (w + v) counts too."""
    big = np.finfo(dtype).max
    a, b = (Parameter(np.ones(5, dtype), device=dev) for _ in range(2))
    c = Parameter(np.full(5, big, dtype), device=dev)  # finite, until a velocity is added
    opt = MomentumSGD([a, b, c], lr=big / 1e5, momentum=0.0, weight_decay=0.0)
    assert opt.nonfinite() == []  # before any step: nothing to read
    a.grad = Parameter(np.full(5, -1e-6, dtype), device=dev)
    b.grad = Parameter(np.full(5, -1e6, dtype), device=dev)
    c.grad = Parameter(np.zeros(5, dtype), device=dev)
    opt.step()
    assert np.isfinite(a.numpy()).all() and not np.isfinite(b.numpy()).all()
    found = opt.nonfinite()
    assert len(found) == 1 and found[0][0] is b and found[0][1] == 1
    assert opt.nonfinite() == []  # read once
    # c's velocity, big / 1e5, is finite; its weight, big + that, is not
    a.grad, b.grad, c.grad = None, None, Parameter(np.full(5, -1.0, dtype), device=dev)
    opt.step()
    found = opt.nonfinite()
    assert len(found) == 1 and found[0][0] is c and found[0][1] == 2 and np.isfinite(opt.state()[2]).all()
    opt.lr = 1e-3
    a.grad, c.grad = Parameter(np.ones(5, dtype), device=dev), None  # c, now infinite, left alone
    opt.step()
    assert opt.nonfinite() == []


def test_the_steps_unread_keep_the_first_step_that_overflowed_each_parameter(dev):
    big = np.finfo(np.float32).max
    a, b = Parameter(np.ones(3, np.float32), device=dev), Parameter(np.ones(3, np.float32), device=dev)
    opt = MomentumSGD([a, b], lr=big / 1e5, momentum=0.0, weight_decay=0.0)
    for grads in ((-1e-6, -1e-6), (-1e-6, -1e6), (-1e6, -1e6)):  # b overflows at step 2, a at step 3
        a.grad, b.grad = (Parameter(np.full(3, g, np.float32), device=dev) for g in grads)
        opt.step()
    found = opt.nonfinite()
    assert [(p is b, n) for p, n in found] == [(True, 2), (False, 3)]


@pytest.mark.parametrize("bad", [None, np.nan, np.inf])
def test_a_halt_that_is_not_finite_leaves_every_parameter_alone(dev, bad):
    """The step's verdict stays on the device: the gradients' share from nonfinite_gradients, the
    halt that skips the update there, counted as a step all the same."""
    a = Parameter(np.ones(4), device=dev)
    opt = MomentumSGD([a], lr=0.1, momentum=0.9, weight_decay=0.0)
    g = np.ones(4)
    if bad is not None:
        g[2] = bad
    a.grad = Parameter(g, device=dev)
    marks = opt.nonfinite_gradients()
    assert list(marks) == [a.device]
    mark = marks[a.device]
    with a.device:  # read on its stream
        host = mark.get() if a.device.is_cuda else mark
    assert host.shape == (1,) and (np.isnan(host[0]) if bad is not None else host[0] == 0)
    opt.step(halt=marks)
    assert opt.steps == 1
    if bad is None:
        np.testing.assert_allclose(a.numpy(), 1 - 0.1 * g)
    else:
        assert np.array_equal(a.numpy(), np.ones(4)) and np.array_equal(opt.state()[0], np.zeros(4))
    assert opt.nonfinite() == []


def test_momentum_sgd_differs_from_pytorch_style_after_lr_change():
    p = Parameter(np.ones(1))
    opt = MomentumSGD([p], lr=0.1, momentum=0.9, weight_decay=0.0)
    for lr in (0.1, 0.01):
        opt.lr = lr
        p.grad = Parameter(np.ones(1))
        opt.step()
    # paper: v1 = -0.1, v2 = 0.9*-0.1 - 0.01 = -0.1 -> w = 0.8
    # PyTorch: buf2 = 0.9 + 1 = 1.9, w = 1 - 0.1 - 0.01*1.9 = 0.881
    np.testing.assert_allclose(p.data, [0.8])


def test_parameters_without_gradient_are_left_alone():
    a, b = Parameter(np.ones(2)), Parameter(np.ones(2))
    opt = MomentumSGD([a, b])
    a.grad = Parameter(np.ones(2))
    opt.step()
    assert np.array_equal(b.data, np.ones(2)) and opt.state()[1] is None


def test_optimizer_state_round_trip():
    p = Parameter(np.arange(3.0))
    opt = MomentumSGD([p])
    p.grad = Parameter(np.ones(3))
    opt.step()
    other = MomentumSGD([Parameter(np.arange(3.0))])
    other.load_state(opt.state())
    np.testing.assert_array_equal(other.state()[0], opt.state()[0])


def test_plateau_schedule_drops_three_times_then_finishes():
    s = PlateauSchedule(0.01, factor=10, patience=2, max_drops=3)
    lrs = [s.step(e) for e in [0.9, 0.8, 0.8, 0.85]]  # best 0.8; two epochs without improvement
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.001])
    assert s.step(0.7) == pytest.approx(0.001) and s.drops == 1
    for _ in range(4):
        s.step(0.7)
    assert s.drops == 3 and not s.finished and s.lr == pytest.approx(1e-5)
    s.step(0.7)
    s.step(0.7)
    assert s.finished and s.drops == 3


def test_plateau_schedule_state_round_trip():
    s = PlateauSchedule(0.01, patience=1)
    s.step(0.5)
    s.step(0.6)
    t = PlateauSchedule(1.0)
    t.load_state(s.state())
    assert t.state() == s.state()
