"""The fused GPU kernels (optim.cu, activation.cu, dropout.cu, loss.cu) against the unfused
NumPy paths they replace, on fresh random inputs without zeros or ties, in float32 and
float64; and, on emulated GPUs, the number of device operations each one saves."""
import contextlib
import os

import numpy as np
import pytest

import minidl
import minidl.functions as F
from minidl import MinidlError, Tensor
from minidl.functions.dropout import MaskGenerator
from minidl.gradcheck import gradcheck
from minidl.layers import Parameter
from minidl.optim import MomentumSGD

pytestmark = pytest.mark.gpu

GPU = "cuda:0"
DTYPES = [np.float32, np.float64]
# float32 on a real GPU may differ in the last bits (NVRTC contracts a*b+c into FMAs)
TOLERANCE = {np.float32: dict(rtol=1e-6, atol=1e-7), np.float64: dict(rtol=1e-13, atol=1e-15)}


def away_from_zero(rng, shape, dtype, low=0.1, high=2.0):
    return (rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)


def emulated():
    return bool(os.environ.get("MINIDL_EMULATE_GPUS"))


@contextlib.contextmanager
def operations(expected):
    """On emulated GPUs: the block enqueues exactly `expected` ({kind: count}) device operations."""
    if expected is None or not emulated():
        yield
        return
    from minidl_emulator.cuda import work
    before = dict(work)
    yield
    done = {k: work.get(k, 0) - before.get(k, 0) for k in work if k != "bytes"}
    assert {k: n for k, n in done.items() if n} == expected


# --- the momentum update: one kernel per device, over tables of pointers


@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_kernel_matches_the_numpy_update(rng, dtype):
    shapes = [(7, 5), (300,), (2, 3, 4, 5)]
    ws = [away_from_zero(rng, s, dtype) for s in shapes]
    steps = [[away_from_zero(rng, s, dtype) for s in shapes] for _ in range(3)]
    optimizers = {}
    for dev in ("cpu", GPU):
        params = [Parameter(w.copy(), device=dev) for w in ws]
        opt = MomentumSGD(params, lr=0.03, momentum=0.9, weight_decay=0.01)
        # lr changes: it is inside v
        for i, (step, lr) in enumerate(zip(steps, (0.03, 0.03, 0.007))):
            opt.lr = lr
            for p, g in zip(params, step):
                p.grad = Tensor(g, device=dev)
            # after the first step, which makes the velocities: the table's copy and one kernel
            with operations({"copy": 1, "kernel": 1} if dev == GPU and i else None):
                opt.step()
        optimizers[dev] = opt, params
    (cpu_opt, cpu_params), (gpu_opt, gpu_params) = optimizers["cpu"], optimizers[GPU]
    for p, q, v, u in zip(cpu_params, gpu_params, cpu_opt.state(), gpu_opt.state()):
        assert q.dtype == dtype and u.dtype == dtype
        np.testing.assert_allclose(q.numpy(), p.numpy(), **TOLERANCE[dtype])
        np.testing.assert_allclose(u, v, **TOLERANCE[dtype])


def test_momentum_update_is_one_launch_per_device_and_dtype(rng):
    """Parameters on two GPUs and in two dtypes, a transposed gradient and one without a
    gradient."""
    shapes = [((3, 4), np.float32), ((5,), np.float32), ((2, 2), np.float64), ((6,), np.float32),
              ((4, 3), np.float32)]
    hosts = [away_from_zero(rng, s, t) for s, t in shapes]
    devices = ["cuda:0", "cuda:0", "cuda:0", "cuda:1", "cuda:0"]
    # views: copied for the kernel
    grads = [away_from_zero(rng, w.shape[::-1], w.dtype).T for w in hosts]
    results = {}
    for placement in (["cpu"] * 5, devices):
        params = [Parameter(w.copy(), device=d) for w, d in zip(hosts, placement)]
        opt = MomentumSGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
        for _ in range(2):
            for p, g in zip(params[:-1], grads):  # the last has no gradient: left alone
                p.grad = Tensor(g, device=p.device)
            opt.step()
        results[placement[0]] = [p.numpy() for p in params]
    for cpu, gpu, w in zip(results["cpu"], results["cuda:0"], hosts):
        np.testing.assert_allclose(gpu, cpu, **TOLERANCE[w.dtype.type])
    np.testing.assert_array_equal(results["cuda:0"][-1], hosts[-1])
    if emulated():
        from minidl_emulator.cuda import work
        before = dict(work)
        opt.step()
        # cuda:0 float32, cuda:0 float64, cuda:1 float32: a table and a kernel each; and a copy of
        # each of the two 2-D gradients, views (transposed), which the kernel reads flat
        assert work["kernel"] - before["kernel"] == 3 and work["copy"] - before["copy"] == 3 + 2


