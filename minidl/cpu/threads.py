"""NumPy work split across the CPU's cores, in threads (NumPy releases the GIL inside its loops).

in_parallel: one slice of an array per core, for elementwise work (NumPy's BLAS uses every core already,
its loops one); each output element is computed the same way however the array is split, so results
do not depend on the core count. side_by_side: independent calls, a core each, each with its NumPy
loops and BLAS on one thread. side_by_side_if_alike: side_by_side only for calls doing the same work
on enough data to be worth a thread each. in_slabs: cache-sized slabs of thin products, a share of the
slabs per core, every product on one BLAS thread whatever the core count.
"""
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

from minidl.cpu import openblas

T = TypeVar("T")

_pool, _pool_threads = None, 0
_growing_pool = threading.Lock()  # one thread at a time replaces the pool or submits to it
_branch = threading.local()  # .alone: this thread runs one of side_by_side's calls, on one core
_holding_blas = threading.Lock()  # one side_by_side at a time sets the BLAS's thread count


def _forget_pool():
    global _pool, _pool_threads, _growing_pool, _holding_blas
    _pool, _pool_threads = None, 0  # its threads are the parent's: not in this process, nothing to shut down
    # a lock held by a thread of the parent would never be released
    _growing_pool, _holding_blas = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):  # a forked child has none of the parent's threads: it makes its own pool
    os.register_at_fork(after_in_child=_forget_pool)


def core_count() -> int:
    """The cores this process may run on (respects taskset and container CPU sets)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


CACHE_BLOCK_ITEMS = 1 << 19  # 2 MB of float32: a block's temporaries stay in a core's share of the cache


def in_parallel(work: Callable[[Any], None], array: Any, blocks: bool = False) -> None:
    """Call work(part) for slices `part` that split range(len(array)) into one share per core; wait for all.

    With blocks=True each core goes through its share a few MB of `array` at a
    time, so that the temporaries of elementwise work stay in the cache rather
    than streaming through memory. work must write its results into arrays made
    beforehand (each slice into its own part of them); an in_parallel or
    side_by_side inside work runs in work's thread (waiting on the pool it
    runs in would never end). A 0-d array has nothing to split: work(...) runs
    once, here.
    """
    if array.ndim == 0:
        work(...)
        return
    length = len(array)
    block = max(1, CACHE_BLOCK_ITEMS * length // max(1, array.size)) if blocks else length
    cores = 1 if getattr(_branch, "alone", False) else core_count()  # inside side_by_side: this core only
    runs = max(1, min(cores, length))
    bounds = [length * i // runs for i in range(runs + 1)]
    shares = [range(start, stop, max(1, min(block, stop - start))) for start, stop in zip(bounds, bounds[1:])]

    def run(share):
        alone = getattr(_branch, "alone", False)
        _branch.alone = True  # a side_by_side inside work runs its calls in turn: the pool is busy with this
        try:
            for start in share:
                work(slice(start, min(start + share.step, share.stop)))
        finally:
            _branch.alone = alone
    others = [_submit(runs - 1, run, share) for share in shares[1:]]
    try:
        run(shares[0])  # this thread takes the first share rather than waiting idle
    finally:
        wait(others)  # no thread may still be writing when this returns, even after an error
    for done in others:
        done.result()  # re-raises an error from that thread


def _submit(threads, call, *args):
    """call(*args) on the pool, grown first to at least `threads` threads; its future."""
    global _pool, _pool_threads
    with _growing_pool:  # so no thread submits to a pool that another has just shut down
        if threads > _pool_threads:
            if _pool is not None:
                _pool.shutdown(wait=False)  # its threads end once they have run what was submitted
            _pool, _pool_threads = ThreadPoolExecutor(threads, thread_name_prefix="minidl-cpu"), threads
        return _pool.submit(call, *args)


def side_by_side(calls: Sequence[Callable[[], T]]) -> List[T]:
    """Run independent calls at once, each on a core of its own; their results, in order.

    Inside each call in_parallel runs in the calling thread and BLAS on one
    thread (set back afterwards). Calls must not write to the same arrays. They
    run one after another where there are fewer than two cores or more cores
    than calls, where the BLAS's thread count cannot be set (blas_threads), and
    inside another side_by_side call or in_parallel's work. An error from any
    call is raised once all have ended. A product on one BLAS thread may round
    differently from the same product on several.
    """
    blas = blas_threads()
    if not 2 <= core_count() <= len(calls) or blas is None or getattr(_branch, "alone", False):
        return [call() for call in calls]
    return _one_core_each(calls, blas)


# Below this many input elements per call a thread handoff (tens of microseconds) costs more than it saves
ALIKE_MIN_ITEMS = 1 << 15


def side_by_side_if_alike(calls: Sequence[Callable[[], T]], kinds: Sequence[Any], items: int) -> List[T]:
    """The calls' results: side_by_side when they are alike and big enough, else in turn.

    Alike: two or more, all with equal `kinds` (the same work on arrays of the
    same shapes; unlike calls would leave a long one on one core beside a short
    one). Big enough: `items`, the elements one call reads, at least
    ALIKE_MIN_ITEMS.
    """
    if len(calls) >= 2 and all(kind == kinds[0] for kind in kinds) and items >= ALIKE_MIN_ITEMS:
        return side_by_side(calls)
    return [call() for call in calls]


def in_slabs(work: Callable[[Any], None], slabs: Sequence[Any]) -> None:
    """work(slab) for every one of `slabs`, in order within each core's share, every product on one BLAS thread.

    For cache-sized pieces of thin products (a few rows deep), whose results
    must not depend on the core count: every product is on one BLAS thread
    however the slabs are shared out, also when they run in turn (on one core,
    or inside side_by_side's calls). Unlike side_by_side it takes as many cores
    as there are slabs, up to all. Where the BLAS's thread count cannot be set
    the slabs run in turn, with the BLAS's own threads.
    """
    if not slabs:
        return
    cores = min(core_count(), len(slabs))
    bounds = [len(slabs) * i // cores for i in range(cores + 1)]

    def share(first, end):
        for slab in slabs[first:end]:
            work(slab)
    calls = [functools.partial(share, first, end) for first, end in zip(bounds, bounds[1:])]
    blas = blas_threads()
    if blas is None or getattr(_branch, "alone", False):
        for call in calls:
            call()
    else:
        _one_core_each(calls, blas)


def _one_core_each(calls, blas):
    """The calls at once, a core each (in turn past the core count), the BLAS held to one thread meanwhile."""
    def alone(call):
        _branch.alone = True
        try:
            return call()
        finally:
            _branch.alone = False
    get_threads, set_threads = blas
    with _holding_blas:  # calls from two threads at once would each restore the other's setting
        threads = get_threads()
        set_threads(1)  # the calls' matrix products run in their own threads, one core each
        try:
            others = [_submit(min(len(calls), core_count()) - 1, alone, call) for call in calls[1:]]
            try:
                first = alone(calls[0])
            finally:
                wait(others)
        finally:
            set_threads(threads)
    return [first] + [done.result() for done in others]


_blas = []  # [] until looked up, then [(get, set)] or [None]


def blas_threads() -> Optional[Tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded, or None (another BLAS, or not Linux)."""
    if not _blas:
        get = openblas.function("openblas_get_num_threads", ctypes.c_int, [])
        set_ = openblas.function("openblas_set_num_threads", None, [ctypes.c_int])
        _blas.append((get, set_) if get is not None and set_ is not None else None)
    return _blas[0]
