"""functions.concat_to: tensors from several devices joined on one, AlexNet's crossings between its towers.

On the CPU its gradient is checked in float64. On emulated GPUs (`pytest --emulate-gpus 2`) its forward and backward
equal the CPU's exactly, each input's slice costs one operation each way (a pitched copy from or to the other GPU),
and no stream hazard occurs (conftest fails a test on one). The emulator's cupy.cuda.runtime.memcpy2DAsync, which
those copies call, refuses what CUDA refuses and what a GPU would get wrong.
"""
import os

import numpy as np
import pytest

import minidl
from minidl import Tensor
from minidl.errors import MinidlError
from minidl.functions import concat_to, exchange
from minidl.gradcheck import gradcheck

EMULATED = bool(os.environ.get("MINIDL_EMULATE_GPUS"))
emulated_only = pytest.mark.skipif(not EMULATED, reason="reads the GPU emulator's ledger or calls its runtime: "
                                                        "run with --emulate-gpus 2")
# the inputs' shapes: (N, C_i, H, W), joined along axis 1 as AlexNet's maps are
SHAPES = [(2, 3, 4, 5), (2, 2, 4, 5)]
PLACES = {"two-gpus": ("cuda:0", "cuda:1"), "one-gpu": ("cuda:0", "cuda:0")}


def _values(rng, shapes=SHAPES):
    return [rng.standard_normal(shape) for shape in shapes]


@pytest.mark.parametrize("axis, shapes", [(1, SHAPES), (0, [(2, 3), (4, 3)]), (-1, [(2, 3, 1), (2, 3, 4)]),
                                          (2, [(2, 3, 1, 2), (2, 3, 3, 2), (2, 3, 2, 2)])])
def test_gradient_on_the_cpu(rng, axis, shapes):
    xs = [Tensor(v, requires_grad=True) for v in _values(rng, shapes)]
    assert gradcheck(lambda *ts: concat_to(ts, "cpu", axis), *xs)


def test_gradient_on_the_cpu_of_inputs_used_twice(rng):
    # each input has two uses: its gradients are views that autograd adds
    a, b = (Tensor(v, requires_grad=True) for v in _values(rng, [(2, 3, 4), (2, 3, 4)]))
    assert gradcheck(lambda a, b: concat_to([a, b], "cpu") * concat_to([b, a], "cpu"), a, b)


@pytest.mark.parametrize("xs, axis, match", [
    ([np.zeros((2, 3)), np.zeros((3, 3))], 1, r"shapes \(2, 3\) and \(3, 3\) differ outside axis 1"),
    ([np.zeros((2, 3)), np.zeros((2, 3, 1))], 1, r"shapes \(2, 3\) and \(2, 3, 1\) differ outside axis 1"),
    ([np.zeros((2, 3)), np.zeros((2, 3), np.float32)], 1, "inputs of float64 and float32"),
    ([np.zeros((2, 3))], 2, "axis 2 is out of range for inputs of 2 dimensions"),
    ([], 1, "needs at least one tensor"),
])
def test_bad_input_is_a_one_line_error(xs, axis, match):
    with pytest.raises(MinidlError, match=match) as error:
        concat_to([Tensor(x) for x in xs], "cpu", axis)
    assert "\n" not in str(error.value)


def _crossings(values, places, gradients):
    """AlexNet's pattern: values[i] on places[i] joined on every device named once; each joined output then takes
    its gradient. (joined outputs as NumPy, the inputs' gradients as NumPy)"""
    xs = [Tensor(v, device=p, requires_grad=True) for v, p in zip(values, places)]
    joined = {d: concat_to(xs, d, axis=1) for d in dict.fromkeys(places)}
    for d, y in joined.items():
        y.backward(Tensor(gradients[d], device=d))
    return {d: y.numpy() for d, y in joined.items()}, [x.grad.numpy() for x in xs]


@pytest.mark.gpu
@pytest.mark.parametrize("peer", [True, False], ids=["peer-access", "no-peer-access"])
@pytest.mark.parametrize("places", list(PLACES.values()), ids=list(PLACES))
def test_equals_the_cpu_exactly(rng, places, peer, request):
    if not peer and EMULATED:
        request.getfixturevalue("no_peer_access")
    values = _values(rng)
    grads = {d: rng.standard_normal((2, 5, 4, 5)) for d in places}
    joined, input_grads = _crossings(values, places, grads)
    on_cpu_grads = []
    for d, y in joined.items():  # the CPU has one device: one crossing at a time, the inputs' gradients summed
        on_cpu, on_cpu_grads_d = _crossings(values, ("cpu", "cpu"), {"cpu": grads[d]})
        np.testing.assert_array_equal(y, on_cpu["cpu"])
        on_cpu_grads = [g + h for g, h in zip(on_cpu_grads, on_cpu_grads_d)] if on_cpu_grads else on_cpu_grads_d
    for got, want in zip(input_grads, on_cpu_grads):
        np.testing.assert_array_equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dst", ["cuda:0", "cpu"])