def test_a_parameter_listed_twice_is_updated_twice_as_on_the_cpu(rng):
    w, g = away_from_zero(rng, (3, 5), np.float64), away_from_zero(rng, (3, 5), np.float64)
    results = []
    for dev in ("cpu", GPU):
        p = Parameter(w.copy(), device=dev)
        opt = MomentumSGD([p, p], lr=0.1)
        for _ in range(2):
            p.grad = Tensor(g, device=dev)
            opt.step()
        results.append(p.numpy())
    np.testing.assert_allclose(results[1], results[0], **TOLERANCE[np.float64])


@pytest.fixture
def table_kernel():
    """The momentum kernel of optim.cu for float32 on the current emulated GPU (the table's rows: w,
    g, v, ends, and each parameter's slot in the row of flags it sets where an update is not finite;
    then that row, a halt of 0, a gradient multiplier of 1 and the step's number)."""
    from minidl import kernels
    from minidl.device import cupy
    from minidl.optim import CU
    flags, halt = cupy().zeros(1, dtype=np.uint64), cupy().zeros(1, dtype=np.float32)
    one = cupy().ones(1, dtype=np.float32)
    return lambda *rows: kernels.launch(CU, "momentum_update", np.float32, 4, *rows, flags, halt, one, 1, 1, 4,
                                        0.5, 0.0, 1.0)


@pytest.mark.skipif(not emulated(), reason="checks the GPU emulator: run with --emulate-gpus 2")
def test_several_tables_go_up_in_one_copy_each_a_view_of_its_own_shape(charged):
    """kernels.upload_tables: one host-to-device copy for all, each table a view of its own rows and width (no
    padding: a kernel's table names only its own arrays, which the ledger charges)."""
    from minidl import kernels
    from minidl.device import cupy
    with minidl.device("cuda:0"):
        arrays = [cupy().ones(n, dtype=np.float32) for n in (3, 5, 7)]
        tables = [kernels.address_rows([arrays, [3, 8, 15]]), kernels.address_rows([arrays[:1], [3]])]
        start = len(charged())
        uploaded = kernels.upload_tables(tables)
        assert [e.unit for e in charged()[start:]] == ["h2d"]
        assert [t.shape for t in uploaded] == [(2, 3), (2, 1)] and all(t[0].flags.c_contiguous for t in uploaded)
        for host, device in zip(tables, uploaded):
            np.testing.assert_array_equal(device.get(), host)


@pytest.mark.skipif(not emulated(), reason="checks the GPU emulator: run with --emulate-gpus 2")
def test_the_emulator_follows_a_table_to_its_arrays(table_kernel, fresh_peer_access):
    """A table's arrays are checked as the kernel's own arguments: written on another stream
    without an event, a hazard; freed, or on another GPU, refused."""
    from minidl import kernels
    from minidl.device import cupy
    from minidl_emulator import streams
    from minidl_emulator.streams import StreamHazard
    cp = cupy()
    other = cp.cuda.Stream(non_blocking=True)
    w, v = cp.ones(4, dtype=cp.float32), cp.zeros(4, dtype=cp.float32)
    with other:
        g = cp.full(4, 2.0, dtype=cp.float32)  # written on another stream
    table = kernels.address_table([[w], [g], [v], [4], [0]])
    with pytest.raises(StreamHazard,
                       match=r"kernel momentum_update<float> on .* reads .* written by"):
        table_kernel(table[0], table[1], table[2], table[3], table[4])
    streams.take_hazards()
    cp.cuda.get_current_stream().wait_event(other.record())
    table_kernel(table[0], table[1], table[2], table[3], table[4])
    np.testing.assert_array_equal(w.get(), 1 - 2)  # v = 0.5 * 0 - 1 * 2; w += v
    address = g.data.ptr
    del g
    stale = kernels.address_table([[w], [address], [v], [4], [0]])
    with pytest.raises(ValueError,
                       match=r"argument 1: the table holds address 0x[0-9a-f]+, "
                             r"which is in no live"):
        table_kernel(stale[0], stale[1], stale[2], stale[3], stale[4])
    with cp.cuda.Device(1):
        foreign = cp.ones(4, dtype=cp.float32)
    with pytest.raises(ValueError,
                       match=r"resides \(1\) is different from the current device \(0\)"):
        table = kernels.address_table([[w], [foreign], [v], [4], [0]])
        table_kernel(table[0], table[1], table[2], table[3], table[4])


