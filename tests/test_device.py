"""Device names, the logical device map, and the errors for devices that are not there.

Most CUDA paths are checked with a fake `cupy` module: device() only asks CuPy for the
GPU count and, on `with device:`, for a Device and a Stream context, so the checks on
names, the map and the messages run on any machine.
"""
import itertools
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

import minidl
import minidl.functions as F
from minidl import Tensor
from minidl.errors import DeviceError, MinidlError

# the module itself: `import minidl.device as dm` would give the function minidl.device
dm = sys.modules["minidl.device"]


@pytest.fixture(autouse=True)
def isolated_devices(monkeypatch):
    """Each test starts from the default map and leaves no (fake) CUDA device cached."""
    monkeypatch.delenv("MINIDL_DEVICE_MAP", raising=False)
    monkeypatch.setattr(dm, "_device_map", None)
    # the cpu Device stays the same object; CUDA devices (real or emulated) are made afresh
    monkeypatch.setattr(dm, "_devices",
                        {name: d for name, d in dm._devices.items() if not d.is_cuda})
    yield
    minidl.set_device_map(None)


class FakeCupy:
    """Just enough of CuPy for device(): a GPU count, and Device/Stream contexts that log
    which thread entered and exited which object."""

    def __init__(self, count):
        log, serial = [], itertools.count()
        self.log = log

        class Context:
            def __init__(self, *args, **kwargs):
                self.serial = next(serial)

            def __enter__(self):
                log.append(("enter", threading.current_thread().name, self.serial))
                return self

            def __exit__(self, *exc):
                log.append(("exit", threading.current_thread().name, self.serial))

        def count_gpus():
            if count is None:
                raise RuntimeError("cudaErrorNoDevice")  # what a machine without a driver says
            return count

        self.cuda = SimpleNamespace(Device=Context, Stream=Context,
                                    runtime=SimpleNamespace(getDeviceCount=count_gpus))


@pytest.fixture
def fake_cupy(monkeypatch):
    def install(count):
        fake = FakeCupy(count)
        monkeypatch.setattr(dm, "_cupy", fake)
        return fake
    return install


@pytest.fixture
def no_cupy(monkeypatch):
    # None in sys.modules makes `import cupy` raise ImportError, as on a machine without it
    monkeypatch.delenv("MINIDL_EMULATE_GPUS", raising=False)
    monkeypatch.setattr(dm, "_cupy", None)
    monkeypatch.setitem(sys.modules, "cupy", None)


# --- names


def test_cpu_names():
    cpu = minidl.device("cpu")
    assert minidl.device() is cpu and minidl.device(" CPU ") is cpu and minidl.device(cpu) is cpu
    assert str(cpu) == "cpu" and repr(cpu) == "device('cpu')"
    assert cpu.xp is np and cpu.stream is None and not cpu.is_cuda
    with cpu as entered:
        assert entered is cpu
    cpu.synchronize()  # a no-op, not an error


@pytest.mark.parametrize("name",
                         ["tpu:0", "cuda:x", "cuda:", "gpu", "cuda:-1", "cuda:0:1", "cuda0", ""])
def test_unknown_device_names(name):
    with pytest.raises(DeviceError, match=rf"unknown device '{name}': use 'cpu' or 'cuda:N'"):
        minidl.device(name)


@pytest.mark.parametrize("name", [0, 1.5, ("cpu",)])
def test_device_name_must_be_a_string(name):
    with pytest.raises(DeviceError, match=r"a device is named by a string like 'cpu' or 'cuda:0'"):
        minidl.device(name)


def test_unknown_device_in_a_tensor():
    with pytest.raises(MinidlError, match=r"unknown device 'tpu:0'"):
        Tensor(np.ones(2), device="tpu:0")


def test_device_of_array():
    assert dm.device_of_array(np.ones(2)) is minidl.device("cpu")
    assert dm.device_of_array(np.float64(1.0)) is minidl.device("cpu")
    assert dm.is_array(np.ones(2)) and not dm.is_array([1.0])
    with pytest.raises(DeviceError, match=r"not an array minidl knows: list"):
        dm.device_of_array([1.0])


# --- CUDA without CuPy or without the GPU


def test_cuda_without_cupy(no_cupy):
    for name in ("cuda:0", "cuda"):
        with pytest.raises(DeviceError,
                           match=r"a CUDA device needs CuPy, which is not importable .*"
                                              r"install minidl\[gpu\] or use device 'cpu'"):
            minidl.device(name)
    with pytest.raises(DeviceError, match=r"needs CuPy"):
        Tensor(np.ones(2), device="cuda:0")
    assert minidl.gpu_count() == 0
    assert [d.name for d in dm.resolve_devices(None, ("cuda:0", "cuda:1"))] == ["cpu", "cpu"]
    assert minidl.device("cpu").xp is np  # the CPU never needs CuPy


