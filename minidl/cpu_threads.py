"""Spread NumPy's memory-bound work over the CPU's cores.

NumPy runs one core per operation except in BLAS. Patch copies (im2col,
col2im), pooling and LRN move a lot of memory and release the GIL, so running
them as one slice per core is nearly that many times faster. Slices are along
an axis the operation never mixes (the batch or the channels), so the result
is the same as one call, bit for bit.
"""
import os
from concurrent.futures import ThreadPoolExecutor

CORES = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_pool = ThreadPoolExecutor(CORES, thread_name_prefix="minidl-cpu") if CORES > 1 else None
MIN_ITEMS = 2  # an axis shorter than this is not worth splitting


def over_slices(work, length):
    """Call work(start, stop) on slices covering range(length), in parallel; returns when all are done."""
    if _pool is None or length < MIN_ITEMS:
        work(0, length)
        return
    parts = min(CORES, length)
    bounds = [length * i // parts for i in range(parts + 1)]
    for future in [_pool.submit(work, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
        future.result()  # re-raises an error from a worker here
