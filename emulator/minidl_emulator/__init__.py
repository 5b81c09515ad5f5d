"""Emulated CUDA GPUs: CuPy's API on the CPU, strict where GPU bugs hide (see emulator/README.md).

Chosen only by MINIDL_EMULATE_GPUS=N (pytest --emulate-gpus N), in minidl.device.cupy(),
which calls `cupy_module(N)`. Enforced: no mixing with NumPy arrays, no operand on
another GPU, kernel arguments checked against their C types, fresh memory holding NaN,
a memory limit per GPU, and stream order (a hazard raises, and is printed at exit
when nothing took it). Not shown: races inside a kernel, real timing, cuBLAS numerics.
"""
import atexit
import sys

def cupy_module(gpus):
    """The emulated `cupy` namespace with `gpus` fresh GPUs."""
    from minidl_emulator import cuda, namespace  # only when asked for: it compiles kernels with g++
    cuda.configure(gpus)
    atexit.unregister(_print_hazards_left)  # once, however often the GPUs are configured
    atexit.register(_print_hazards_left)
    return namespace


def _print_hazards_left():
    import gc
    import signal
    from minidl_emulator import streams
    # the process is ending: a Ctrl-C now would only turn this check into a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    gc.collect()  # arrays in reference cycles are freed, and checked, now rather than never
    printed = _in_uncaught_error(streams.StreamHazard)
    found = [hazard for hazard in streams.take_hazards() if not any(hazard is shown for shown in printed)]
    if found:
        sys.stderr.write(f"minidl emulator: {len(found)} stream hazard(s) in this process:\n"
                         + "".join(f"- {message} (at {where})\n" for message, where in found))


def _in_uncaught_error(hazard_type):
    """The hazards (message, where) raised as hazard_type in the error that ended the process, if one did:
    its traceback, printed already, shows them (sys.last_exc, or last_value before Python 3.12)."""
    error = getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)
    found, seen = [], set()
    while error is not None and id(error) not in seen:  # the error and those it was raised from or during
        seen.add(id(error))
        if isinstance(error, hazard_type):
            found.append(error.found)
        error = error.__cause__ or error.__context__
    return found
