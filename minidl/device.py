"""Devices: where an array lives, which array module computes on it, which stream.

A device is named `cpu` (NumPy) or `cuda:N` (CuPy). `cuda:N` is a *logical* device: the device
map sends it to a physical GPU (`set_device_map({"cuda:1": 0})` or MINIDL_DEVICE_MAP="cuda:1=0";
by default `cuda:N` is GPU N), so code written for `cuda:0` and `cuda:1` runs on one GPU when
both map to GPU 0. Each logical CUDA device owns a stream, so two on one GPU still run
concurrently; `with device:` makes its GPU and its stream current.
"""
from __future__ import annotations

import importlib
import os
import re
import threading
from types import ModuleType
from typing import Sequence

import numpy as np

from minidl.errors import DeviceError

_cupy = None
_device_map = None  # logical index -> physical GPU index; None = read the environment
_devices = {}  # name -> Device, so each logical device has one stream
_lock = threading.RLock()  # devices are compared by identity: each is made once, under this lock


EMULATE_GPUS = "MINIDL_EMULATE_GPUS"


def emulated_gpus() -> int | None:
    """How many emulated GPUs MINIDL_EMULATE_GPUS asks for: None when unset."""
    text = os.environ.get(EMULATE_GPUS, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise DeviceError(f"{EMULATE_GPUS}={text!r}: give the number of GPUs to emulate, e.g. "
                          f"{EMULATE_GPUS}=2")
    return int(text)


def cupy() -> ModuleType:
    """CuPy, imported on first use (minidl runs without it on the CPU); with MINIDL_EMULATE_GPUS=N
    set, the emulator's stand-in for it (N GPUs on the CPU, from minidl_emulator, installed by
    minidl[test]). The one place that chooses between them."""
    global _cupy
    with _lock:
        if _cupy is None:
            _cupy = _import_cupy()
    return _cupy


def _import_cupy():
    gpus = emulated_gpus()
    name = "cupy" if gpus is None else "minidl_emulator"
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        if gpus is not None:
            raise DeviceError(f"{EMULATE_GPUS} needs the GPU emulator, which is not importable "
                              f"({e}); install minidl[test]") from None
        raise DeviceError(f"a CUDA device needs CuPy, which is not importable ({e}); "
                          "install minidl[gpu] or use device 'cpu'") from None
    return module if gpus is None else module.cupy_module(gpus)


def gpu_count() -> int:
    """Physical GPUs visible, 0 without CuPy or a driver."""
    emulated_gpus()  # a malformed MINIDL_EMULATE_GPUS is an error, not "no GPU"
    try:
        return cupy().cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no GPU: all mean "none here"
        return 0


def _parse_map(text):
    mapping = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"cuda:(\d+)\s*=\s*(\d+)", item)
        if not m:
            raise DeviceError(f"bad MINIDL_DEVICE_MAP entry {item!r}: expected 'cuda:L=P', "
                              "for example 'cuda:1=0'")
        mapping[int(m.group(1))] = int(m.group(2))
    return mapping


def set_device_map(mapping: dict | None) -> None:
    """Map logical CUDA devices onto physical GPUs: {"cuda:1": 0} or {1: 0}; None resets."""
    global _device_map
    if mapping is None:
        _device_map = None
    else:
        try:
            _device_map = {int(str(k).removeprefix("cuda:")): int(v) for k, v in mapping.items()}
        except ValueError:
            raise DeviceError(f"bad device map {mapping!r}: expected logical to physical, "
                              "for example {'cuda:1': 0}") from None
    # forget only the devices the new map moves: the cpu and unmoved GPUs stay the same
    # objects, or tensors made before and after the call would be on "different devices"
    with _lock:
        for name, dev in list(_devices.items()):
            if dev.is_cuda and _physical_or_none(dev.index) != dev.physical:
                del _devices[name]


def _physical_or_none(logical):
    try:
        return physical_index(logical)
    except DeviceError:  # a bad MINIDL_DEVICE_MAP is reported when a device is asked for
        return None


def _current_map():
    """logical index -> physical GPU index: set_device_map's, else MINIDL_DEVICE_MAP's."""
    if _device_map is not None:
        return _device_map
    return _parse_map(os.environ.get("MINIDL_DEVICE_MAP", ""))


def physical_index(logical: int) -> int:
    """The physical GPU that logical CUDA device `logical` maps to."""
    return _current_map().get(logical, logical)


class Device:
    """A logical device. Use `device(name)` to get one."""

    def __init__(self, name: str):
        self.name = name
        self.is_cuda = name != "cpu"
        self.index = int(name.split(":")[1]) if self.is_cuda else None
        self.physical = physical_index(self.index) if self.is_cuda else None
        self._stream = None
        self._local = threading.local()  # each thread enters and exits its own contexts

    def __repr__(self):
        if self.is_cuda and self.physical != self.index:
            return f"device('{self.name}' on GPU {self.physical})"
        return f"device('{self.name}')"

    def __str__(self):
        return self.name

    @property
    def xp(self):
        """The array module: numpy or cupy."""
        return cupy() if self.is_cuda else np

    @property
    def stream(self):
        if not self.is_cuda:
            return None
        if self._stream is None:
            with cupy().cuda.Device(self.physical):
                self._stream = cupy().cuda.Stream(non_blocking=True)
        return self._stream

    def __enter__(self):
        if self.is_cuda:
            cp = cupy()
            gpu, stream = cp.cuda.Device(self.physical), self.stream
            gpu.__enter__()
            stream.__enter__()
            self._entered().append((gpu, stream))
        return self

    def _entered(self):
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def __exit__(self, *exc):
        if self.is_cuda:
            gpu, stream = self._entered().pop()
            stream.__exit__(*exc)
            gpu.__exit__(*exc)
        return False

    def synchronize(self) -> None:
        if self.is_cuda:
            self.stream.synchronize()


