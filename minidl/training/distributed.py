"""Data parallelism across processes: MPI starts and connects the ranks, NCCL (or MPI) sums the gradients.

`mpirun -n N minidl train MODEL --data-parallel` starts N ranks, each a full
replica of the model on its own devices (the design of ChainerMN and of PyTorch
DDP). Each step every rank trains on its shard of the global batch, the
gradients are averaged across ranks in a few large flat buckets, and every rank
applies the same update to the same weights, so the replicas never drift. A
bucket's reduce starts during the backward pass, from the parameters' grad
hooks, as soon as all its gradients are in (see GradientBuckets).

Transports, chosen per bucket by the device it lives on:
- CPU: MPI Iallreduce on the NumPy bucket, waited for after backward;
- GPU: NCCL (cupy.cuda.nccl, the unique id broadcast over MPI) on the device's
  stream; on emulated GPUs the emulator's cuda.nccl, the same interface over MPI;
  without NCCL, MPI on a host copy of the bucket.

A rank that dies makes Open MPI end the job (mpirun reports which rank); a rank
that hangs is caught by the bounded wait of every MPI collective here and of the
NCCL reduce (MINIDL_PARALLEL_TIMEOUT seconds, default 600), which aborts the job
in one line. (The emulated NCCL blocks in MPI instead: under emulation only a
dead rank, not a hung one, ends a reduce early.)
"""
import importlib
import math
import os
import sys
import time

import numpy as np

from minidl.core import Tensor
from minidl.data import Loader
from minidl.data.dataset import open_dataset
from minidl.data.loader import AUGMENT_STREAM
from minidl.device import cupy, gpu_count, set_device_map
from minidl.errors import MinidlError

BUCKET_BYTES = 25 * 2 ** 20  # DDP's default: few enough calls to amortise latency, small enough to pipeline
TIMEOUT_ENV = "MINIDL_PARALLEL_TIMEOUT"


class Solo:
    """The world of a single process: every collective is the identity, so the trainer has one code path."""
    rank, size, local_rank, local_size = 0, 1, 0, 1

    def sum(self, values):
        return np.asarray(values, dtype=np.float64)

    def any(self, flag):
        return bool(flag)

    def barrier(self):
        pass

    def broadcast_params(self, params):
        pass

    def gradient_buckets(self, params):
        return None


