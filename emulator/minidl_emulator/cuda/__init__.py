"""`cupy.cuda` on emulated GPUs: devices, streams, events, the memory pool and its hooks, the runtime's pitched
copy between device arrays (runtime.memcpy2DAsync), and cuBLAS's strided-batched GEMM (cuda.cublas, imported on
first use as in CuPy).

Like CuPy, the current device and each device's current stream are per thread,
a stream belongs to the device that was current when it was made, and every
operation runs on the current stream of the current device, reading arrays of
that device only (no peer access). Device memory is counted against a limit
per GPU (MINIDL_EMULATE_GPU_MEMORY, in GiB) and fresh memory is filled with
NaN (floats) or a sentinel (integers), so a read of memory nobody wrote shows.
"""
import bisect
import collections
import ctypes
import itertools
import os
import threading
import time
import weakref

import ml_dtypes
import numpy as np

from minidl_emulator import ledger, streams

DEFAULT_MEMORY_GIB = 6.0
_serial = itertools.count(16)  # stream and event handles; CUDA reserves 1 and 2 for default streams
_byte_bounds = getattr(np, "byte_bounds", None) or np.lib.array_utils.byte_bounds  # NumPy 1 or 2
_state = threading.local()
_gpu_count = 0


def configure(gpus):
    """Start `gpus` fresh emulated GPUs (forgets streams, hazards and counts)."""
    global _gpu_count
    _gpu_count = gpus
    streams.reset()
    work.clear()
    ledger.LEDGER.clear()
    _used.clear()


def memory_limit():
    return int(float(os.environ.get("MINIDL_EMULATE_GPU_MEMORY", DEFAULT_MEMORY_GIB)) * 2 ** 30)


class CUDARuntimeError(RuntimeError):
    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status  # the cudaError_t, as CuPy's error carries it


ERROR_PEER_ACCESS_ALREADY_ENABLED = 704  # cudaErrorPeerAccessAlreadyEnabled
_peer_enabled = set()  # (device, peer): `device` may read and write memory of `peer` (deviceEnablePeerAccess)


def peer_access_possible() -> bool:
    """Whether the emulated GPUs reach each other's memory (an NVLink board): yes, unless
    MINIDL_EMULATE_PEER_ACCESS=0 (GPUs on a PCIe bus without peer access)."""
    return os.environ.get("MINIDL_EMULATE_PEER_ACCESS", "1") != "0"


class runtime:  # noqa: N801 -- cupy.cuda.runtime is a module; a namespace serves
    CUDARuntimeError = CUDARuntimeError

    @staticmethod
    def getDeviceCount():  # noqa: N802 -- CuPy's name
        return _gpu_count

    @staticmethod
    def memGetInfo():  # noqa: N802 -- CuPy's name: (free, total) bytes of the current device
        return memory_limit() - _used[current_device_id()], memory_limit()

    @staticmethod
    def hostRegister(ptr, size, flags):  # noqa: N802 -- CuPy's name
        """Page-lock existing host memory: copies from or into it are then charged as pinned. As CUDA does,
        refuse an empty range and memory that is already registered (cudaErrorHostMemoryAlreadyRegistered)."""
        if size <= 0:
            raise CUDARuntimeError("cudaErrorInvalidValue: hostRegister of an empty range")
        if ledger.pinned_range_overlaps(ptr, size):
            raise CUDARuntimeError("cudaErrorHostMemoryAlreadyRegistered: part of this host memory is "
                                   "already page-locked")
        ledger.register_pinned_range(ptr, size)

    @staticmethod
    def hostUnregister(ptr):  # noqa: N802 -- CuPy's name
        if not ledger.unregister_pinned_range(ptr):
            raise CUDARuntimeError("cudaErrorHostMemoryNotRegistered: this host memory was not registered")

    errorPeerAccessAlreadyEnabled = ERROR_PEER_ACCESS_ALREADY_ENABLED

    @staticmethod
    def deviceCanAccessPeer(device, peerDevice):  # noqa: N802,N803 -- CuPy's names
        """1 between two emulated GPUs (NVLink), unless peer_access_possible() says not: then 0, and a kernel's
        operand on another GPU is an error (copies between them still run, staged through host memory)."""
        _check_device(device)
        _check_device(peerDevice)
        return int(device != peerDevice and peer_access_possible())

    @staticmethod
    def deviceEnablePeerAccess(peerDevice):  # noqa: N802,N803 -- CuPy's names
        """The current GPU may now read and write memory of `peerDevice` in its operations, as CUDA allows."""
        _check_device(peerDevice)
        device = current_device_id()
        if not runtime.deviceCanAccessPeer(device, peerDevice):
            raise CUDARuntimeError("cudaErrorPeerAccessUnsupported: no peer access between these emulated GPUs")
        if (device, peerDevice) in _peer_enabled:
            raise CUDARuntimeError("cudaErrorPeerAccessAlreadyEnabled: peer access has already been enabled",
                                   ERROR_PEER_ACCESS_ALREADY_ENABLED)
        _peer_enabled.add((device, peerDevice))

    @staticmethod
    def memcpy2DAsync(dst, dpitch, src, spitch, width, height, kind, stream):  # noqa: N802 -- CuPy's name
        """cudaMemcpy2DAsync: `height` rows of `width` bytes from address `src` (rows `spitch` bytes apart) to
        `dst` (rows `dpitch` apart), on the stream whose handle is `stream` (see memcpy_2d)."""
        memcpy_2d(dst, dpitch, src, spitch, width, height, kind, stream)

    # cudaDataType codes (cupy_backends/cuda/api/_runtime_enum.pxd), which cuBLAS's Ex calls take
    CUDA_R_32F, CUDA_R_64F, CUDA_R_16F, CUDA_R_16BF = 0, 1, 2, 14
    # cudaMemcpyKind (cupy_backends/cuda/api/runtime.pxd)
    memcpyHostToHost, memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice, memcpyDefault = 0, 1, 2, 3, 4


