"""`cupy.cuda.nccl` on emulated GPUs: the calls minidl.parallel makes, carried over MPI.

Each rank of an mpirun job is its own process with its own emulated GPUs, so
the collective runs between processes, as NCCL's does, but on the host memory
that stands in for device memory (MPI Allreduce in place at the buffer's
address). The interface is CuPy's: raw pointers, counts, NCCL type and op codes.

Stream order: the emulator computes every operation when it is enqueued, so
the buffer holds its packed values when allReduce is called, and the unpacking
that follows on the same stream sees the sum, as NCCL on that stream would
guarantee. The emulator's hazard checker does not see these accesses (it knows
arrays, not addresses); the buffer is touched only on the stream it is passed.
"""
import ctypes

import numpy as np

NCCL_SUM = 0
NCCL_FLOAT32, NCCL_FLOAT64 = 7, 8  # ncclFloat32, ncclFloat64, as in nccl.h
_DTYPES = {NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
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
        ids = self._comm.allgather(tuple(comm_id))
        if any(i != ids[0] for i in ids):
            raise ValueError("the ranks were given different unique ids: broadcast rank 0's")

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802 -- CuPy's name
        if op != NCCL_SUM:
            raise NotImplementedError("the emulated NCCL sums only")
        dtype = np.dtype(_DTYPES[datatype])
        send, recv = (_at(address, count, dtype) for address in (sendbuf, recvbuf))
        self._comm.Allreduce(self._mpi.IN_PLACE if sendbuf == recvbuf else send, recv, self._mpi.SUM)

    def destroy(self):
        self._comm.Free()


def _at(address, count, dtype):
    """The emulated device memory at `address`: a NumPy view of `count` elements."""
    if count == 0:
        return np.empty(0, dtype)
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count)
