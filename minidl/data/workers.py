"""Worker processes that cut a loader's crops, handing them over in shared memory.

Each worker is forked (so it needs nothing pickled), opens the dataset file itself (HDF5
serialises every call within a process) and makes every count-th batch of the epoch into
its own `depth` slots of one anonymous shared mapping: the parent reads the crops in place
and sends back a token when a slot is free again. Only batch numbers and timings travel as
messages. Workers ignore Ctrl-C and die with their parent (Linux: PR_SET_PDEATHSIG; else
they notice within a second); a worker that dies ends the iteration with one line naming it.
Nothing is left in /dev/shm: the mapping is anonymous and goes with the last process.
"""
from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import signal
import time
from typing import Callable, ContextManager, Sequence

import numpy as np

from minidl.errors import MinidlError

PR_SET_PDEATHSIG = 1
PARENT_CHECK_SECONDS = 1.0
POLL_SECONDS = 0.05


class WorkerPool:
    """An epoch's batches `numbers`, made by `count` forked workers; iterate for (number, bytes, seconds).

    In each worker, `open_worker()` is a context manager giving `make(number, out)`, which writes batch
    `number` into the uint8 array `out` (`slot_bytes`) and returns how many bytes it filled. The bytes
    yielded (a view of the slot) are valid until release() or the next call; `seconds`: the worker's time.
    `memory` is every slot, one flat uint8 array; `before_unmap`, if set, is called before it goes.
    `spare_bytes` more a slot, after the worker's: `room()` is the held batch's whole slot, which the caller
    may write past the batch's bytes (e.g. to upload what goes with them in the same copy).
    """

    def __init__(self, open_worker: Callable[[], ContextManager[Callable[[int, np.ndarray], int]]],
                 numbers: Sequence[int], count: int, depth: int, slot_bytes: int, spare_bytes: int = 0) -> None:
        self.numbers, self.count, self.depth = list(numbers), min(count, len(numbers)), depth  # none: no batches
        whole = slot_bytes + spare_bytes
        self._ring = mmap.mmap(-1, max(1, self.count * depth * whole))
        self._slots = np.frombuffer(self._ring, np.uint8, self.count * depth * whole).reshape(self.count, depth, whole)
        self._next, self._held, self._room, self.workers, self._pipes = 0, None, None, [], []
        self.before_unmap = None
        context = multiprocessing.get_context("fork")
        try:
            for k in range(self.count):
                ours, theirs = context.Pipe()
                worker = context.Process(target=_work, name=f"minidl loader worker {k + 1}", daemon=True,
                                         args=(open_worker, self.numbers[k::self.count],
                                               self._slots[k, :, :slot_bytes], theirs,
                                               os.getpid(), self._pipes + [ours]))
                _fork(worker)
                theirs.close()
                self.workers.append(worker)
                self._pipes.append(ours)
        except BaseException:
            self.close()
            raise

    @property
    def memory(self) -> np.ndarray:
        return self._slots.reshape(-1)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, np.ndarray, float]:
        self.release()
        if self._pipes is None or self._next == len(self.numbers):
            self.close()
            raise StopIteration
        k, n = self._next % self.count, self._next // self.count
        message = self._receive(k)
        if message[0] == "error":
            self.close()
            raise message[1]
        _, number, filled, seconds = message
        self._held, self._next, self._room = k, self._next + 1, self._slots[k, n % self.depth]
        return number, self._room[:filled], seconds

    def room(self) -> np.ndarray:
        """The whole slot of the batch last given (its bytes first), until release() or the next call."""
        return self._room

    def release(self) -> None:
        """The slot the last batch came from may be filled again (its bytes are no longer read)."""
        if self._held is not None and self._pipes is not None:
            try:
                self._pipes[self._held].send(None)
            except OSError:  # the worker has made all its batches and gone
                pass
        self._held = None

    def _receive(self, k):
        pipe, worker = self._pipes[k], self.workers[k]
        while not pipe.poll(POLL_SECONDS):
            if worker.exitcode is not None and not pipe.poll(0):
                self._died(k)
        try:
            return pipe.recv()
        except (EOFError, OSError):  # the worker's end closed as it died
            self._died(k)

    def _died(self, k):
        worker = self.workers[k]
        worker.join(1.0)
        code = worker.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            how = f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
        else:
            how = f"exited with status {code}"
        self.close()
        raise MinidlError(f"data loader worker {k + 1} of {self.count} (pid {worker.pid}) died: {how}; "
                          "the run stops here (it resumes from its last checkpoint)")

    def close(self) -> None:
        """Stop the workers (they only read) and wait for them; unmap the shared memory."""
        for worker in self.workers:
            if worker.exitcode is None:
                worker.kill()
        for worker in self.workers:
            worker.join()
        for pipe in self._pipes or ():
            pipe.close()
        if self.before_unmap is not None and self._slots is not None:
            self.before_unmap(self.memory)
        self._pipes, self._slots, self._room = None, None, None
        try:
            self._ring.close()
        except BufferError:  # a view of a slot is still held somewhere: the mapping goes with it
            pass

    def __del__(self):
        if getattr(self, "_pipes", None) is not None:
            self.close()


def _fork(worker):
    """Start `worker` holding h5py's lock: a fork while another thread is inside h5py would copy that lock
    held, and the worker's first h5py call would wait forever."""
    try:
        from h5py._objects import phil
    except ImportError:  # another h5py layout: fork without it
        worker.start()
        return
    with phil:
        worker.start()


def _work(open_worker, numbers, slots, pipe, parent, others):
    """A worker: make each of `numbers` into the next of its slots, waiting for a slot's token when all are full."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent handles it
    _die_with(parent)
    for other in others:  # the parent's ends of earlier workers' pipes
        other.close()
    try:
        with open_worker() as make:
            for n, number in enumerate(numbers):
                if n >= len(slots) and not _wait_for_token(pipe, parent):
                    return
                start = time.perf_counter()
                filled = make(number, slots[n % len(slots)])
                pipe.send(("batch", number, filled, time.perf_counter() - start))
    except BaseException as error:  # noqa: BLE001 -- every error goes to the parent, which raises it
        _send_error(pipe, error)


def _die_with(parent):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux: _wait_for_token checks the parent instead
        pass
    if os.getppid() != parent:  # the parent was gone before prctl
        os._exit(0)


def _wait_for_token(pipe, parent):
    """Wait until the parent frees a slot; False when the parent has closed the pipe or died."""
    while not pipe.poll(PARENT_CHECK_SECONDS):
        if os.getppid() != parent:
            return False
    try:
        pipe.recv()
        return True
    except EOFError:
        return False


def _send_error(pipe, error):
    try:
        pipe.send(("error", error))
    except Exception:  # noqa: BLE001 -- an error that cannot be pickled goes as its text
        try:
            pipe.send(("error", RuntimeError(f"{type(error).__name__}: {error}")))
        except OSError:  # the parent is gone
            pass