def __getattr__(name):
    """cupy.cuda.cublas, imported when first asked for, as CuPy's cupy/cuda/__init__.py does."""
    if name == "cublas":  # importing the submodule sets the attribute, so this runs once
        import importlib
        return importlib.import_module(f"{__name__}.cublas")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- devices

def current_device_id():
    return getattr(_state, "device", 0)


def _check_device(device_id):
    if not 0 <= device_id < _gpu_count:
        raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {device_id} "
                               f"({_gpu_count} emulated GPU(s))")


class Device:
    def __init__(self, device=None):
        self.id = current_device_id() if device is None else int(device)
        self._previous = []

    def __repr__(self):
        return f"<CUDA Device {self.id} (emulated)>"

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def use(self):
        _check_device(self.id)
        _state.device = self.id

    def __enter__(self):
        _check_device(self.id)
        self._previous.append(current_device_id())
        _state.device = self.id
        return self

    def __exit__(self, *exc):
        _state.device = self._previous.pop()
        return False

    def synchronize(self):
        ledger.record_sync(self.id, -1, "Device.synchronize")
        for timeline in streams._timelines_of(self.id):
            streams.host_waits_for(timeline.snapshot())


CUBLAS_HANDLE_BASE = 0xCB1A5000  # the cuBLAS handle of GPU d is CUBLAS_HANDLE_BASE + d (CuPy keeps one per device)


def get_cublas_handle():
    """cupy.cuda.device.get_cublas_handle (also cupy.cuda.get_cublas_handle): the current GPU's handle."""
    _check_device(current_device_id())
    return CUBLAS_HANDLE_BASE + current_device_id()


class device:  # noqa: N801 -- cupy.cuda.device, the part of it used
    Device = Device
    get_cublas_handle = staticmethod(get_cublas_handle)


# --- streams and events

def _stream_stack(device_id):
    stacks = getattr(_state, "streams", None)
    if stacks is None:
        stacks = _state.streams = {}
    return stacks.setdefault(device_id, [])


class Stream:
    """A stream of the device current when it is made; Stream.null is each GPU's legacy default stream."""

    null = None  # set below

    def __init__(self, null=False, non_blocking=False, ptds=False):
        if ptds:
            raise NotImplementedError("the emulator models the legacy default stream, not per-thread ones")
        self.is_null = null
        self.non_blocking = non_blocking
        self.device_id = -1 if null else current_device_id()
        if not null:
            _check_device(self.device_id)
            self._timeline = streams.new_timeline(self.device_id, "non-blocking" if non_blocking else "blocking")
        self.ptr = 0 if null else next(_serial)
        if not null:
            _streams_by_handle[self.ptr] = self

    @property
    def timeline(self):
        return streams.legacy_timeline(current_device_id()) if self.is_null else self._timeline

    def __repr__(self):
        return f"<Stream {self.ptr} (device {self.device_id}, emulated)>"

    def __eq__(self, other):
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self):
        return hash(self.ptr)

    def __enter__(self):
        device_id = current_device_id()
        if not self.is_null and self.device_id != device_id:
            raise RuntimeError(f"this stream belongs to device {self.device_id}, "
                               f"but the current device is {device_id}")
        _stream_stack(device_id).append(self)
        return self

    def __exit__(self, *exc):
        _stream_stack(current_device_id()).pop()
        return False

    def use(self):
        stack = _stream_stack(current_device_id())
        stack[:] = [self]
        return self

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        if event._known is None:
            return  # an event never recorded is complete, as in CUDA
        with streams._lock:
            self.timeline.enqueue()
            streams._merge(self.timeline.known, event._known)

    def synchronize(self):
        ledger.record_sync(current_device_id() if self.is_null else self.device_id, self.ptr, "Stream.synchronize")
        streams.host_waits_for(self.timeline.snapshot())

    @property
    def done(self):
        return True  # every operation ran when it was enqueued; ordering is what is checked


