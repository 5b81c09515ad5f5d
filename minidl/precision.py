"""The precision of float32 GEMMs on GPUs: a process-wide setting, chosen by the application.

"tf32" (the default, as PyTorch's for convolutions): TF32 tensor cores, whose inputs keep a
10-bit mantissa and whose sums are float32. "fp32": exact FP32. CPU GEMMs are NumPy's under
either. minidl.functions.gemm reads it at each GPU GEMM; a run may resume with another one.
"""
from __future__ import annotations

from minidl.errors import MinidlError

PRECISIONS = ("tf32", "fp32")  # a choice list: 16-bit ones may join it
DEFAULT_PRECISION = "tf32"
_precision = DEFAULT_PRECISION


def set_precision(name: str) -> None:
    """Make float32 GEMMs on GPUs compute in `name`, one of PRECISIONS, from now on (every thread)."""
    global _precision
    if name not in PRECISIONS:
        raise MinidlError(f"precision must be one of {', '.join(PRECISIONS)}; got {name!r}")
    _precision = name


def precision() -> str:
    """The precision set (DEFAULT_PRECISION unless set_precision chose another)."""
    return _precision
