"""NumPy work split across the CPU's cores.

NumPy runs matrix products on every core (its BLAS does), but elementwise work
on one. In AlexNet's CPU step that elementwise work (im2col and col2im,
pooling, LRN, the optimizer) is about a third of the time. NumPy releases the
GIL inside such loops, so the CPU paths run the same code on one slice of the
batch per core, in threads. Each output element is computed by the same
operations in the same order however the batch is split, so results do not
depend on the number of cores.
"""
import os
from concurrent.futures import ThreadPoolExecutor, wait

_pool, _pool_threads = None, 0


def _forget_pool():
    global _pool, _pool_threads
    _pool, _pool_threads = None, 0


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: it makes its own pool
    os.register_at_fork(after_in_child=_forget_pool)


def core_count():
    """The cores this process may run on (respects taskset and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


CACHE_BLOCK_ITEMS = 1 << 19  # 2 MB of float32: a block's temporaries stay in a core's share of the cache


def in_parallel(work, array, blocks=False):
    """Call work(part) for slices `part` that split range(len(array)) into one share per core; wait for all.

    With blocks=True each core goes through its share a few MB of `array` at a
    time, so that the temporaries of elementwise work stay in the cache rather
    than streaming through memory. work must write its results into arrays made
    beforehand (each slice into its own part of them) and must not call
    in_parallel itself (it would wait on the pool it is running in). A 0-d
    array has nothing to split: work(...) runs once, here.
    """
    global _pool, _pool_threads
    if array.ndim == 0:
        work(...)
        return
    length = len(array)
    block = max(1, CACHE_BLOCK_ITEMS * length // max(1, array.size)) if blocks else length
    runs = max(1, min(core_count(), length))
    bounds = [length * i // runs for i in range(runs + 1)]
    shares = [range(start, stop, max(1, min(block, stop - start))) for start, stop in zip(bounds, bounds[1:])]

    def run(share):
        for start in share:
            work(slice(start, min(start + share.step, share.stop)))
    if runs - 1 > _pool_threads:
        _pool, _pool_threads = ThreadPoolExecutor(runs - 1, thread_name_prefix="minidl-cpu"), runs - 1
    others = [_pool.submit(run, share) for share in shares[1:]]
    try:
        run(shares[0])  # this thread takes the first share rather than waiting idle
    finally:
        wait(others)  # no thread may still be writing when this returns, even after an error
    for done in others:
        done.result()  # re-raises an error from that thread