_streams_by_handle = weakref.WeakValueDictionary()  # stream.ptr -> Stream, for calls given the handle only
Stream.null = Stream(null=True)


def stream_at(handle):
    """The live stream whose `ptr` is `handle` (0 or cudaStreamLegacy, 1: the legacy default stream),
    as a call taking a cudaStream_t (NCCL's) finds it."""
    if handle in (0, 1):
        return Stream.null
    if handle == 2:
        raise NotImplementedError("cudaStreamPerThread: the emulator models the legacy default stream only")
    stream = _streams_by_handle.get(handle)
    if stream is None:
        raise CUDARuntimeError(f"cudaErrorInvalidResourceHandle: {handle} is no live stream of the emulated GPUs")
    return stream


def get_current_stream(device_id=None):
    stack = _stream_stack(current_device_id() if device_id is None else device_id)
    return stack[-1] if stack else Stream.null


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._known = None
        self._time = None
        self.ptr = next(_serial)

    def record(self, stream=None):
        stream = stream or get_current_stream()
        with streams._lock:
            timeline = stream.timeline
            timeline.enqueue()
            self._known = timeline.snapshot()
        self._time = time.perf_counter()

    def synchronize(self):
        if self._known is not None:
            ledger.record_sync(current_device_id(), -1, "Event.synchronize")
            streams.host_waits_for(self._known)

    @property
    def done(self):
        # the emulator runs work when it is enqueued, so a query always finds it finished, and the host
        # then knows it, as after cudaEventQuery's success
        if self._known is not None:
            streams.host_sees_done(self._known)
        return True


def get_elapsed_time(start_event, end_event):
    """Milliseconds between two recorded events: host time, since the emulator runs work when it is enqueued."""
    if start_event._time is None or end_event._time is None:
        raise CUDARuntimeError("cudaErrorInvalidResourceHandle: an event was never recorded")
    return 1000.0 * (end_event._time - start_event._time)


# --- memory

class OutOfMemoryError(MemoryError):
    pass


_used = collections.Counter()  # device id -> bytes allocated
_hooks = []

_SENTINEL = {"f": np.nan, "c": np.nan, "b": True}  # integers get their type's largest value
_ML_FLOATS = (np.dtype(ml_dtypes.bfloat16),)  # ml_dtypes' floats are NumPy kind "V": NaN too


def fill_uninitialised(array):
    """What fresh device memory holds here: NaN, or an integer sentinel no computation expects."""
    kind = array.dtype.kind
    if array.dtype in _ML_FLOATS:
        kind = "f"
    array.fill(_SENTINEL[kind] if kind in _SENTINEL else np.iinfo(array.dtype).max)