# --- ReLU: forward into a C-contiguous array, backward one kernel


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_matches_numpy_and_its_backward_is_one_kernel(rng, dtype):
    x_host = away_from_zero(rng, (3, 4, 5, 6), dtype)
    gy_host = away_from_zero(rng, x_host.shape, dtype)
    x = Tensor(x_host, requires_grad=True, device=GPU)
    y = F.relu(x)
    np.testing.assert_array_equal(y.numpy(), np.maximum(x_host, 0))
    gy = Tensor(gy_host, device=GPU)
    with operations({"kernel": 1}):
        y.backward(gy)
    np.testing.assert_array_equal(x.grad.numpy(), gy_host * (x_host > 0))


def test_relu_of_a_transposed_view_is_c_contiguous(rng):
    """A convolution's output is a transposed view: ReLU's y is a plain array, so what reads it
    copies nothing."""
    x_host = away_from_zero(rng, (4, 3, 5, 5), np.float32)
    leaf = Tensor(x_host, requires_grad=True, device=GPU)
    x = leaf.transpose(1, 0, 2, 3)
    assert not x.data.flags.c_contiguous
    with operations({"elementwise": 1}):
        y = F.relu(x)
    assert y.data.flags.c_contiguous
    np.testing.assert_array_equal(y.numpy(), np.maximum(x_host.transpose(1, 0, 2, 3), 0))
    gy_host = away_from_zero(rng, y.shape, np.float32)
    y.backward(Tensor(gy_host, device=GPU))
    np.testing.assert_array_equal(leaf.grad.numpy(),
                                  (gy_host * (y.numpy() > 0)).transpose(1, 0, 2, 3))


# --- dropout: the mask made and applied in one kernel, forward and backward


def splitmix64_uniforms(key, start, size):
    """dropout.cu's uniforms written out in NumPy: splitmix64 at key + (i+1) * gamma for the global
    indices i = start, ..., start + size - 1, the top 24 bits."""
    i = np.arange(start, start + size, dtype=np.uint64)
    z = np.uint64(key) + (i + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_kernel_draws_the_numpy_paths_masks(rng, dtype, p):
    """Fresh seeds, shapes and first rows: the kernel's y and gx are the CPU path's bit for bit, in
    one launch each way, and both masks are splitmix64 of (key, global index), the mask of
    dropout.cu's comment."""
    for _ in range(3):
        shape = tuple(int(n) for n in rng.integers(1, 30, int(rng.integers(2, 5))))
        seed = [int(n) for n in rng.integers(0, 2 ** 62, 2)]
        first_row = int(rng.integers(0, 10 ** 6))
        x_host = away_from_zero(rng, shape, dtype)
        gy_host = away_from_zero(rng, shape, dtype)
        xs = {dev: Tensor(x_host, requires_grad=True, device=dev) for dev in ("cpu", GPU)}
        ys = {}
        for dev, x in xs.items():
            with operations({"kernel": 1} if dev == GPU else None):  # the key is drawn on the host
                ys[dev] = F.dropout(x, p, generator=MaskGenerator(seed, first_row))
        assert ys[GPU].creator.key == ys["cpu"].creator.key
        np.testing.assert_array_equal(ys[GPU].numpy(), ys["cpu"].numpy())
        u = splitmix64_uniforms(ys["cpu"].creator.key, first_row * int(np.prod(shape[1:])),
                                x_host.size)
        mask = (u.reshape(shape) >= np.float32(p)).astype(dtype) * dtype(1.0 / (1.0 - p))
        np.testing.assert_array_equal(ys["cpu"].numpy(), x_host * mask)
        for dev, y in ys.items():
            gy = Tensor(gy_host, device=dev)
            with operations({"kernel": 1} if dev == GPU else None):
                y.backward(gy)
        np.testing.assert_array_equal(xs[GPU].grad.numpy(), xs["cpu"].grad.numpy())
        np.testing.assert_array_equal(xs["cpu"].grad.numpy(), gy_host * mask)


def test_dropout_masks_keep_about_one_minus_p_and_differ_between_calls():
    x = Tensor(np.ones((200, 500), np.float32), device=GPU)
    generator = MaskGenerator(1)
    first, second = (F.dropout(x, 0.3, generator=generator).numpy() for _ in range(2))
    assert set(np.unique(first)) == {0.0, np.float32(1 / 0.7)}
    for y in (first, second):
        assert abs((y > 0).mean() - 0.7) < 0.01
    # independent masks: both keep about 0.7 * 0.7 of the elements
    assert abs(((first > 0) & (second > 0)).mean() - 0.49) < 0.01
    # neighbouring elements are not correlated (the hash of consecutive indices)
    kept = (first > 0).reshape(-1).astype(float)
    assert abs(np.corrcoef(kept[:-1], kept[1:])[0, 1]) < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.5, 0.3])