def test_cuda_device_that_is_not_there(fake_cupy):
    fake_cupy(0)
    with pytest.raises(DeviceError,
                       match=r"device cuda:0 is not there: this machine has 0 GPU\(s\)"):
        minidl.device("cuda:0")
    assert "cuda:0" not in dm._devices  # a failed lookup caches nothing
    fake_cupy(1)
    with pytest.raises(DeviceError,
                       match=r"device cuda:1 is not there: this machine has 1 GPU\(s\); .*"
                                          r"MINIDL_DEVICE_MAP='cuda:1=0'"):
        minidl.device("cuda:1")


def test_mapped_device_that_is_not_there_names_its_gpu(fake_cupy):
    fake_cupy(2)
    minidl.set_device_map({"cuda:1": 3})
    with pytest.raises(DeviceError,
                       match=r"device cuda:1 \(mapped to GPU 3\) is not there: this machine has 2"):
        minidl.device("cuda:1")


def test_gpu_count_is_zero_when_the_driver_fails(fake_cupy):
    fake_cupy(None)
    assert minidl.gpu_count() == 0


@pytest.mark.parametrize("count,expected", [(0, ("cpu", "cpu")), (1, ("cuda:0", "cuda:0")),
                                            (2, ("cuda:0", "cuda:1")), (4, ("cuda:0", "cuda:1"))])
def test_preferred_devices_are_fitted_to_the_machine(fake_cupy, count, expected):
    fake_cupy(count)
    assert tuple(d.name for d in dm.resolve_devices(None, ("cuda:0", "cuda:1"))) == expected
    # the model's word
    assert tuple(d.name for d in dm.resolve_devices(None, ("cpu", "cpu"))) == ("cpu", "cpu")


def test_requested_devices_win_and_one_serves_both(fake_cupy):
    fake_cupy(2)
    assert [d.name for d in dm.resolve_devices("cuda:1", ("cpu", "cpu"))] == ["cuda:1", "cuda:1"]
    resolved = dm.resolve_devices(["cpu", "cuda:0"], ("cuda:0", "cuda:1"))
    assert [d.name for d in resolved] == ["cpu", "cuda:0"]
    with pytest.raises(DeviceError, match="give 2 devices, one per part"):
        dm.resolve_devices("cpu,cpu,cpu", ("cuda:0", "cuda:1"))
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        dm.resolve_devices(None, ("tpu", "cpu"))


def test_cuda_devices_with_a_fake_cupy(fake_cupy):
    fake_cupy(2)
    d0, d1 = minidl.device("cuda"), minidl.device("cuda:1")
    assert d0 is minidl.device("cuda:0") and d0.is_cuda and d0.index == 0 and d0.physical == 0
    assert d1.physical == 1 and repr(d1) == "device('cuda:1')"
    assert d0 is not d1 and d0.stream is not d1.stream  # a stream per logical device


def test_inputs_on_different_devices_are_refused(fake_cupy):
    fake_cupy(2)
    a = Tensor(np.ones((2, 2)), requires_grad=True)
    b = Tensor(np.ones((2, 2)))
    # the data stays on the host: the check runs before any kernel
    b.device = minidl.device("cuda:1")
    with pytest.raises(MinidlError,
                       match=r"Add got inputs on different devices \(cpu and cuda:1\); "
                                          r"move one with minidl\.functions\.copy\(x, device\)"):
        a + b
    with pytest.raises(MinidlError, match=r"MatMul got inputs on different devices"):
        F.matmul(b, a)
    assert a.grad is None and a.creator is None


# --- the logical device map


def test_set_device_map_sends_cuda1_to_gpu0():
    minidl.set_device_map({"cuda:1": 0})
    assert dm.physical_index(1) == 0
    assert dm.physical_index(0) == 0 and dm.physical_index(2) == 2  # unmapped: logical = physical
    minidl.set_device_map({1: 0})
    assert dm.physical_index(1) == 0
    minidl.set_device_map(None)
    assert dm.physical_index(1) == 1


@pytest.mark.parametrize("text,expected",
                         [("cuda:1=0", {1: 0}), (" cuda:1 = 0 , cuda:2=1 ", {1: 0, 2: 1}),
                                           ("cuda:1=0,", {1: 0}), ("", {})])
def test_device_map_from_the_environment(monkeypatch, text, expected):
    monkeypatch.setenv("MINIDL_DEVICE_MAP", text)
    for logical in range(4):
        assert dm.physical_index(logical) == expected.get(logical, logical)


def test_set_device_map_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("MINIDL_DEVICE_MAP", "cuda:1=0")
    minidl.set_device_map({"cuda:1": 2})
    assert dm.physical_index(1) == 2
    minidl.set_device_map(None)  # back to the environment
    assert dm.physical_index(1) == 0


