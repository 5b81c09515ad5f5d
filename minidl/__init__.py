"""minidl: a small deep-learning framework on NumPy and CuPy.

Importing it changes nothing outside minidl: process-wide settings (OpenBLAS's
environment, the host allocator) are the application's to make (minidl.cpu).
The autograd engine and the functions load on first use (`minidl.Tensor`, `from minidl
import functions`): a process that needs only part of minidl (the command line's start,
prepare-data's decoding workers) does not pay for the rest, ml_dtypes' second above all.
"""
import importlib

from minidl.device import device, gpu_count, set_device_map
from minidl.errors import MinidlError
from minidl.gradcheck import gradcheck

__version__ = "0.1.0"
_ON_FIRST_USE = {"Function": "minidl.core", "Tensor": "minidl.core", "grad_enabled": "minidl.core",
                 "no_grad": "minidl.core", "functions": None}
__all__ = ["MinidlError", "device", "gpu_count", "gradcheck", "set_device_map", *_ON_FIRST_USE]


def __getattr__(name):
    if name not in _ON_FIRST_USE:
        raise AttributeError(f"module 'minidl' has no attribute {name!r}")
    module = _ON_FIRST_USE[name]
    value = importlib.import_module(f"minidl.{name}") if module is None else getattr(
        importlib.import_module(module), name)
    globals()[name] = value
    return value
