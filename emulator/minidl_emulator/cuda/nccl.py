"""`cupy.cuda.nccl` on emulated GPUs: the calls minidl.training.distributed makes, carried over MPI.

Each rank of an mpirun job is its own process with its own emulated GPUs, so
the collective runs between processes, as NCCL's does, but on the host memory
that stands in for device memory (MPI Allreduce at the buffers' addresses). The
interface is CuPy's: raw pointers, counts, NCCL type and op codes.

Stream order: the emulator computes every operation when it is enqueued, so
the buffer holds its packed values when allReduce is called, and the unpacking
that follows on the same stream sees the sum, as NCCL on that stream would
guarantee. The hazard checker sees the call as one operation on that stream,
reading the send buffer and writing the receive buffer (found by address among
the live allocations): a packing on another stream with nothing ordering it
before, or a use after it on another stream without waiting, is a hazard, as on
the emulator's other operations. The buffers and the stream must be on the GPU
the communicator was made on, and the buffers inside live device memory, the
same or not overlapping (NCCL leaves a partial overlap undefined).

A call refused here raises on its rank before any message: where every rank
makes the same call, as minidl.training.distributed's do, they all raise; a rank refused
alone leaves the others waiting in MPI (the emulated NCCL has no bounded wait).

MINIDL_EMULATE_NCCL=0 makes this module unimportable, as NCCL is missing from pip's CuPy.
"""
import os

import numpy as np

from minidl_emulator import cuda

EMULATE_NCCL_ENV = "MINIDL_EMULATE_NCCL"
_switch = os.environ.get(EMULATE_NCCL_ENV, "1")
if _switch not in ("0", "1"):
    raise ValueError(f"{EMULATE_NCCL_ENV}={_switch!r}: give 1 (the emulated NCCL, the default) or 0 (none)")
if _switch == "0":  # as pip's cupy-cuda12x, which ships without NCCL: the product's fallback runs
    raise ImportError(f"NCCL is off on the emulated GPUs ({EMULATE_NCCL_ENV}=0)")
from minidl_emulator.xp import ndarray

NCCL_SUM = 0
NCCL_FLOAT32, NCCL_FLOAT64 = 7, 8  # ncclFloat32, ncclFloat64, as in nccl.h
_DTYPES = {NCCL_FLOAT32: (np.float32, "FLOAT"), NCCL_FLOAT64: (np.float64, "DOUBLE")}  # NumPy's, MPI's
available = True


def get_unique_id():
    """An id naming one communicator: rank 0 makes it, the others receive it over MPI."""
    return tuple(np.random.default_rng().integers(0, 256, 128).tolist())


class NcclCommunicator:
    """One member of a communicator of `ndev` ranks; made collectively, in the same order on every rank."""

    def __init__(self, ndev, comm_id, rank):
        from mpi4py import MPI
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD.Dup()  # its own context: its messages never meet another communicator's
        if self._comm.Get_size() != ndev or self._comm.Get_rank() != rank:
            raise ValueError(f"emulated NCCL runs one rank per MPI process: ndev {ndev} and rank {rank} must be "
                             f"the MPI world's ({self._comm.Get_size()}, {self._comm.Get_rank()})")
        self._device_id = cuda.current_device_id()  # NCCL binds a communicator to the current GPU
        ids = self._comm.allgather(tuple(comm_id))
        if any(i != ids[0] for i in ids):
            raise ValueError("the ranks were given different unique ids: broadcast rank 0's")

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802 -- CuPy's name
        if op != NCCL_SUM:
            raise NotImplementedError("the emulated NCCL sums only")
        stream = cuda.stream_at(stream)
        if not stream.is_null and stream.device_id != self._device_id:
            raise ValueError(f"NCCL allReduce's stream is of emulated GPU {stream.device_id}, "
                             f"the communicator on GPU {self._device_id}")
        if count == 0:
            return  # NCCL discards an empty collective: no buffer is read
        if datatype not in _DTYPES:
            raise NotImplementedError(f"the emulated NCCL sums float32 and float64 only, not datatype {datatype}")
        dtype, mpi_type = np.dtype(_DTYPES[datatype][0]), getattr(self._mpi, _DTYPES[datatype][1])
        send, recv = (_device_array(address, count, dtype, f"NCCL allReduce's {name} is address")
                      for address, name in ((sendbuf, "sendbuf"), (recvbuf, "recvbuf")))
        for array, name in ((send, "sendbuf"), (recv, "recvbuf")):
            if array._allocation.device_id != self._device_id:
                raise ValueError(f"NCCL allReduce's {name} is on emulated GPU {array._allocation.device_id}, "
                                 f"the communicator on GPU {self._device_id}")
        if sendbuf != recvbuf and np.shares_memory(send._host, recv._host):
            raise ValueError("NCCL allReduce's sendbuf and recvbuf overlap without being the same buffer")
        with cuda.Device(self._device_id):  # enqueued on the communicator's GPU, whichever is current
            cuda.operation("collective", reads=[send], writes=[recv], stream=stream, what="NCCL allReduce")
        self._comm.Allreduce(self._mpi.IN_PLACE if sendbuf == recvbuf else [send._host, mpi_type],
                             [recv._host, mpi_type], self._mpi.SUM)  # typed: a buffer need not be aligned

    def destroy(self):
        self._comm.Free()


def _device_array(address, count, dtype, what):
    """The `count` elements at `address` in emulated device memory, as an array of their allocation."""
    allocation, raw = cuda.memory_at(address, count * dtype.itemsize, what)
    return ndarray._view(raw.view(dtype), allocation)