@pytest.mark.parametrize("text", ["cuda1=0", "cuda:1", "cuda:1:0", "gpu:1=0", "cuda:1=x", "1=0"])
def test_bad_device_map_environment(monkeypatch, fake_cupy, text):
    monkeypatch.setenv("MINIDL_DEVICE_MAP", text)
    entry = text.split(",")[0].strip()
    with pytest.raises(DeviceError,
                       match=rf"bad MINIDL_DEVICE_MAP entry '{entry}': expected 'cuda:L=P'"):
        dm.physical_index(1)
    fake_cupy(1)
    # reported where a GPU is named
    with pytest.raises(DeviceError, match=r"bad MINIDL_DEVICE_MAP entry"):
        minidl.device("cuda:0")
    assert minidl.device("cpu").xp is np  # the CPU does not read the map


def test_mapped_device_with_a_fake_cupy(fake_cupy):
    fake_cupy(1)
    minidl.set_device_map({"cuda:1": 0})
    d0, d1 = minidl.device("cuda:0"), minidl.device("cuda:1")
    assert (d0.physical, d1.physical) == (0, 0) and d1.index == 1
    assert repr(d1) == "device('cuda:1' on GPU 0)"
    assert d0 is not d1 and d0.stream is not d1.stream  # one GPU, two streams: the towers overlap
    minidl.set_device_map(None)
    assert minidl.device("cuda:0") is d0  # not moved by the new map: the same device and stream
    with pytest.raises(DeviceError, match=r"cuda:1 is not there"):  # moved back to GPU 1, absent
        minidl.device("cuda:1")


def test_environment_map_applies_to_new_devices(monkeypatch, fake_cupy):
    fake_cupy(1)
    monkeypatch.setenv("MINIDL_DEVICE_MAP", "cuda:1=0")
    assert minidl.device("cuda:1").physical == 0


def test_changing_the_map_keeps_the_cpu_device():
    # tensors made before and after set_device_map must still be on one device
    cpu = minidl.device("cpu")
    before = Tensor(np.ones(2))
    minidl.set_device_map({"cuda:1": 0})
    after = Tensor(np.ones(2))
    assert minidl.device("cpu") is cpu and after.device is before.device
    np.testing.assert_array_equal((before + after).numpy(), [2.0, 2.0])


def test_device_contexts_are_per_thread(fake_cupy):
    # two threads inside `with device:` at once (say a loader thread and the training loop)
    # must each exit the GPU/stream contexts they entered, not the other thread's
    fake = fake_cupy(1)
    dev = minidl.device("cuda:0")
    dev.stream  # made once, outside the threads
    fake.log.clear()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with dev:
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with dev:
            b_in.set()
            a_out.wait(5)  # `first` exits while this thread is still inside

    threads = [threading.Thread(target=first, name="A"), threading.Thread(target=second, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for name in "AB":
        entered = {s for what, who, s in fake.log if who == name and what == "enter"}
        exited = {s for what, who, s in fake.log if who == name and what == "exit"}
        assert entered and entered == exited, fake.log


# --- on a real GPU


@pytest.mark.gpu
def test_gpu_tensor_and_copy_back():
    cp = dm.cupy()
    x = Tensor(np.arange(3.0), requires_grad=True, device="cuda:0")
    assert isinstance(x.data, cp.ndarray) and isinstance(x.numpy(), np.ndarray)
    y = x.to("cpu")
    assert isinstance(y.data, np.ndarray)
    (y * 2.0).sum().backward()
    assert x.grad.device is x.device
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0, 2.0])


@pytest.mark.gpu
def test_gpu_two_logical_devices_on_one_gpu():
    minidl.set_device_map({"cuda:1": 0})
    d0, d1 = minidl.device("cuda:0"), minidl.device("cuda:1")
    assert d1.physical == 0 and d0.stream is not d1.stream
    x = Tensor(np.arange(4.0), requires_grad=True, device=d0)
    y = F.copy(x, d1)
    assert y.device is d1
    with pytest.raises(MinidlError, match=r"different devices \(cuda:0 and cuda:1\)"):
        x + y
    (y * 3.0).sum().backward()
    assert x.grad.device is d0
    np.testing.assert_array_equal(x.grad.numpy(), [3.0] * 4)
    assert minidl.gradcheck(lambda x: F.copy(x * x, d1), x)


@pytest.mark.parametrize("text", ["two", "0", "-1"])
def test_a_malformed_emulated_gpu_count_is_an_error_not_the_cpu(monkeypatch, text):
    monkeypatch.setenv("MINIDL_EMULATE_GPUS", text)
    with pytest.raises(DeviceError,
                       match="MINIDL_EMULATE_GPUS=.*give the number of GPUs to emulate"):
        dm.gpu_count()
