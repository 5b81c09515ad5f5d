"""The precision of the network's arithmetic: a process-wide setting, chosen by the application.

"tf32" (the default, as PyTorch's for convolutions): float32 activations, GEMMs on TF32 tensor cores,
whose inputs keep a 10-bit mantissa and whose sums are float32. "fp32": exact FP32 GEMMs.
"fp16", "bf16": mixed precision, as PyTorch's autocast: the convolutions and fully connected layers
take their input and weights in that 16-bit dtype (compute_dtype; the weights stay float32 masters,
cast each step by an autograd-visible cast, so their gradients come back float32), and what follows
them stays 16-bit; GEMMs sum in float32, kernels accumulate in float, the loss is float32. On the CPU
16-bit arrays are computed in float32 and rounded (minidl.core.HALF_DTYPES): for testing, not speed.
minidl.functions.gemm and the layers read it at each call; a run may resume with another one.
"""
from __future__ import annotations

import numpy as np

from minidl.errors import MinidlError

PRECISIONS = ("tf32", "fp32", "fp16", "bf16")
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


def compute_dtype():
    """The 16-bit dtype layers compute in under "fp16" or "bf16"; None under "tf32" and "fp32" (their inputs'
    own dtype)."""
    if _precision == "fp16":
        return np.dtype(np.float16)
    if _precision == "bf16":
        import ml_dtypes  # here: its import takes about a second, which only a bf16 run needs to pay
        return np.dtype(ml_dtypes.bfloat16)
    return None