def test_a_fully_connected_layers_relu_and_dropout_in_its_pass_are_the_three_layers(rng, dtype, p, exact_fp32):
    """linear(..., activation="relu", dropout=p) against linear + ReLU + dropout under the same key, on the
    CPU and the GPU, forward and backward, bit for bit (the bias's gradient: within rounding across devices);
    on the GPU one kernel each way after the GEMMs where the three take three (the backward's ReLU mask needs
    no hash: y > 0 exactly where kept and positive)."""
    for _ in range(2):
        rows, features, outputs = (int(n) for n in rng.integers(2, 40, 3))
        seed, first_row = [int(n) for n in rng.integers(0, 2 ** 62, 2)], int(rng.integers(0, 10 ** 6))
        x_host = away_from_zero(rng, (rows, features), dtype)
        W_host = away_from_zero(rng, (outputs, features), dtype)
        b_host = away_from_zero(rng, (outputs,), dtype)
        gy_host = away_from_zero(rng, (rows, outputs), dtype)
        grads = {}
        for dev in ("cpu", GPU):
            for fused in (True, False):
                x, W, b = (Tensor(a, requires_grad=True, device=dev) for a in (x_host, W_host, b_host))
                generator = MaskGenerator(seed, first_row)
                if fused:
                    y = F.linear(x, W, b, activation="relu", dropout=p, generator=generator)
                else:
                    y = F.dropout(F.linear(x, W, b, activation="relu"), p, generator=generator)
                y.backward(Tensor(gy_host, device=dev))
                grads[dev, fused] = [y.numpy()] + [t.grad.numpy() for t in (x, W, b)]
        for key, got in grads.items():
            for a, b in zip(got, grads[key[0], False]):  # on each device, fused and apart: the same bits
                np.testing.assert_array_equal(a, b, err_msg=str(key))
            for a, b in zip(got[:3], grads["cpu", False]):  # and the same bits on both, but for the bias
                np.testing.assert_array_equal(a, b, err_msg=str(key))
            # whose gradient a GPU sums in ReLU's backward, a few rows per thread, then those sums (NumPy: row
            # after row): within the float sum's rounding of the CPU's
            np.testing.assert_allclose(got[3], grads["cpu", False][3], **TOLERANCE[dtype], err_msg=str(key))
        assert (grads["cpu", True][0] == 0).mean() > 0.1  # some elements dropped, some kept
        assert (grads["cpu", True][0] > 0).mean() > 0.1


def test_fused_dropout_costs_one_kernel_each_way_after_the_gemms(rng):
    x = Tensor(away_from_zero(rng, (8, 6), np.float32), requires_grad=True, device=GPU)
    W = Tensor(away_from_zero(rng, (5, 6), np.float32), requires_grad=True, device=GPU)
    b = Tensor(away_from_zero(rng, (5,), np.float32), requires_grad=True, device=GPU)
    with operations({"gemm": 1, "kernel": 1}):
        y = F.linear(x, W, b, activation="relu", dropout=0.5, generator=MaskGenerator(3))
    gy = Tensor(away_from_zero(rng, (8, 5), np.float32), device=GPU)
    with operations({"kernel": 1, "gemm": 2}):  # ReLU and dropout's backward with db, then dx and dW
        y.backward(gy)


def test_linear_dropout_in_its_pass_passes_the_gradient_check(rng, exact_fp32):
    """float64, on the CPU and the GPU: the same masks on every evaluation (the generator reseeded)."""
    x_host, W_host, b_host = (away_from_zero(rng, s, np.float64) for s in ((4, 5), (3, 5), (3,)))
    for dev in ("cpu", GPU):
        generator = MaskGenerator(11)

        def fn(x, W, b):
            generator.seed(11)
            return F.linear(x, W, b, activation="relu", dropout=0.4, generator=generator)

        assert gradcheck(fn, *(Tensor(a, requires_grad=True, device=dev) for a in (x_host, W_host, b_host)))


