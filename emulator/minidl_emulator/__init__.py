"""Emulated CUDA GPUs: CuPy's API on the CPU, strict where GPU bugs hide.

minidl's GPU path runs here, in every CI run, on machines without a GPU. It is
never chosen silently: set MINIDL_EMULATE_GPUS=N (or run pytest with
--emulate-gpus N) and `minidl.device.cupy()` returns this stand-in instead of
CuPy. What it enforces, each where a real GPU would misbehave:

- arrays are not NumPy arrays: mixing the two, or converting implicitly, is a
  TypeError; an operand on another GPU is an error (no peer access) (xp.py);
- RawModule compiles the project's unchanged .cu files with g++ and runs every
  block and thread; each launch checks its arguments against the kernel's C
  parameter types with CuPy's marshalling rules (raw.py, kernel_runner.py);
- fresh device memory holds NaN or an integer sentinel, and each GPU has a
  memory limit (cuda.py);
- streams and events are modelled, and every access is checked against the
  order they guarantee; a buffer freed while another stream may use it is
  reported too (streams.py). Every hazard that nothing took (one that code
  caught, or one found when memory was freed, which raises nowhere) is printed
  to stderr when the process exits, so a subprocess (an mpirun rank) shows it;
  one whose error ended the process is in its traceback, and printed once.

What it cannot show: races inside a kernel (threads run one after another),
real timing and memory use, and cuBLAS numerics (TF32, summation order).
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
    from minidl_emulator import streams
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