class _LiveAllocations:
    """Every live allocation by its start address, to find the one an address points into
    (a kernel's table of pointers names arrays by address only)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._starts = []  # sorted start addresses
        self._by_start = {}  # start address -> weak reference to its Allocation

    def add(self, allocation):
        start = allocation.start
        with self._lock:
            if start not in self._by_start:
                bisect.insort(self._starts, start)
            self._by_start[start] = weakref.ref(allocation)

    def remove(self, allocation):
        start = allocation.start
        with self._lock:
            ref = self._by_start.get(start)
            if ref is not None and ref() in (None, allocation):  # not a newer allocation at the same address
                del self._by_start[start]
                del self._starts[bisect.bisect_left(self._starts, start)]

    def at(self, address):
        """The live allocation holding `address`, or None."""
        with self._lock:
            k = bisect.bisect_right(self._starts, address) - 1
            ref = self._by_start.get(self._starts[k]) if k >= 0 else None
        allocation = ref() if ref is not None else None
        if allocation is None or address >= max(allocation.end, allocation.start + 1):
            return None
        return allocation


live_allocations = _LiveAllocations()


def memory_at(address, nbytes, what):
    """The allocation holding the `nbytes` bytes at `address`, and those bytes as a host view; an error
    where they are not all inside one live allocation (freed, foreign or overrun memory). `what` names
    the address in it: "kernel k argument 1: the table holds address"."""
    allocation = live_allocations.at(address)
    if allocation is None:
        raise ValueError(f"{what} {address:#x}, which is in no live array of an emulated GPU "
                         "(freed, or never device memory)")
    if address + nbytes > allocation.end:
        raise ValueError(f"{what} {address:#x}, but {nbytes:,} bytes from there run past the end of "
                         f"{allocation} ({allocation.end - address:,} bytes left there)")
    return allocation, np.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=np.uint8)


class Allocation:
    """One block of device memory: a host array standing in for it, its stream and its access record."""

    def __init__(self, host, device_id):
        nbytes = host.nbytes
        if _used[device_id] + nbytes > memory_limit():
            raise OutOfMemoryError(
                f"Out of memory allocating {nbytes:,} bytes (allocated so far: {_used[device_id]:,} bytes) "
                f"on emulated GPU {device_id}; its limit is MINIDL_EMULATE_GPU_MEMORY="
                f"{memory_limit() / 2 ** 30:g} GiB")
        _used[device_id] += nbytes
        self.host = host
        self.device_id = device_id
        self.nbytes = nbytes
        self.start, self.end = _byte_bounds(host)  # the memory it spans (a strided host may span less)
        self.home = get_current_stream().timeline
        self.access = streams.Access()
        self.made_at = streams.caller()
        live_allocations.add(self)
        for hook in list(_hooks):
            hook.malloc_postprocess(device_id=device_id, size=nbytes, mem_size=nbytes,
                                    mem_ptr=host.ctypes.data, pmem_id=id(self))

    def __repr__(self):
        return f"the {self.nbytes:,}-byte array made at {self.made_at}"

    def __del__(self):
        try:
            _used[self.device_id] -= self.nbytes
            live_allocations.remove(self)
            streams.check_free(repr(self), self.home, self.access)
            for hook in list(_hooks):
                hook.free_postprocess(device_id=self.device_id, mem_size=self.nbytes,
                                      mem_ptr=self.host.ctypes.data, pmem_id=id(self))
        except Exception:  # noqa: BLE001 -- nothing may escape __del__; the interpreter may be shutting down
            pass


class MemoryPointer:
    """`array.data`: an address, and the asynchronous copy CuPy offers on it."""

    def __init__(self, array):
        self._array = array
        self.ptr = array._host.ctypes.data if array.size else 0
        self.device = Device(array._allocation.device_id)
        self.device_id = array._allocation.device_id

    def copy_from_device_async(self, src, size, stream=None):
        """Copy `size` bytes from `src` (a MemoryPointer, any device) into this memory on `stream`."""
        dst_array, src_array = self._array, src._array
        if size > dst_array.nbytes or size > src_array.nbytes:
            raise ValueError(f"copy of {size} bytes between arrays of {src_array.nbytes} and {dst_array.nbytes}")
        if not (dst_array.flags.c_contiguous and src_array.flags.c_contiguous):
            raise ValueError("copy_from_device_async copies raw bytes: both arrays must be contiguous")
        operation("copy", reads=[src_array], writes=[dst_array], stream=stream, any_device=True,
                  nbytes=2 * size, what="a device-to-device copy")
        dst = dst_array._host.reshape(-1).view(np.uint8)
        dst[:size] = src_array._host.reshape(-1).view(np.uint8)[:size]


def memcpy_2d(dst, dpitch, src, spitch, width, height, kind, stream):
    """cudaMemcpy2DAsync between device arrays: one copy on the stream whose handle is `stream` (of the current
    GPU), charged as a peer copy when the two are on different GPUs, of width x height bytes each way. Refused
    as CUDA refuses it (a row wider than a pitch, a kind that is no cudaMemcpyKind), and what a GPU would get
    wrong: rows outside one live allocation (freed, foreign or overrun memory) and overlapping source and
    destination. Host memory (the other kinds) is not emulated."""
    if kind not in range(runtime.memcpyHostToHost, runtime.memcpyDefault + 1):
        raise CUDARuntimeError(f"cudaErrorInvalidMemcpyDirection: kind {kind} is no cudaMemcpyKind")
    if kind not in (runtime.memcpyDeviceToDevice, runtime.memcpyDefault):
        raise NotImplementedError(f"memcpy2DAsync of kind {kind}: the emulator copies between device arrays only "
                                  "(cudaMemcpyDeviceToDevice or cudaMemcpyDefault)")
    if width > dpitch or width > spitch:
        raise CUDARuntimeError(f"cudaErrorInvalidPitchValue: rows of {width} bytes wider than dpitch {dpitch} "
                               f"or spitch {spitch}")
    if width == 0 or height == 0:
        return  # CUDA returns at once: nothing is read or written
    on = stream_at(stream)
    dst_rows = _pitched(dst, dpitch, width, height, "memcpy2DAsync's dst is address")
    src_rows = _pitched(src, spitch, width, height, "memcpy2DAsync's src is address")
    if np.shares_memory(dst_rows._host, src_rows._host):
        raise ValueError("memcpy2DAsync: the source's rows overlap the destination's (CUDA leaves the result "
                         "undefined)")
    operation("copy", reads=[src_rows], writes=[dst_rows], stream=on, any_device=True, nbytes=2 * width * height,
              what="a 2-D copy (memcpy2DAsync)")
    dst_rows._host[...] = src_rows._host


class _Rows:
    """Rows of bytes inside one allocation, which a copy given raw addresses reads or writes: what operation()
    reads of an array (its allocation and sizes)."""

    def __init__(self, host, allocation):
        self._host, self._allocation = host, allocation
        self.nbytes = self.size = host.nbytes


def _pitched(address, pitch, width, height, what):
    """The `height` rows of `width` bytes at `address`, `pitch` bytes apart, as _Rows over a (height, width) uint8
    host view."""
    allocation, raw = memory_at(address, (height - 1) * pitch + width, what)
    return _Rows(np.lib.stride_tricks.as_strided(raw, shape=(height, width), strides=(pitch, 1)), allocation)


class MemoryPool:
    def used_bytes(self):
        return _used[current_device_id()]

    def total_bytes(self):
        return _used[current_device_id()]

    def free_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass


_pool = MemoryPool()


class MemoryHook:
    """Subclass and override malloc_postprocess / free_postprocess; use as `with hook:`."""

    name = "MemoryHook"

    def __enter__(self):
        _hooks.append(self)
        return self

    def __exit__(self, *exc):
        _hooks.remove(self)
        return False

    def malloc_postprocess(self, **kwargs):
        pass

    def free_postprocess(self, **kwargs):
        pass


class PinnedMemoryPointer(bytearray):
    """`cupy.cuda.alloc_pinned_memory`'s block: host memory a NumPy array is made over (np.frombuffer).
    Here it is plain host memory; a copy from it runs when it is enqueued, as every operation does."""

    @property
    def size(self):
        return len(self)


def alloc_pinned_memory(size):
    block = PinnedMemoryPointer(size)
    ledger.register_pinned(block)  # page-locked in CuPy (cudaHostAlloc): copies from it are charged as pinned
    return block


class memory:  # noqa: N801 -- cupy.cuda.memory
    OutOfMemoryError = OutOfMemoryError
    MemoryPool = MemoryPool
    MemoryPointer = MemoryPointer


class memory_hook:  # noqa: N801 -- cupy.cuda.memory_hook (also cupy.cuda.MemoryHook)
    MemoryHook = MemoryHook


# --- the work: every operation goes through here

work = collections.Counter()  # kind -> count, and "bytes": bytes read and written


def operation(kind, reads=(), writes=(), stream=None, any_device=False, nbytes=None, what=None, cost=None):
    """Enqueue one device operation of `kind` on the current (or given) stream; check and count it.

    Arrays must be on the current device, as in CuPy without peer access (a
    peer copy passes any_device). Returns nothing: the caller then computes
    the result on the host, which is when a real GPU would. `cost` (a
    ledger.Cost) overrides what the ledger charges it.
    """
    device_id = current_device_id()
    arrays = list(reads) + list(writes)
    if not any_device:
        for array in arrays:
            owner = array._allocation.device_id
            if owner != device_id and (device_id, owner) not in _peer_enabled:
                raise ValueError(f"The device where the array resides ({owner}) is different from the current "
                                 f"device ({device_id}). Peer access is unavailable between these devices "
                                 "(not enabled: runtime.deviceEnablePeerAccess)")
    stream = stream or get_current_stream()
    with streams._lock:
        timeline = stream.timeline
        if timeline.device_id != device_id and not stream.is_null:
            raise RuntimeError(f"a stream of device {timeline.device_id} used while device {device_id} is current")
        number = timeline.enqueue()
        streams.record(timeline, number, [a._allocation for a in reads], [a._allocation for a in writes],
                       what or f"a {kind}")
    work[kind] += 1
    work["bytes"] += sum(a.nbytes for a in arrays) if nbytes is None else nbytes
    ledger.record(kind, list(reads), list(writes), device_id, stream.ptr, what, nbytes, cost)
