"""Data parallelism across processes: MPI starts and connects the ranks, NCCL (or MPI) sums the gradients.

`mpirun -n N minidl train MODEL --data-parallel` starts N ranks, each a full replica
on its own devices (as ChainerMN and PyTorch DDP). Each step every rank trains on its
shard of the global batch (Loader(shard=...)), the gradients are averaged over the
ranks in a few flat buckets (GradientBuckets), and every rank applies the same update.
Transports per bucket: MPI on the CPU; NCCL (cupy.cuda.nccl) on a reduce stream per GPU, or
without NCCL, MPI on a host copy. Every wait is bounded (MINIDL_PARALLEL_TIMEOUT s,
default 600): a hung rank ends the job in one line; a dead one, Open MPI ends it.
"""
import importlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from minidl.core import Tensor
from minidl.device import Device, cupy
from minidl.errors import MinidlError
from minidl.functions.transfer import copy_array

BUCKET_BYTES = 25 * 2 ** 20  # DDP's default: few enough calls to amortise latency, small enough to pipeline
TIMEOUT_ENV = "MINIDL_PARALLEL_TIMEOUT"


class Solo:
    """The world of a single process: every collective is the identity, so the trainer has one code path."""
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def sum(self, values: Sequence[float]) -> np.ndarray:
        return np.asarray(values, dtype=np.float64)

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def barrier(self) -> None:
        pass

    def broadcast_params(self, params: Iterable[Tensor]) -> None:
        pass

    def gradient_buckets(self, params: Sequence[Tensor]) -> "GradientBuckets | None":
        return None


def wait_limit() -> float:
    """Seconds a rank waits for the others (MINIDL_PARALLEL_TIMEOUT, default 600): a positive number."""
    text = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0:  # NaN too: a deadline of NaN never comes, and a hung job would never end
        raise MinidlError(f"{TIMEOUT_ENV}={text!r}: give seconds, e.g. 600")
    return seconds


class World(Solo):
    """The ranks mpirun started: MPI.COMM_WORLD, with bounded waits."""
    joined = None  # the World this process joined, if any (the command line asks it for the rank)

    def __init__(self) -> None:
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise MinidlError(f"--data-parallel needs mpi4py ({e}): pip install -e '.[mpi]'") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this host share its GPUs
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        World.joined = self
        self.timeout = wait_limit()

    def wait(self, request, what: str) -> None:
        """Wait for a nonblocking MPI collective, at most `timeout` seconds."""
        self.wait_until(request.Test, what)

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Poll `done()` for at most `timeout` seconds, then end the job: a hung rank must not hang the others."""
        # a growing sleep: a reduce usually completes microseconds after the last rank arrives,
        # and an idle rank should not burn a core
        deadline, pause = time.monotonic() + self.timeout, 1e-5
        while not done():
            if time.monotonic() > deadline:
                sys.stderr.write(f"error: rank {self.rank}: no answer from the other ranks for {self.timeout:g} s "
                                 f"during {what}: a rank died or hangs; stopping the job (the last checkpoint "
                                 f"is intact: continue with --resume)\n")
                self.abort(1)
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def abort(self, status: int) -> None:
        """End every rank of the job now, this one with `status` (what it printed is flushed first)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(status)

    def allreduce(self, array: np.ndarray, op=None, what: str = "a reduction") -> np.ndarray:
        """Sum (or `op`) a NumPy array over the ranks, in place."""
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, array, op or self.MPI.SUM), what)
        return array

    def sum(self, values: Sequence[float]) -> np.ndarray:
        return self.allreduce(np.array(values, dtype=np.float64), what="summing the statistics")

    def any(self, flag: bool) -> bool:
        return bool(self.allreduce(np.array([int(bool(flag))], dtype=np.int64), self.MPI.MAX,
                                   "checking the step for non-finite values")[0])

    def barrier(self) -> None:
        self.wait(self.comm.Ibarrier(), "waiting for rank 0")

    def broadcast_params(self, params: Iterable[Tensor]) -> None:
        """Every replica starts from rank 0's weights (a resumed run's ranks read the same file; no matter)."""
        for p in params:
            host = np.ascontiguousarray(p.numpy())
            self.wait(self.comm.Ibcast(host, root=0), "broadcasting the initial weights")
            with p.device:
                p.data = p.device.xp.asarray(host) if p.device.is_cuda else host

    def gradient_buckets(self, params: Sequence[Tensor]) -> "GradientBuckets":
        return GradientBuckets(params, self)


