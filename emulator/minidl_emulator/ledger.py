"""The cost ledger of the emulated GPUs: every device operation with what a real GPU would spend on it.

Each entry has its kind ("gemm", "elementwise", "reduction", "kernel", "copy",
"collective", "sync"), its unit (a GEMM's compute unit: "fp32-simt", "tf32",
"fp16", "bf16", "fp64"; a copy's link: "h2d", "d2h", "d2d", "peer"), its name,
FLOPs, bytes read plus written, device and stream. `hidden` marks what CuPy
does inside a call without the caller asking (matmul's contiguous copies).
roofline.py turns entries into time; cuda.operation() and the synchronize
calls write them.
"""
import collections
import contextlib
import dataclasses
import threading
import weakref

GEMM_UNITS = ("fp32-simt", "tf32", "fp16", "bf16", "fp64")
COPY_LINKS = ("h2d", "d2h", "d2d", "peer")


@dataclasses.dataclass(frozen=True)
class Cost:
    """What an operation costs, where its caller knows better than the array sizes."""

    unit: str = ""
    flops: int = 0
    nbytes: int | None = None  # None: the sizes of the arrays it reads and writes
    name: str | None = None
    hidden: bool = False
    pinned: bool = False  # a host-device copy from or to page-locked host memory


@dataclasses.dataclass(frozen=True)
class Entry:
    kind: str
    unit: str
    name: str
    flops: int
    nbytes: int
    device: int
    stream: int
    hidden: bool = False
    pinned: bool = False
    label: str = ""  # what the caller was doing (labelled()): a layer's forward or backward, the update
    peer_nbytes: int = 0  # of nbytes, those a kernel read or wrote in another GPU's memory (peer access, NVLink)


class Ledger:
    """The latest `keep` entries in the order they were enqueued (all threads, all devices): a long run
    on the emulated GPUs (a test session, `minidl train`) keeps a bounded window."""

    def __init__(self, keep: int = 100_000) -> None:
        self._lock = threading.Lock()
        self.entries: collections.deque[Entry] = collections.deque(maxlen=keep)
        self._count = 0  # entries ever added

    def add(self, entry: Entry) -> None:
        with self._lock:
            self.entries.append(entry)
            self._count += 1

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def mark(self) -> int:
        """A position to take the entries after, with since()."""
        return self._count

    def since(self, mark: int) -> list[Entry]:
        with self._lock:
            wanted = self._count - mark
            if wanted > len(self.entries):
                raise ValueError(f"{wanted:,} entries since the mark, but the ledger keeps the last "
                                 f"{self.entries.maxlen:,} only")
            return list(self.entries)[len(self.entries) - wanted:]


LEDGER = Ledger()
_labels = threading.local()


def current_label() -> str:
    return getattr(_labels, "value", "")


@contextlib.contextmanager
def labelled(label: str):
    """Entries this thread records inside get `label` (nested: the innermost)."""
    previous, _labels.value = current_label(), label
    try:
        yield
    finally:
        _labels.value = previous


_pinned = {}  # id of a page-locked host buffer -> (start, end) of its memory, and the buffer if kept alive here


def register_pinned(buffer) -> None:
    """Mark a host buffer (a NumPy array or anything with a buffer) as page-locked: copies from or into
    NumPy arrays over its memory are then charged at pinned PCIe bandwidth. The emulation of
    cupy.cuda.alloc_pinned_memory calls this; the emulator allocates nothing page-locked itself.
    The mark goes with the buffer (kept alive here if it cannot be referred to weakly)."""
    import numpy as np
    array = np.frombuffer(buffer, dtype=np.uint8) if not isinstance(buffer, np.ndarray) else buffer
    start = array.__array_interface__["data"][0]
    key = id(buffer)
    try:
        weakref.finalize(buffer, _pinned.pop, key, None)
        _pinned[key] = (start, start + array.nbytes, None)
    except TypeError:
        _pinned[key] = (start, start + array.nbytes, buffer)


def register_pinned_range(start: int, nbytes: int) -> None:
    """Mark host memory [start, start + nbytes) as page-locked: the emulation of cudaHostRegister."""
    _pinned[("range", start)] = (start, start + nbytes, None)


def unregister_pinned_range(start: int) -> bool:
    """Undo register_pinned_range(start, ...); False when no range starts there."""
    return _pinned.pop(("range", start), None) is not None


def pinned_range_overlaps(start: int, nbytes: int) -> bool:
    """Whether [start, start + nbytes) overlaps memory already marked page-locked."""
    return any(low < start + nbytes and start < high for low, high, _ in _pinned.values())


def is_pinned(host) -> bool:
    """Whether a host NumPy array lies inside a buffer given to register_pinned."""
    start = host.__array_interface__["data"][0]
    return any(low <= start and start + host.nbytes <= high for low, high, _ in _pinned.values())


def default_unit(kind: str, read_devices: set, write_devices: set) -> str:
    """A copy's link from where its operands are: device arrays read only: d2h; written only: h2d."""
    if kind != "copy":
        return ""
    if not read_devices:
        return "h2d"
    if not write_devices:
        return "d2h"
    return "d2d" if read_devices == write_devices else "peer"


def default_flops(kind: str, read_elements: int, write_elements: int) -> int:
    """One FLOP per element made (elementwise) or read (reduction); raw kernels and copies: 0.

    A raw kernel's arithmetic is not knowable from its launch: it is charged
    its bytes only (each array argument's size, once).
    """
    return dict(elementwise=write_elements, reduction=read_elements).get(kind, 0)


def record(kind: str, reads: list, writes: list, device: int, stream: int, what: str | None,
           nbytes: int | None, cost: Cost | None) -> None:
    """One entry for an operation cuda.operation() enqueued (arrays: the emulated ndarrays it touches)."""
    cost = cost or Cost()
    unit = cost.unit or default_unit(kind, {a._allocation.device_id for a in reads},
                                     {a._allocation.device_id for a in writes})
    if cost.nbytes is not None:
        nbytes = cost.nbytes
    elif nbytes is None:
        nbytes = sum(a.nbytes for a in list(reads) + list(writes))
    flops = cost.flops or default_flops(kind, sum(a.size for a in reads), sum(a.size for a in writes))
    remote = 0 if kind == "copy" else sum(a.nbytes for a in list(reads) + list(writes)
                                          if a._allocation.device_id != device)
    LEDGER.add(Entry(kind, unit, cost.name or what or kind, flops, nbytes, device, stream, cost.hidden, cost.pinned,
                     current_label(), remote))


def record_sync(device: int, stream: int, what: str) -> None:
    """The host waiting for the device: a blocking read (get, item, synchronize)."""
    LEDGER.add(Entry("sync", "", what, 0, 0, device, stream, label=current_label()))