def wait_limit():
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

    def __init__(self):
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

    def wait(self, request, what):
        """Wait for a nonblocking MPI collective, at most `timeout` seconds."""
        self.wait_until(request.Test, what)

    def wait_until(self, done, what):
        """Poll `done()` for at most `timeout` seconds, then end the job: a hung rank must not hang the others.

        Polls with a growing sleep: a step's reduce usually completes within
        microseconds of the last rank arriving, and an idle rank should not burn a core.
        """
        deadline, pause = time.monotonic() + self.timeout, 1e-5
        while not done():
            if time.monotonic() > deadline:
                sys.stderr.write(f"error: rank {self.rank}: no answer from the other ranks for {self.timeout:g} s "
                                 f"during {what}: a rank died or hangs; stopping the job (the last checkpoint "
                                 f"is intact: continue with --resume)\n")
                self.abort(1)
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def abort(self, status):
        """End every rank of the job now, this one with `status` (what it printed is flushed first)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(status)

    def allreduce(self, array, op=None, what="a reduction"):
        """Sum (or `op`) a NumPy array over the ranks, in place."""
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, array, op or self.MPI.SUM), what)
        return array

    def sum(self, values):
        return self.allreduce(np.array(values, dtype=np.float64), what="summing the statistics")

    def any(self, flag):
        return bool(self.allreduce(np.array([int(bool(flag))], dtype=np.int64), self.MPI.MAX,
                                   "checking the step for non-finite values")[0])

    def barrier(self):
        self.wait(self.comm.Ibarrier(), "waiting for rank 0")

    def broadcast_params(self, params):
        """Every replica starts from rank 0's weights (a resumed run's ranks read the same file; no matter)."""
        for p in params:
            host = np.ascontiguousarray(p.numpy())
            self.wait(self.comm.Ibcast(host, root=0), "broadcasting the initial weights")
            with p.device:
                p.data = p.device.xp.asarray(host) if p.device.is_cuda else host

    def gradient_buckets(self, params):
        return GradientBuckets(params, self)


def rank_device_map(world, requested):
    """Point logical cuda:i at this rank's slice of its node's GPUs: GPU local_rank * k + (i mod k).

    k, the GPUs per rank, is what --devices names (cuda:0,cuda:1: two; cuda:0: one), or by default
    the node's GPUs shared out evenly. Returns nothing; the devices are resolved as usual afterwards.
    """
    names = [n.strip().lower() for n in (requested or "").split(",") if n.strip()]
    count = gpu_count()
    if count == 0 or (names and all(n == "cpu" for n in names)):
        return  # both towers on the CPU: nothing to share out
    indices = {int(n.split(":")[1]) if ":" in n else 0 for n in names if n.startswith("cuda")}
    k = max(indices) + 1 if indices else min(2, count // world.local_size)
    if k < 1 or world.local_size * k > count:
        raise MinidlError(f"{world.local_size} ranks on this host with {max(k, 1)} GPU(s) each need "
                          f"{world.local_size * max(k, 1)} GPUs; it has {count}: start fewer ranks per host, "
                          "or give --devices cuda:0 (one GPU per rank) or cpu")
    set_device_map({i: world.local_rank * k + i % k for i in range(max(count, k))})


class ShardedLoader(Loader):
    """This rank's rows of each global batch: the same batches as one process, split between the ranks.

    A rank takes a contiguous run of each batch's sorted positions (a forward
    sweep through the file, as the Loader reads). Its augmentation must be the
    one a single process gives those rows, so the crops and lighting are drawn
    for the whole batch from the Loader's (seed, epoch, batch) generator and
    this rank keeps its rows; only its own images are read, the others' rows
    stay blank. This costs N-fold augmentation arithmetic (cheap, in the
    background thread) and buys exact equivalence with one process.
    """

    def __init__(self, *args, rank, size, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.size = rank, size

    def _mine(self, count):
        return np.array_split(np.arange(count), self.size)[self.rank]

    def _read_batches(self, epoch, start):
        with open_dataset(self.path) as f:
            images = f["images"]
            for i, positions in enumerate(self.batch_positions(epoch)[start:], start=start):
                mine = self._mine(len(positions))
                own = np.stack([images[index] for index in self.indices[positions[mine]]]) if len(mine) else \
                    np.zeros((0,) + images.shape[1:], images.dtype)
                if not self.augment:  # no random draws: this rank's rows alone give the same input
                    if len(mine):  # a last batch smaller than the ranks leaves some without rows
                        yield self.make_batch(own, None), self.labels[positions[mine]]
                    continue
                batch = np.zeros((len(positions),) + images.shape[1:], images.dtype)
                batch[mine] = own
                rng = np.random.default_rng([self.seed, epoch, AUGMENT_STREAM, i])  # as Loader._read_batches
                yield self.make_batch(batch, rng)[mine], self.labels[positions[mine]]


class GradientBuckets:
    """The gradients of a replica, packed into a few flat buffers per device and averaged over the ranks.

    The reduce overlaps the backward pass, as in DDP: each parameter's grad hook
    counts its gradient in; once every parameter of a bucket has its gradients, the
    bucket is packed and its sum started without waiting (MPI Iallreduce on the CPU,
    NCCL's allReduce enqueued on the device's stream on a GPU). `average()`, after
    backward, starts whatever the hooks did not (a parameter without a gradient
    counts as zero), waits for all of it with the bounded wait, and unpacks the means.

    Buckets start in one fixed order, the reverse of the parameters' (backward
    reaches the last layers first): every rank must issue its collectives in the
    same order, and two ranks' backward passes may finish independent branches in
    different orders. A bucket ready early waits for the ones before it.

    A parameter used twice in the forward gets its gradient in two parts. A
    bucket waits for as many arrivals as the parameter had uses in an earlier step
    (one at first); a step that brings more (the first step, for a shared weight)
    makes every rank reduce that parameter's bucket once more after backward, from
    the final gradients (the counts are the same on every rank, so the extra
    collectives are too), and the bucket waits for the new count from then on.
    Every backward must be followed by `average()`: it ends the step.
    """

    def __init__(self, params, world, bucket_bytes=BUCKET_BYTES, overlap=True):
        self.world = world
        groups = []  # [device, dtype, bytes, [(param, offset in elements)]]: consecutive parameters alike
        for p in params:
            if not groups or groups[-1][:2] != [p.device, p.dtype] or groups[-1][2] + p.data.nbytes > bucket_bytes:
                groups.append([p.device, p.dtype, 0, []])
            group = groups[-1]
            group[3].append((p, group[2] // p.data.itemsize))
            group[2] += p.data.nbytes
        self.buckets = []  # (device, flat buffer, members), in parameter order
        for dev, dtype, nbytes, members in groups:
            with dev:
                self.buckets.append((dev, dev.xp.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype), members))
        # in the same order on every rank: making a NCCL communicator is a collective call
        self.reducers = {dev: reducer_for(dev, world) for dev, _, _ in self.buckets}
        self.order = list(reversed(range(len(self.buckets))))  # the start order, the same on every rank
        self.bucket_of = {id(p): k for k, (_, _, members) in enumerate(self.buckets) for p, _ in members}
        self.uses = dict.fromkeys(self.bucket_of, 1)  # gradient arrivals that complete a parameter
        self.overlap = overlap
        if overlap:
            for _, _, members in self.buckets:
                for p, _ in members:
                    p.grad_hooks.append(self._arrived)
        self._new_step()

    def _new_step(self):
        self.arrivals = dict.fromkeys(self.bucket_of, 0)
        self.missing = [len(members) for _, _, members in self.buckets]  # parameters short of their uses
        self.waits = {}  # bucket -> the function that waits for its sum, in the order started
        self.next = 0  # the position in self.order of the next bucket to start

    def _arrived(self, p):
        """The grad hook: count the gradient in; start the buckets that are complete, in order."""
        key = id(p)
        self.arrivals[key] += 1
        if self.arrivals[key] == self.uses[key]:
            k = self.bucket_of[key]
            self.missing[k] -= 1
            while self.next < len(self.order) and self.missing[self.order[self.next]] == 0:
                self._start(self.order[self.next])
                self.next += 1

    def _start(self, k):
        """Pack bucket k from its parameters' gradients and start its sum over the ranks."""
        dev, flat, members = self.buckets[k]
        with dev:
            for p, offset in members:
                part = flat[offset:offset + p.size]
                if p.grad is None:
                    part.fill(0)
                else:
                    part[...] = p.grad.data.reshape(-1)
            self.waits[k] = self.reducers[dev](flat)

    def average(self):
        """Replace each parameter's gradient by its mean over the ranks (a missing one counts as zero)."""
        try:
            while self.next < len(self.order):  # what the hooks did not start, in the same order
                self._start(self.order[self.next])
                self.next += 1
            extra = {key for key, n in self.arrivals.items() if n > self.uses[key]}  # a weight used more often
            for key in extra:
                self.uses[key] = self.arrivals[key]
            again = [k for k in self.order if any(id(p) in extra for p, _ in self.buckets[k][2])]
            for k in list(self.waits):  # every rank started the same buckets in the same order
                self.waits.pop(k)()
            for k in again:  # packed before its last gradient arrived, maybe: once more, from the final ones
                self._start(k)
                self.waits.pop(k)()
            self._unpack()
        finally:
            self._new_step()

    def _unpack(self):
        scale = 1.0 / self.world.size
        reduced = []  # (device, event after its last bucket)
        for dev, flat, members in self.buckets:
            with dev:
                flat *= flat.dtype.type(scale)
                for p, offset in members:
                    if p.grad is None:  # another rank may have one: this rank must update alike
                        p.grad = Tensor(dev.xp.zeros_like(p.data), device=dev)
                    p.grad.data[...] = flat[offset:offset + p.size].reshape(p.shape)
                if dev.is_cuda:
                    reduced.append((dev, dev.stream.record()))
        # NCCL waits on the device for a peer that never comes: the host bounds that wait here,
        # where the next step (the gradient norm) would block on the stream anyway
        for dev, event in reduced:
            self.world.wait_until(lambda: event.done, f"averaging the gradients on {dev}")