def test_linear_dropout_needs_relu_and_a_bias_and_a_probability_below_one():
    from minidl.layers import Linear
    with pytest.raises(MinidlError, match="needs a bias and activation='relu'"):
        Linear(4, 3, dropout=0.5)
    with pytest.raises(MinidlError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        F.linear(Tensor(np.ones((2, 4))), Tensor(np.ones((3, 4))), Tensor(np.ones(3)), activation="relu",
                 dropout=1.0)
    layer = Linear(4, 3, activation="relu", dropout=0.5)
    x = Tensor(np.ones((2, 4), np.float32))
    assert np.array_equal(layer.eval()(x).numpy(),
                          F.linear(x, layer.W, layer.b, activation="relu").numpy())  # eval(): no dropout
    assert "Dropout(0.5)" in layer.describe()


# --- softmax cross-entropy: a kernel each way


def numpy_loss_and_gradient(logits, labels):
    """The CPU path written out: log softmax, the mean of -log p[label], and (softmax - onehot) /
    n."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    grad = np.exp(log_p)
    grad[np.arange(n), labels] -= 1
    return -log_p[np.arange(n), labels].mean(), grad / n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("labels_on", ["host", "device", "device, checked"])
def test_softmax_cross_entropy_kernels_match_numpy(rng, dtype, labels_on):
    n, classes = 9, 37
    logits_host = (rng.standard_normal((n, classes)) * 5).astype(dtype)
    labels = rng.integers(0, classes, n)
    logits = Tensor(logits_host, requires_grad=True, device=GPU)
    host = labels_on == "host"
    if not host:
        labels = Tensor(labels, device=GPU)
    # host labels: checked on the host, copied as int32; device labels: int32 made there, and
    # unless vouched for, min and max read back; then the kernel and the mean of its rows
    expected = {"copy": 1, "kernel": 1, "reduction": 1} if host else (
        {"elementwise": 1, "kernel": 1, "reduction": 1} if "checked" in labels_on else
        {"copy": 2, "reduction": 3, "elementwise": 1, "kernel": 1})
    with operations(expected):
        loss = F.softmax_cross_entropy(logits, labels, checked="checked" in labels_on)
    with operations({"elementwise": 1, "kernel": 1}):  # the gradient 1 of the loss, and the kernel
        loss.backward()
    value, grad = numpy_loss_and_gradient(logits_host, labels if host else labels.numpy())
    assert loss.dtype == dtype
    np.testing.assert_allclose(loss.item(), value, rtol=10 * TOLERANCE[dtype]["rtol"])
    np.testing.assert_allclose(logits.grad.numpy(), grad, **TOLERANCE[dtype])


def test_device_labels_out_of_range_are_refused_on_the_gpu_or_give_nan_where_vouched_for():
    logits = Tensor(np.ones((3, 3), np.float32), device=GPU)
    bad = Tensor(np.array([0, 3, -1]), device=GPU)
    with pytest.raises(MinidlError, match=r"a label is outside 0\.\.2: labels range -1\.\.3"):
        F.softmax_cross_entropy(logits, bad)
    # the caller's word taken: no read back, and the kernel reads nothing outside a row
    assert np.isnan(F.softmax_cross_entropy(logits, bad, checked=True).item())
    # host labels are checked on the host whatever the caller says: it costs no wait
    with pytest.raises(MinidlError, match=r"a label is outside 0\.\.2"):
        F.softmax_cross_entropy(logits, np.array([0, 3, 1]), checked=True)


def test_a_training_step_of_a_small_net_matches_the_cpu(rng):
    """ReLU, the loss and the update together, GPU against CPU, in float64."""
    x_host = away_from_zero(rng, (5, 12), np.float64)
    labels = rng.integers(0, 4, 5)
    W1, W2 = away_from_zero(rng, (12, 8), np.float64), away_from_zero(rng, (8, 4), np.float64)
    results = {}
    for dev in ("cpu", GPU):
        w1, w2 = Parameter(W1.copy(), device=dev), Parameter(W2.copy(), device=dev)
        opt = MomentumSGD([w1, w2], lr=0.1)
        x = Tensor(x_host, device=dev)
        loss = F.softmax_cross_entropy(F.relu(x @ w1) @ w2, labels)
        loss.backward()
        opt.step()
        results[dev] = loss.item(), w1.numpy(), w2.numpy()
    for cpu, gpu in zip(results["cpu"], results[GPU]):
        np.testing.assert_allclose(gpu, cpu, rtol=1e-12, atol=1e-14)
