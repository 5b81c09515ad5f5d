"""The emulated GPUs catch what real GPUs hide: each rule shown catching its bug.

These run only on emulated GPUs (`pytest --emulate-gpus 2`); the known defects the
emulator found in minidl have their tests here too, each failing before its fix.
"""
import gc
import os

import numpy as np
import pytest

import minidl
import minidl.functions as F
from minidl import Tensor

pytestmark = pytest.mark.skipif(not os.environ.get("MINIDL_EMULATE_GPUS"),
                                reason="checks the GPU emulator: run with --emulate-gpus 2")


@pytest.fixture
def cp():
    from minidl.device import cupy
    return cupy()


@pytest.fixture
def hazards():
    """The stream hazards a test provokes on purpose, taken so the autouse check does not fail it."""
    from minidl_emulator import streams
    streams.take_hazards()
    found = []
    yield found
    gc.collect()
    found.extend(streams.take_hazards())


# --- arrays are not NumPy arrays


def test_numpy_operand_is_a_type_error(cp):
    a = cp.arange(3.0)
    with pytest.raises(TypeError, match="NumPy array cannot be an operand"):
        a + np.ones(3)
    with pytest.raises(TypeError, match="NumPy"):
        np.ones(3) * a
    with pytest.raises(TypeError, match="NumPy array cannot be an operand"):
        a[...] = np.ones(3)


def test_implicit_conversion_is_a_type_error(cp):
    a = cp.arange(3.0)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(a)
    np.testing.assert_array_equal(a.get(), [0.0, 1.0, 2.0])  # explicit is fine
    assert float(a.sum()) == 3.0  # so is a scalar


def test_operands_on_two_gpus_are_refused(cp, fresh_peer_access):  # (none enabled)
    a = cp.ones(3)
    with cp.cuda.Device(1):
        b = cp.ones(3)
        with pytest.raises(ValueError, match=r"resides \(0\) is different from the current device \(1\)"):
            a + b


def test_views_share_their_allocation_and_copies_do_not(cp):
    a = cp.arange(6.0).reshape(2, 3)
    view, copy = a.T, a.copy()
    view[0, 0] = 42.0
    assert a[0, 0].item() == 42.0 and copy[0, 0].item() == 0.0


def test_an_element_taken_by_integers_is_a_zero_d_view_as_in_cupy(cp):
    """CuPy's a[i] (every axis indexed by an integer) is a 0-d view, no launch; NumPy's would be a scalar."""
    from minidl_emulator.ledger import LEDGER
    a = cp.arange(6.0).reshape(2, 3)
    mark = LEDGER.mark()
    element, row_element = a[1, 2], a[1][np.int64(0)]
    assert LEDGER.since(mark) == []
    assert isinstance(element, cp.ndarray) and element.shape == () and row_element.shape == ()
    a[1, 2] = 7.0
    assert element.item() == 7.0  # a view of a's memory


# --- memory


def test_fresh_memory_is_nan_or_a_sentinel(cp):
    assert np.isnan(cp.empty(4, dtype=cp.float32).get()).all()
    assert (cp.empty(4, dtype=cp.int32).get() == np.iinfo(np.int32).max).all()
    assert np.isnan(cp.empty_like(cp.zeros((2, 2))).get()).all()


def test_each_gpu_has_a_memory_limit(cp, monkeypatch):
    monkeypatch.setenv("MINIDL_EMULATE_GPU_MEMORY", "0.001")  # 1 MiB
    with pytest.raises(cp.cuda.memory.OutOfMemoryError, match="limit is MINIDL_EMULATE_GPU_MEMORY"):
        cp.empty(2 ** 20, dtype=cp.float32)


def test_memory_hook_sees_allocations_and_frees(cp):
    seen = []

    class Hook(cp.cuda.MemoryHook):
        def malloc_postprocess(self, **kw):
            seen.append(("malloc", kw["mem_size"]))

        def free_postprocess(self, **kw):
            seen.append(("free", kw["mem_size"]))
    with Hook():
        a = cp.empty(10, dtype=cp.float64)
        del a
        gc.collect()
    assert ("malloc", 80) in seen and ("free", 80) in seen


# --- streams and events


def _streams(cp):
    return cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)