def rank_device_map(world: Solo, requested: str | None, gpus: int) -> dict[int, int]:
    """This rank's device map, logical cuda:i -> physical GPU local_rank * k + (i mod k) of its node's `gpus`.

    k, the GPUs per rank, is what `requested` (--devices) names (cuda:0,cuda:1: two; cuda:0: one), or by
    default the node's GPUs shared out evenly. Empty where nothing is shared out (no GPU, or the CPU only).
    Pure: the caller applies it (minidl.device.set_device_map) before any device is resolved.
    """
    names = [n.strip().lower() for n in (requested or "").split(",") if n.strip()]
    if gpus == 0 or (names and all(n == "cpu" for n in names)):
        return {}  # both towers on the CPU: nothing to share out
    indices = {int(n.split(":")[1]) if ":" in n else 0 for n in names if n.startswith("cuda")}
    k = max(indices) + 1 if indices else min(2, gpus // world.local_size)
    if k < 1 or world.local_size * k > gpus:
        raise MinidlError(f"{world.local_size} ranks on this host with {max(k, 1)} GPU(s) each need "
                          f"{world.local_size * max(k, 1)} GPUs; it has {gpus}: start fewer ranks per host, "
                          "or give --devices cuda:0 (one GPU per rank) or cpu")
    return {i: world.local_rank * k + i % k for i in range(max(gpus, k))}


class GradientBuckets:
    """The gradients of a replica, packed into a few flat buffers per device and averaged over the ranks.

    A bucket's sum starts during backward, from the parameters' grad hooks, once each of its
    parameters has a gradient for every use in this step's forward (Tensor.uses). Buckets start
    in one fixed order on every rank, the reverse of the parameters'. On a GPU the sums run on a
    stream of their own, ordered by events after the packing and before the unpacking. Every
    backward must be followed by `average()`, which starts the rest (a missing gradient counts as
    zero) and leaves the means in the gradients (on a GPU, ordered on its stream: `settle()` waits,
    bounded, before a blocking read). `close()` takes the hooks off.
    """

    def __init__(self, params: Sequence[Tensor], world: World, bucket_bytes: int = BUCKET_BYTES,
                 overlap: bool = True) -> None:
        self.world = world
        self.buckets = []  # (device, flat buffer, [(param, offset in elements)]), in parameter order
        for dev, dtype, nbytes, members in _groups(params, bucket_bytes):
            with dev:
                self.buckets.append((dev, dev.xp.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype), members))
        # in the same order on every rank: making a NCCL communicator is a collective call
        self.reducers = {dev: reducer_for(dev, world) for dev, _, _ in self.buckets}
        self.streams = {dev: _reduce_stream(dev) for dev in self.reducers if dev.is_cuda}
        self.reduced = {}  # device -> an event on its reduce stream after the last averaging's sums
        self.poison = None  # (device, array): added to the next step's first bucket (include())
        self.order = list(reversed(range(len(self.buckets))))  # the start order, the same on every rank
        self.bucket_of = {id(p): k for k, (_, _, members) in enumerate(self.buckets) for p, _ in members}
        self.hooked = [p for _, _, members in self.buckets for p, _ in members] if overlap else []
        for p in self.hooked:
            p.grad_hooks.append(self._arrived)
        self._new_step()

    def close(self) -> None:
        """Take this object's grad hooks off the parameters (average() still works, after backward)."""
        for p in self.hooked:
            p.grad_hooks.remove(self._arrived)
        self.hooked = []

    def __enter__(self) -> "GradientBuckets":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _new_step(self):
        # the uses recorded before this step's forward: the step's own are p.uses minus these
        self.earlier_uses = {id(p): p.uses for p in self.hooked}
        self.arrivals = dict.fromkeys(self.bucket_of, 0)
        self.missing = [len(members) for _, _, members in self.buckets]  # parameters short of their uses
        self.waits = {}  # bucket -> the function that waits for its sum, in the order started
        self.next = 0  # the position in self.order of the next bucket to start

    def _arrived(self, p):
        """The grad hook: count the gradient in; start the buckets that are complete, in order."""
        key = id(p)
        self.arrivals[key] += 1
        if self.arrivals[key] == p.uses - self.earlier_uses[key]:
            self.missing[self.bucket_of[key]] -= 1
            while self.next < len(self.order) and self.missing[self.order[self.next]] == 0:
                self._start(self.order[self.next])
                self.next += 1

    def include(self, value, device: Device) -> None:
        """Make the next averaged gradients NaN on every rank if `value` (an array on `device`) is not
        finite on this one: the ranks then judge a step alike without a read (a rank's bad loss)."""
        with device:
            self.poison = (device, value * 0)  # 0, or NaN

    def _start(self, k):
        """Pack bucket k from its parameters' gradients on the compute stream, then start its sum over
        the ranks on the device's reduce stream, after the packing: backward goes on meanwhile."""
        dev, flat, members = self.buckets[k]
        with dev:
            for p, offset in members:
                part = flat[offset:offset + p.size]
                if p.grad is None:
                    part.fill(0)
                else:
                    part[...] = p.grad.data.reshape(-1)
            if self.poison is not None:  # the step's first bucket carries it
                where, value = self.poison
                flat[:1] += value if where is dev else copy_array(value, where, dev)
                self.poison = None
            stream = self.streams.get(dev)
            if stream is not None:
                stream.wait_event(dev.stream.record())
            self.waits[k] = self.reducers[dev](flat, stream)

    def average(self) -> None:
        """Replace each parameter's gradient by its mean over the ranks (a missing one counts as zero)."""
        try:
            while self.next < len(self.order):  # what the hooks did not start, in the same order
                self._start(self.order[self.next])
                self.next += 1
            for k in list(self.waits):  # every rank started the same buckets in the same order
                self.waits.pop(k)()
            for dev, stream in self.streams.items():  # the unpacking, on the compute stream, after the sums
                with dev:
                    self.reduced[dev] = stream.record()
                    dev.stream.wait_event(self.reduced[dev])
            self._unpack()
        finally:
            self.poison = None
            self._new_step()

    def settle(self) -> None:
        """Wait (bounded) until the last averaging is done on the devices: call before a blocking read,
        which would wait for ever on NCCL waiting for a rank that died or hangs."""
        for dev, event in self.reduced.items():
            self.world.wait_until(lambda: event.done, f"averaging the gradients on {dev}")
        self.reduced = {}

    def _unpack(self):
        scale = 1.0 / self.world.size
        for dev, flat, members in self.buckets:
            with dev:
                flat *= flat.dtype.type(scale)
                for p, offset in members:
                    if p.grad is None:  # another rank may have one: this rank must update alike
                        p.grad = Tensor(dev.xp.zeros_like(p.data), device=dev)
                    p.grad.data[...] = flat[offset:offset + p.size].reshape(p.shape)


