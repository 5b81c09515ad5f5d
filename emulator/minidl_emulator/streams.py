"""Stream ordering on emulated GPUs: what may run before what, and the hazards that follow.

Every stream is a timeline with a vector clock; events carry clocks, `wait_event` merges
them, host synchronisation advances the host's. An access not ordered after a conflicting
one on another stream, or a free while another stream may still use the memory, is a
StreamHazard: raised where it happens and kept in `hazards` for the test fixture
(the model in full: emulator/README.md).
"""
import itertools
import os
import sys
import threading
import weakref

_HERE = os.path.dirname(os.path.abspath(__file__))
_NUMPY = os.path.dirname(os.path.abspath(sys.modules["numpy"].__file__))

hazards = []  # every hazard found, oldest first: (message, where)
_lock = threading.RLock()
_serial = itertools.count(1)


class StreamHazard(RuntimeError):
    """An access to device memory that no stream order protects; `found` is its entry in `hazards`."""

    def __init__(self, text, found=None):
        super().__init__(text)
        self.found = found


class Timeline:
    """One stream's operations, numbered, and what it knows of the others."""

    def __init__(self, device_id, kind):
        self.id = next(_serial)
        self.device_id = device_id
        self.kind = kind  # "legacy", "blocking" or "non-blocking"
        self.clock = 0
        self.known = {}  # other timeline -> the last of its operations known complete here

    def __repr__(self):
        return f"{self.kind} stream #{self.id} of GPU {self.device_id}"

    def snapshot(self):
        return {**self.known, self: self.clock}

    def enqueue(self):
        """A new operation on this stream: returns its number, after every implicit ordering."""
        self.clock += 1
        self.known = self.known_to_next()
        return self.clock

    def known_to_next(self):
        """What the next operation on this stream will be ordered after: what it knows, what the
        host has seen complete, and the legacy default stream's implicit synchronisation."""
        known = {**self.known}
        _merge(known, host_known)
        if self.kind == "legacy":  # waits for all earlier work of the GPU's blocking streams
            for other in _timelines_of(self.device_id):
                if other.kind == "blocking":
                    _merge(known, other.snapshot())
        elif self.kind == "blocking":
            _merge(known, legacy_timeline(self.device_id).snapshot())
        return known

    def orders(self, other, number):
        """Is operation `number` of `other` complete before this stream's next operation?"""
        return other is self or self.known.get(other, 0) >= number


host_known = {}  # timeline -> the last operation the host has seen complete
_all_timelines = weakref.WeakSet()
_legacy = {}


def _merge(into, known):
    for timeline, number in known.items():
        if into.get(timeline, 0) < number:
            into[timeline] = number


def _timelines_of(device_id):
    return [t for t in list(_all_timelines) if t.device_id == device_id]


def new_timeline(device_id, kind):
    timeline = Timeline(device_id, kind)
    _all_timelines.add(timeline)
    return timeline


def legacy_timeline(device_id):
    if device_id not in _legacy:
        _legacy[device_id] = new_timeline(device_id, "legacy")
    return _legacy[device_id]


def host_waits_for(known):
    """The host blocked until everything in `known` finished (synchronize)."""
    _host_learns(known)


def host_sees_done(known):
    """The host asked, without blocking, whether `known` finished, and was told yes (an event's query)."""
    _host_learns(known)


def _host_learns(known):
    with _lock:
        _merge(host_known, known)


def reset():
    """Forget all streams and hazards (a fresh set of emulated GPUs)."""
    with _lock:
        hazards.clear()
        host_known.clear()
        _legacy.clear()


def take_hazards():
    """The hazards found so far, clearing the list."""
    with _lock:
        found = list(hazards)
        hazards.clear()
    return found


# --- accesses

def caller():
    """'file:line in function' of the innermost frame outside the emulator and NumPy."""
    frame = sys._getframe(1)  # cheaper than traceback: this runs on every device operation
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(_HERE) and not path.startswith(_NUMPY):
            return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


class Access:
    """Who last wrote an allocation and who read it since (one entry per stream, the latest)."""

    __slots__ = ("write", "reads")

    def __init__(self):
        self.write = None  # (timeline, number, where)
        self.reads = {}  # timeline -> (number, where)

    def users(self):
        if self.write is not None:
            yield self.write
        for timeline, (number, where) in self.reads.items():
            yield timeline, number, where


def _report(message):
    where = caller()
    found = (message, where)
    hazards.append(found)
    # raised as made: an exception in a local of this frame would keep the frame, and the arrays
    # its callers hold, alive until a garbage collection (its traceback refers back to the frame)
    raise StreamHazard(f"{message} (at {where})", found)


def record(timeline, number, reads=(), writes=(), what="an operation"):
    """Check and record operation `number` of `timeline` reading and writing allocations."""
    with _lock:
        for allocation in reads:
            write = allocation.access.write
            if write is not None and not timeline.orders(write[0], write[1]):
                _report(f"{what} on {timeline} reads {allocation} written by {write[0]} at {write[2]} "
                        "with nothing ordering the two (wait on an event recorded after the write)")
        for allocation in writes:
            for other, other_number, where in allocation.access.users():
                if not timeline.orders(other, other_number):
                    _report(f"{what} on {timeline} writes {allocation} still used by {other} at {where} "
                            "with nothing ordering the two (wait on an event recorded after that use)")
        here = None
        for allocation in reads:
            if here is None:
                here = caller()
            allocation.access.reads[timeline] = (number, here)
        for allocation in writes:
            if here is None:
                here = caller()
            allocation.access.write = (timeline, number, here)
            allocation.access.reads = {}


def check_free(allocation_name, home, access):
    """An allocation goes back to the pool of `home`: every other stream must be done with it."""
    with _lock:
        known = home.known_to_next()  # the pool hands the memory out only to later work of `home`
        for other, number, where in access.users():
            if other is not home and known.get(other, 0) < number:
                message = (f"{allocation_name} went back to the memory pool of {home} while {other} "
                           f"may still use it (used at {where}); keep it alive until that stream is done, "
                           "or make its stream wait")
                hazards.append((message, caller()))
                return