def reducer_for(dev, world):
    """A function starting the sum of a flat buffer on `dev` over the ranks, in place: the transport of the device.

    It returns a function that waits (bounded) until the sum is in the buffer, or, for NCCL,
    until it is ordered on the device's stream (the host bounds that wait after unpacking).
    """
    what = "averaging the gradients"
    if not dev.is_cuda:
        def over_mpi(flat):
            request = world.comm.Iallreduce(world.MPI.IN_PLACE, flat, world.MPI.SUM)
            return lambda: world.wait(request, what)
        return over_mpi
    nccl = nccl_module()
    if nccl is None:  # MPI on a host copy: slower, but the job runs
        def over_host(flat):
            host = flat.get()
            request = world.comm.Iallreduce(world.MPI.IN_PLACE, host, world.MPI.SUM)

            def done():
                world.wait(request, what)
                flat.set(host)
            return done
        return over_host
    unique_id = world.comm.bcast(nccl.get_unique_id() if world.rank == 0 else None, root=0)
    with dev:  # the communicator binds to the current GPU
        comm = nccl.NcclCommunicator(world.size, unique_id, world.rank)
    kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def over_nccl(flat):  # enqueued on the device's stream: ordered after the packing, before the unpacking
        # (the emulated NCCL computes it here, blocking, as the emulator computes every operation when enqueued)
        comm.allReduce(flat.data.ptr, flat.data.ptr, flat.size, kinds[flat.dtype], nccl.NCCL_SUM, dev.stream.ptr)
        return lambda: None
    return over_nccl


def nccl_module():
    """cupy.cuda.nccl (on emulated GPUs, the emulator's), or None where NCCL is missing."""
    try:
        nccl = importlib.import_module(cupy().cuda.__name__ + ".nccl")
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None