def test_three_inputs_from_two_gpus_and_the_cpu_equal_the_cpu(rng, dst):
    values = _values(rng, [(2, 3, 2), (2, 1, 2), (2, 2, 2)])
    xs = [Tensor(v, device=p, requires_grad=True) for v, p in zip(values, ("cuda:1", "cpu", "cuda:0"))]
    y = concat_to(xs, dst, axis=1)
    np.testing.assert_array_equal(y.numpy(), np.concatenate(values, axis=1))
    g = rng.standard_normal(y.shape)
    y.backward(Tensor(g, device=dst))
    for x, want in zip(xs, np.split(g, [3, 4], axis=1)):
        np.testing.assert_array_equal(x.grad.numpy(), want)


def _ops(entries):
    return [(e.kind, e.unit, e.device, e.nbytes) for e in entries if e.kind != "sync"]


@pytest.mark.gpu
@emulated_only
def test_one_operation_per_slice_each_way_on_two_gpus_without_peer_access(rng, charged, no_peer_access):
    a, b = (Tensor(v, device=p, requires_grad=True) for v, p in zip(_values(rng), ("cuda:0", "cuda:1")))
    g = Tensor(rng.standard_normal((2, 5, 4, 5)), device="cuda:0")
    start = len(charged())
    y = concat_to([a, b], "cuda:0")
    forward = _ops(charged()[start:])
    # a's slice: one copy kernel on GPU 0; b's: one pitched copy from GPU 1 (charged read + written)
    assert forward == [("elementwise", "", 0, 2 * a.data.nbytes), ("copy", "peer", 0, 2 * b.data.nbytes)]
    start = len(charged())
    y.backward(g)
    # a has one use: its slice, not contiguous, is copied for its consumer; b's goes back by one pitched copy
    assert _ops(charged()[start:]) == [("copy", "d2d", 0, 2 * a.data.nbytes), ("copy", "peer", 1, 2 * b.data.nbytes)]


@pytest.mark.gpu
@emulated_only
def test_a_gradient_that_autograd_adds_is_a_view(rng, charged, no_peer_access):
    a, b = (Tensor(v, device=p, requires_grad=True) for v, p in zip(_values(rng), ("cuda:0", "cuda:1")))
    ys = [concat_to([a, b], d) for d in ("cuda:0", "cuda:1")]  # a and b have two uses each
    start = len(charged())
    ys[0].backward(Tensor(np.ones(ys[0].shape), device="cuda:0"))
    assert _ops(charged()[start:])[-1:] == [("copy", "peer", 1, 2 * b.data.nbytes)]  # and nothing for a's view
    assert len(_ops(charged()[start:])) == 2  # the gradient's upload, and b's copy


@pytest.mark.gpu
@emulated_only
def test_on_one_device_one_concatenate(rng, charged):
    a, b = (Tensor(v, device="cuda:0", requires_grad=True) for v in _values(rng))
    start = len(charged())
    y = concat_to([a, b], "cuda:0")
    assert [(e.kind, e.name) for e in charged()[start:]] == [("elementwise", "concatenate")]
    start = len(charged())
    y.backward(Tensor(np.ones(y.shape), device="cuda:0"))
    assert [e.unit for e in charged()[start:] if e.kind == "copy"] == ["h2d", "d2d", "d2d"]  # as Concat's split


@pytest.mark.gpu
@emulated_only
def test_two_logical_devices_on_one_gpu_join_in_one_kernel(rng, charged):
    minidl.set_device_map({"cuda:1": 0})
    try:
        a, b = (Tensor(v, device=p, requires_grad=True) for v, p in zip(_values(rng), ("cuda:0", "cuda:1")))
        start = len(charged())
        y = concat_to([a, b], "cuda:0")
        assert _ops(charged()[start:]) == [("kernel", "", 0, 2 * (a.data.nbytes + b.data.nbytes))]
        np.testing.assert_array_equal(y.numpy(), np.concatenate([a.numpy(), b.numpy()], axis=1))
    finally:
        minidl.set_device_map(None)


# --- exchange: the two towers' maps joined on both GPUs, across NVLink where the GPUs reach each other