def test_read_on_another_stream_without_an_event_is_a_hazard(cp, hazards):
    from minidl_emulator.streams import StreamHazard
    s1, s2 = _streams(cp)
    with s1:
        x = cp.ones(4) * 3
    with s2, pytest.raises(StreamHazard, match=r"reads .* written by non-blocking stream .*test_emulator.py:\d+"):
        x + 1
    assert len(hazards) == 0  # collected at teardown
    # the same read after waiting on an event recorded after the write is ordered
    s2.wait_event(s1.record())
    with s2:
        x + 1


HAZARD_SCRIPT = """
import sys
from minidl.device import cupy
cp = cupy()
s1, s2 = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
with s1:
    x = cp.ones(4) * 3
if sys.argv[1] == "caught":
    try:
        with s2:
            x + 1
    except RuntimeError:
        pass
else:
    with s2:
        x + 1  # nothing catches this one: its traceback ends the process
"""


@pytest.mark.parametrize("caught", [True, False])
def test_a_hazard_is_printed_once_whether_caught_or_not(tmp_path, caught):
    """The exit report prints the hazards that nothing took; one that ended the process is in its traceback
    already, and is not printed a second time."""
    import subprocess
    import sys
    script = tmp_path / "hazard.py"
    script.write_text(HAZARD_SCRIPT)
    done = subprocess.run([sys.executable, str(script), "caught" if caught else "uncaught"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "MINIDL_EMULATE_GPUS": "1"})
    assert done.returncode == (0 if caught else 1), done.stderr
    assert done.stderr.count("written by non-blocking stream") == 1, done.stderr
    assert ("minidl emulator: 1 stream hazard(s) in this process:" in done.stderr) == caught, done.stderr
    assert ("Traceback" in done.stderr) == (not caught), done.stderr


def test_write_after_read_on_another_stream_is_a_hazard(cp, hazards):
    from minidl_emulator.streams import StreamHazard
    s1, s2 = _streams(cp)
    with s1:
        x = cp.ones(4)
    s2.wait_event(s1.record())
    with s2:
        y = x * 2  # noqa: F841 -- a read of x on s2
    with s1, pytest.raises(StreamHazard, match="writes .* still used by"):
        x += 1


def test_legacy_default_stream_orders_with_blocking_streams_only(cp, hazards):
    from minidl_emulator.streams import StreamHazard
    blocking, non_blocking = cp.cuda.Stream(), cp.cuda.Stream(non_blocking=True)
    x = cp.ones(4)  # the legacy default stream
    with blocking:
        x + 1  # implicitly after the legacy stream's work
    with non_blocking, pytest.raises(StreamHazard):
        x + 1  # a non-blocking stream is not


def test_host_synchronize_orders_later_work(cp):
    s1, s2 = _streams(cp)
    with s1:
        x = cp.ones(4) * 3
    s1.synchronize()  # the host waited: anything enqueued after this is ordered after
    with s2:
        x + 1
    s2.synchronize()  # and x may go back to s1's pool once s2 is done with it


def test_freeing_while_another_stream_may_use_it_is_a_hazard(cp, hazards):
    s1, s2 = _streams(cp)
    with s1:
        x = cp.ones(4)
    s2.wait_event(s1.record())
    with s2:
        y = x * 2  # noqa: F841 -- s2 reads x
    del x  # back to s1's pool, which may hand it out before s2's read ran
    gc.collect()
    from minidl_emulator import streams
    found = streams.take_hazards()
    assert len(found) == 1 and "went back to the memory pool" in found[0][0]


def test_a_stream_of_another_device_cannot_be_entered(cp):
    s = cp.cuda.Stream()
    with cp.cuda.Device(1), pytest.raises(RuntimeError, match="belongs to device 0"):
        with s:
            pass


# --- kernels: CuPy's argument rules


def test_kernel_arguments_must_match_the_c_types(cp):
    source = 'extern "C" __global__ void scale(const float* x, float* y, float a, long long n) {' \
             ' long long i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = a * x[i]; }'
    kernel = cp.RawKernel(source, "scale")
    x = cp.arange(5, dtype=cp.float32)
    y = cp.empty(5, dtype=cp.float32)
    kernel((1,), (8,), (x, y, np.float32(2), 5))
    np.testing.assert_array_equal(y.get(), 2 * np.arange(5))
    with pytest.raises(TypeError, match="float"):  # a Python float is a C double
        kernel((1,), (8,), (x, y, 2.0, 5))
    with pytest.raises(TypeError):  # a float64 array into a float*
        kernel((1,), (8,), (x.astype(cp.float64), y, np.float32(2), 5))
    with pytest.raises(TypeError):  # np.int32 where long long is expected
        kernel((1,), (8,), (x, y, np.float32(2), np.int32(5)))


