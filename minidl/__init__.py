"""minidl: a small deep-learning framework on NumPy and CuPy, built around AlexNet."""
import os

# Before NumPy loads OpenBLAS: its worker threads otherwise spin for about 0.1 s
# after every matrix product, holding the cores that minidl's CPU threads
# (minidl/cpu/threads.py) need between products. Set it yourself to override;
# it has no effect if NumPy was imported before minidl.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from minidl.core import Function, Tensor, grad_enabled, no_grad
from minidl.device import device, gpu_count, set_device_map
from minidl.errors import MinidlError
from minidl.gradcheck import gradcheck
from minidl import functions

__version__ = "0.1.0"