def _exchanged(values, places, gradients):
    """exchange() of values[i] on places[i], each joined output then taking its gradient (None: unused).
    (joined outputs as NumPy, the inputs' gradients as NumPy)"""
    xs = [Tensor(v, device=p, requires_grad=True) for v, p in zip(values, places)]
    joined = exchange(xs, axis=1)
    used = [(y * Tensor(g, device=y.device)).sum() for y, g in zip(joined, gradients) if g is not None]
    loss = used[0] if len(used) == 1 else used[0] + used[1].to(used[0].device)
    loss.backward()  # each joined output's gradient: its given one
    return [y.numpy() for y in joined], [x.grad.numpy() for x in xs]


@pytest.mark.gpu
@pytest.mark.parametrize("peer", [True, False], ids=["peer-access", "no-peer-access"])
@pytest.mark.parametrize("unused", [None, 0, 1])
def test_exchange_equals_the_cpu(rng, peer, unused, request):
    if not peer and EMULATED:
        request.getfixturevalue("no_peer_access")
    values = _values(rng)
    grads = [None if i == unused else rng.standard_normal((2, 5, 4, 5)) for i in range(2)]
    joined, input_grads = _exchanged(values, ("cuda:0", "cuda:1"), grads)
    want = np.concatenate(values, axis=1)
    assert all(np.array_equal(y, want) for y in joined)
    total = sum(g for g in grads if g is not None)
    for got, part in zip(input_grads, np.split(total, [3], axis=1)):
        np.testing.assert_allclose(got, part, rtol=1e-15, atol=0)  # one sum each: exact but for its rounding


@pytest.mark.gpu
@emulated_only
def test_exchange_is_one_kernel_a_gpu_each_way_reading_across_the_link(rng, charged, fresh_peer_access):
    a, b = (Tensor(v, device=p, requires_grad=True) for v, p in zip(_values(rng), ("cuda:0", "cuda:1")))
    start = len(charged())
    ys = exchange([a, b], axis=1)
    forward = [e for e in charged()[start:] if e.kind != "sync"]
    assert [(e.name, e.device) for e in forward] == [("kernel join_rows<double>", 0), ("kernel join_rows<double>", 1)]
    assert [e.peer_nbytes for e in forward] == [b.data.nbytes, a.data.nbytes]  # the other's part, across NVLink
    gs = [Tensor(np.ones(y.shape), device=y.device) for y in ys]
    start = len(charged())
    ((ys[0] * gs[0]).sum() + (ys[1] * gs[1]).sum().to("cuda:0")).backward()
    names = [(e.name, e.device) for e in charged()[start:] if "add_row_parts" in e.name]
    assert sorted(names) == [("kernel add_row_parts<double>", 0), ("kernel add_row_parts<double>", 1)]
    np.testing.assert_array_equal(a.grad.numpy(), 2 * np.ones(a.shape))


@pytest.mark.gpu
@emulated_only
def test_a_kernel_reads_another_gpu_only_once_peer_access_is_enabled(fresh_peer_access):
    from minidl.device import cupy
    cp = cupy()
    with cp.cuda.Device(1):
        there = cp.ones(3)
    cp.cuda.Device(1).synchronize()  # made before GPU 0's stream reads it
    with cp.cuda.Device(0):
        with pytest.raises(ValueError, match=r"resides \(1\) is different from the current device \(0\)"):
            there + 1
        assert cp.cuda.runtime.deviceCanAccessPeer(0, 1) == 1
        cp.cuda.runtime.deviceEnablePeerAccess(1)
        assert (there + 1).get().tolist() == [2, 2, 2]
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError) as error:
            cp.cuda.runtime.deviceEnablePeerAccess(1)
        assert error.value.status == cp.cuda.runtime.errorPeerAccessAlreadyEnabled


# --- the emulated cudaMemcpy2DAsync

@pytest.fixture
def cp():
    from minidl.device import cupy
    return cupy()


def _arrays(cp):
    with cp.cuda.Device(0):
        dst = cp.zeros((3, 8), dtype=np.float32)
    with cp.cuda.Device(1):
        src = cp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    cp.cuda.Device(1).synchronize()  # the upload is done before GPU 0's stream reads it
    return dst, src


@emulated_only
def test_memcpy2d_copies_rows_into_a_slice_as_one_peer_copy(cp, charged):
    dst, src = _arrays(cp)
    start = len(charged())
    with cp.cuda.Device(0):
        # src's rows (16 bytes) into columns 2..5 of dst's rows (32 bytes apart)
        cp.cuda.runtime.memcpy2DAsync(dst.data.ptr + 8, 32, src.data.ptr, 16, 16, 3, cp.cuda.runtime.memcpyDefault, 0)
        expected = np.zeros((3, 8), np.float32)
        expected[:, 2:6] = np.arange(12).reshape(3, 4)
        np.testing.assert_array_equal(dst.get(), expected)
    assert _ops(charged()[start:])[0] == ("copy", "peer", 0, 2 * 16 * 3)