# --- the defects the emulator found in minidl


def test_scalar_operand_is_made_on_the_device_stream():
    x = Tensor(np.arange(3.0, dtype=np.float32), device="cuda:0")
    np.testing.assert_array_equal((x * 2.0).numpy(), [0.0, 2.0, 4.0])  # was: made on the legacy stream


def test_loss_takes_numpy_labels_on_the_device_stream():
    logits = Tensor(np.zeros((2, 3), dtype=np.float32), device="cuda:0")
    assert np.isclose(F.softmax_cross_entropy(logits, np.array([0, 2])).item(), np.log(3))


def test_pow_with_a_numpy_array_exponent_on_a_gpu():
    x = Tensor(np.array([1.5, 2.0]), requires_grad=True, device="cuda:0")
    y = x ** np.array([2.0, 3.0])
    np.testing.assert_allclose(y.numpy(), [2.25, 8.0])
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [3.0, 12.0])


def test_non_contiguous_copy_between_two_gpus():
    x = Tensor(np.arange(12.0, dtype=np.float32).reshape(3, 4), requires_grad=True, device="cuda:0")
    y = F.copy(x.T, "cuda:1")  # transposed: the copy needs a contiguous temporary on GPU 0
    np.testing.assert_array_equal(y.numpy(), np.arange(12.0).reshape(3, 4).T)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.ones((3, 4)))


def test_array_on_a_mapped_gpu_is_named_by_its_logical_device(cp):
    from minidl.device import device_of_array
    from minidl.errors import DeviceError
    minidl.set_device_map({"cuda:0": 1, "cuda:1": 0})
    try:
        with cp.cuda.Device(1):
            on_gpu1 = cp.ones(2)
        assert device_of_array(on_gpu1).name == "cuda:0"  # was: cuda:1, which is GPU 0 here
        minidl.set_device_map({"cuda:1": 0})
        with pytest.raises(DeviceError, match="no logical device maps to"):
            device_of_array(on_gpu1)
    finally:
        minidl.set_device_map(None)


def test_a_numpy_ufunc_writing_through_out_is_a_checked_write(cp, hazards):
    from minidl_emulator.streams import StreamHazard
    s1, s2 = _streams(cp)
    with s1:
        x, y = cp.ones(4), cp.ones(4)
    s2.wait_event(s1.record())
    with s2:
        x + 1  # s2 reads x
    with s1, pytest.raises(StreamHazard, match="writes .* still used by"):
        np.multiply(y, 2, out=x)  # NumPy hands out= to __array_ufunc__ as a tuple


def test_memory_freed_on_the_legacy_stream_after_a_blocking_stream_used_it_is_no_hazard(cp, hazards):
    from minidl_emulator import streams
    x = cp.ones(4)  # on the legacy default stream
    with cp.cuda.Stream():  # a blocking stream: the legacy stream's next work waits for it
        x * 2
    del x
    gc.collect()
    assert streams.take_hazards() == []


def test_streams_and_memory_are_found_by_their_handles_and_addresses(cp):
    """What a call given raw handles (NCCL's) finds: a live stream by its ptr, the legacy default stream by 0
    or 1 (cudaStreamLegacy), and device memory only inside the bytes an allocation really spans."""
    from minidl_emulator import cuda
    stream = cp.cuda.Stream(non_blocking=True)
    assert cuda.stream_at(stream.ptr) is stream
    assert cuda.stream_at(0) is cuda.stream_at(1) is cp.cuda.Stream.null
    with pytest.raises(NotImplementedError, match="cudaStreamPerThread"):
        cuda.stream_at(2)
    gone = cp.cuda.Stream().ptr
    gc.collect()
    with pytest.raises(cuda.CUDARuntimeError, match=f"{gone} is no live stream"):
        cuda.stream_at(gone)
    a = cp.arange(6, dtype=cp.float32)
    allocation, raw = cuda.memory_at(a[2:].data.ptr, 16, "x at")
    assert allocation is a._allocation and raw.view(np.float32).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="but 20 bytes from there run past the end of the 24-byte array"):
        cuda.memory_at(a[2:].data.ptr, 20, "x at")
    broadcast = cp.broadcast_to(cp.float32(1), (1024,))  # 4 KiB of elements over one float
    cuda.memory_at(broadcast.data.ptr, 4, "x at")
    with pytest.raises(ValueError, match="run past the end"):
        cuda.memory_at(broadcast.data.ptr, 8, "x at")