def _groups(params, bucket_bytes):
    """[device, dtype, bytes, [(param, offset in elements)]]: runs of consecutive parameters alike."""
    groups = []
    for p in params:
        if not groups or groups[-1][:2] != [p.device, p.dtype] or groups[-1][2] + p.data.nbytes > bucket_bytes:
            groups.append([p.device, p.dtype, 0, []])
        group = groups[-1]
        group[3].append((p, group[2] // p.data.itemsize))
        group[2] += p.data.nbytes
    return groups


Reducer = Callable[[object, object], Callable[[], None]]


def _reduce_stream(dev: Device):
    """The stream a GPU's sums run on, beside its compute stream (non-blocking: ordered by events only)."""
    with dev:
        return dev.xp.cuda.Stream(non_blocking=True)


def reducer_for(dev: Device, world: World) -> Reducer:
    """A function starting the sum over the ranks of a flat buffer on `dev`, in place, on a stream (None
    on the CPU): the device's transport.

    It returns a function that waits (bounded) until the sum is in the buffer, or, on a GPU,
    until it is ordered on that stream (the host bounds that wait in settle()).
    """
    if not dev.is_cuda:
        return _over_mpi(world)
    nccl = nccl_module()
    return _over_host(dev, world) if nccl is None else _over_nccl(dev, world, nccl)


WHAT = "averaging the gradients"


def _over_mpi(world):
    def over_mpi(flat, stream):
        request = world.comm.Iallreduce(world.MPI.IN_PLACE, flat, world.MPI.SUM)
        return lambda: world.wait(request, WHAT)
    return over_mpi


def _over_host(dev, world):
    """Without NCCL: MPI on a host copy (slower, but the job runs)."""
    def over_host(flat, stream):
        with dev:  # read back and written on the reduce stream, after the packing, before the unpacking
            host = flat.get(stream=stream)
        request = world.comm.Iallreduce(world.MPI.IN_PLACE, host, world.MPI.SUM)

        def done():
            world.wait(request, WHAT)
            with dev:  # never the legacy stream: it would be unordered with the non-blocking ones
                flat.set(host, stream=stream)
        return done
    return over_host


def _over_nccl(dev, world, nccl):
    unique_id = world.comm.bcast(nccl.get_unique_id() if world.rank == 0 else None, root=0)
    with dev:  # the communicator binds to the current GPU
        comm = nccl.NcclCommunicator(world.size, unique_id, world.rank)
    kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def over_nccl(flat, stream):  # enqueued on the reduce stream: after the packing, before the unpacking
        # (the emulated NCCL computes it here, blocking, as the emulator computes every operation when enqueued)
        comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kinds[flat.dtype], nccl.NCCL_SUM, stream.ptr)
        return lambda: None
    return over_nccl


def nccl_module():
    """cupy.cuda.nccl (on emulated GPUs, the emulator's), or None where NCCL is missing."""
    try:
        nccl = importlib.import_module(cupy().cuda.__name__ + ".nccl")
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None
