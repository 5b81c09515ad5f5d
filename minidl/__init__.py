"""minidl: a small deep-learning framework on NumPy and CuPy.

Importing it changes nothing outside minidl: process-wide settings (OpenBLAS's
environment, the host allocator) are the application's to make (minidl.cpu).
"""
from minidl.core import Function, Tensor, grad_enabled, no_grad
from minidl.device import device, gpu_count, set_device_map
from minidl.errors import MinidlError
from minidl.gradcheck import gradcheck
from minidl import functions

__version__ = "0.1.0"