@emulated_only
@pytest.mark.parametrize("call, error, match", [
    (lambda d, s: (d + 8, 32, s, 16, 20, 3, 4), "CUDARuntimeError", r"cudaErrorInvalidPitchValue: rows of 20 bytes"),
    (lambda d, s: (d, 12, s, 16, 16, 3, 4), "CUDARuntimeError", r"cudaErrorInvalidPitchValue: rows of 16 bytes"),
    (lambda d, s: (d + 24, 32, s, 16, 16, 3, 4), "ValueError", r"dst is address .* run past the end"),
    (lambda d, s: (d, 16, s, 16, 16, 4, 4), "ValueError", r"src is address .* run past the end"),
    (lambda d, s: (d, 32, s, 16, 16, 3, 9), "CUDARuntimeError", r"cudaErrorInvalidMemcpyDirection: kind 9"),
    (lambda d, s: (d, 32, s, 16, 16, 3, 1), "NotImplementedError", r"between device arrays only"),
    (lambda d, s: (d + 4, 32, d, 32, 16, 3, 4), "ValueError", r"overlap"),
])
def test_memcpy2d_refuses(cp, call, error, match):
    dst, src = _arrays(cp)
    errors = dict(CUDARuntimeError=cp.cuda.runtime.CUDARuntimeError, ValueError=ValueError,
                  NotImplementedError=NotImplementedError)
    with cp.cuda.Device(0), pytest.raises(errors[error], match=match):
        cp.cuda.runtime.memcpy2DAsync(*call(dst.data.ptr, src.data.ptr), 0)


@emulated_only
def test_memcpy2d_refuses_host_memory(cp):
    dst, _ = _arrays(cp)
    host = np.zeros(12, np.float32)
    with cp.cuda.Device(0), pytest.raises(ValueError, match="src is address .* in no live array"):
        cp.cuda.runtime.memcpy2DAsync(dst.data.ptr, 32, host.ctypes.data, 16, 16, 3, 4, 0)


@pytest.fixture
def hazards():
    """The stream hazards a test provokes on purpose (its arrays' frees too), taken so that conftest's check
    does not fail it."""
    import gc

    from minidl_emulator import streams
    yield
    gc.collect()
    streams.take_hazards()


@emulated_only
def test_memcpy2d_is_checked_against_the_stream_order(cp, hazards):
    from minidl_emulator.streams import StreamHazard
    dst, src = _arrays(cp)
    with cp.cuda.Device(1):
        writer = cp.cuda.Stream(non_blocking=True)
        with writer:
            src *= 2  # written on GPU 1's stream, which GPU 0's copy does not wait for
    with cp.cuda.Device(0), pytest.raises(StreamHazard, match=r"a 2-D copy \(memcpy2DAsync\) .* reads"):
        cp.cuda.runtime.memcpy2DAsync(dst.data.ptr, 32, src.data.ptr, 16, 16, 3, 4, 0)


class _FakeCuda:
    """cupy.cuda for peer_access: GPUs 100 and 101 can reach each other; 101's access was enabled already."""

    class runtime:  # noqa: N801 -- CuPy's name
        errorPeerAccessAlreadyEnabled = 704
        enabled = []

        class CUDARuntimeError(RuntimeError):
            def __init__(self, status):
                super().__init__(status)
                self.status = status

        @staticmethod
        def deviceCanAccessPeer(gpu, peer):  # noqa: N802
            return 1

        @classmethod
        def deviceEnablePeerAccess(cls, peer):  # noqa: N802
            cls.enabled.append((_FakeCuda.current, peer))
            if _FakeCuda.current == 101:
                raise cls.CUDARuntimeError(cls.errorPeerAccessAlreadyEnabled)

    current = None

    class Device:
        def __init__(self, gpu):
            self.gpu = gpu

        def __enter__(self):
            _FakeCuda.current = self.gpu

        def __exit__(self, *exc):
            _FakeCuda.current = None


def test_peer_access_is_enabled_both_ways_once_per_pair():
    from minidl.functions.transfer import peer_access
    peer_access(_FakeCuda, 100, 101)
    peer_access(_FakeCuda, 101, 100)
    peer_access(_FakeCuda, 100, 100)
    assert _FakeCuda.runtime.enabled == [(100, 101), (101, 100)]  # 101's "enabled already" is no error


@emulated_only
def test_emulated_gpus_without_peer_access_refuse_it(cp, no_peer_access):
    assert cp.cuda.runtime.deviceCanAccessPeer(0, 1) == 0
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="cudaErrorPeerAccessUnsupported"):
        cp.cuda.runtime.deviceEnablePeerAccess(1)
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="cudaErrorInvalidDevice"):
        cp.cuda.runtime.deviceCanAccessPeer(0, 7)