CPU_NAME = "cpu"


def device(name: str | Device | None = None) -> Device:
    """The Device named 'cpu', 'cuda' or 'cuda:N' (None: the CPU), or a Device passed through; one
    object per name. A CUDA device is checked here, so a missing CuPy or GPU is reported where
    it was named."""
    if isinstance(name, Device):
        return name
    text = canonical_name(name)
    with _lock:
        if text not in _devices:
            _devices[text] = _new_device(text)
        return _devices[text]


def _new_device(text):
    dev = Device(text)
    if dev.is_cuda:
        cupy()  # raises a clear error without CuPy
        count = gpu_count()
        if dev.physical >= count:
            where = f" (mapped to GPU {dev.physical})" if dev.physical != dev.index else ""
            raise DeviceError(
                f"device {text}{where} is not there: this machine has {count} GPU(s); "
                "to run two devices on one GPU map them, e.g. devices ('cuda:0', 'cuda:0') "
                "or MINIDL_DEVICE_MAP='cuda:1=0'")
    return dev


def canonical_name(name: str | None) -> str:
    """'cpu' or 'cuda:N' for a device name ('CPU', 'cuda', 'cuda:01', None for the CPU); checks the
    form only."""
    if name is None:
        return CPU_NAME
    if not isinstance(name, str):
        raise DeviceError(f"a device is named by a string like 'cpu' or 'cuda:0', got {name!r}")
    text = name.strip().lower()
    if text == "cuda":
        text = "cuda:0"
    if text != CPU_NAME and not re.fullmatch(r"cuda:\d+", text):
        raise DeviceError(f"unknown device {name!r}: use 'cpu' or 'cuda:N'")
    # 'cuda:01' is 'cuda:1': one Device, one stream
    return text if text == CPU_NAME else f"cuda:{int(text[5:])}"


def device_of_array(array) -> Device:
    """The device an array is on, for arrays that arrive without one: the CPU for NumPy; for CuPy
    the first logical device mapped to the array's GPU (a DeviceError when none is)."""
    if isinstance(array, np.ndarray) or np.isscalar(array):
        return device(CPU_NAME)
    if _cupy is not None and isinstance(array, _cupy.ndarray):
        gpu = array.device.id
        mapping = _current_map()
        logical = [l for l, p in mapping.items() if p == gpu]
        if gpu not in mapping:
            logical.append(gpu)
        if not logical:
            raise DeviceError(f"an array on GPU {gpu}, which no logical device maps to "
                              f"(device map {mapping}); give the Tensor a device")
        return device(f"cuda:{min(logical)}")
    raise DeviceError(f"not an array minidl knows: {type(array).__name__}")


def is_array(obj) -> bool:
    """Whether obj is a NumPy array, or a CuPy array once CuPy is in use."""
    return isinstance(obj, np.ndarray) or (_cupy is not None and isinstance(obj, _cupy.ndarray))


def resolve_devices(requested: str | Sequence[str] | None,
                    preferred: Sequence[str]) -> tuple[Device, ...]:
    """One Device per entry of `preferred`, each checked to exist.

    `requested` (names, or one comma-separated string; one name serves every part) wins.
    Otherwise `preferred` is fitted to this machine: a GPU that is not here becomes cuda:0, and
    without any GPU every part is on the CPU.
    """
    if isinstance(requested, str):
        names = [n.strip() for n in requested.split(",") if n.strip()]
        if not names:  # "," or "": a slip, not a request for the default devices
            raise DeviceError(f"no device in {requested!r}: give e.g. cpu, cuda:0 or cuda:0,cuda:1")
        requested = names
    parts = len(preferred)
    if requested:
        names = list(requested) * parts if len(requested) == 1 else list(requested)
        if len(names) != parts:
            raise DeviceError(f"give {parts} devices, one per part of the model (e.g. "
                              f"{','.join(['cpu'] * parts)}), or one for all; got "
                              f"{','.join(requested)}")
    else:
        count = gpu_count()
        names = [_fit(canonical_name(n), count) for n in preferred]
    return tuple(device(n) for n in names)


def _fit(name, gpus):
    if name == CPU_NAME or gpus == 0:
        return CPU_NAME
    return name if physical_index(int(name[5:])) < gpus else "cuda:0"


def available_memory(dev: Device) -> int | None:
    """Bytes a new allocation on `dev` can still get: the GPU's free memory plus what CuPy's pool
    holds unused, or the host's available memory (Linux's MemAvailable); None where unknown."""
    if dev.is_cuda:
        cp = cupy()
        with cp.cuda.Device(dev.physical):
            return cp.cuda.runtime.memGetInfo()[0] + cp.get_default_memory_pool().free_bytes()
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
