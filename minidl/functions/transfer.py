"""Moving a tensor between devices or dtypes where autograd sees it.

`copy(x, device)` moves one tensor (Chainer's F.copy), `concat_to(xs, device, axis)` joins
tensors from several devices on one, and `exchange(xs, axis)` joins two GPUs' tensors on both;
they are the only ways a tensor crosses devices, and their backwards send each gradient back to
its source. Where two GPUs reach each other's memory (peer access: NVLink), a crossing is one
kernel a GPU reading across the link (transfer.cu), not a copy followed by a pass. On CUDA the
two logical devices may share a GPU but never a stream, so each crossing is ordered by events
(_ordered): the destination stream waits until the source stream has produced the data, and
the source stream waits until the copy has read it before its memory can be reused.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Sequence

from minidl import kernels
from minidl.core import Function, Tensor
from minidl.device import Device, device as as_device
from minidl.errors import MinidlError

MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the copy's direction from the addresses (unified addressing)
CU = kernels.KernelFile.beside(__file__, "transfer.cu", ("join_rows", "add_row_parts"), types=kernels.HALF_TYPES)


@contextlib.contextmanager
def _ordered(src, dst):
    """Inside: `dst` current, for a copy on its stream that reads memory of `src` made on src's stream before
    entering; the copy waits for that work, and src's stream waits for the copy before it reuses the memory."""
    ready = None
    if src.is_cuda:
        with src:
            ready = src.stream.record()
    with dst:
        if ready is not None:
            dst.stream.wait_event(ready)
        yield
        done = dst.stream.record()
    if src.is_cuda:
        # the source's memory (a contiguous temporary too, freed when the caller returns) goes back to its
        # stream's pool: that stream must not reuse it before the copy read it
        src.stream.wait_event(done)


def copy_array(array, src, dst):
    """`array` (on `src`) as a new array on `dst`, ordered on both devices' streams."""
    if src is dst:
        with dst:
            return array.copy()
    if not dst.is_cuda:
        with src:
            return array.get(stream=src.stream, blocking=True)
    xp = dst.xp
    if src.is_cuda and src.physical != dst.physical:
        with src:
            # a copy between GPUs moves raw bytes: make them contiguous first, on the source's stream, before
            # the copy's ordering, so the copy waits for them too
            array = xp.ascontiguousarray(array)
    with _ordered(src, dst):
        if not src.is_cuda:
            out = xp.asarray(array)  # host to device
        elif src.physical == dst.physical:
            out = array.copy()  # same GPU, but ordered on the destination's stream
        else:  # between GPUs (CUDA uses peer access where it is enabled)
            out = xp.empty(array.shape, dtype=array.dtype)
            out.data.copy_from_device_async(array.data, array.nbytes, dst.stream)
    return out


class Copy(Function):
    widens_half = False  # a copy keeps its dtype

    def __init__(self, dst):
        self.dst = dst

    def forward(self, x):
        return copy_array(x, self.device, self.dst)

    def output_device(self):
        return self.dst

    def backward(self, gy):
        return copy_array(gy, self.dst, self.device)


class ConcatTo(Function):
    """The inputs, each on its own device, joined along `axis` on `dst`. Inputs all on `dst`: one concatenate. Else
    each input's slice of the output is written by one copy, from another GPU a pitched one straight into the
    slice (cudaMemcpy2DAsync), and each input's gradient is its slice of the output's: from another GPU one
    pitched copy back, on its own device a view where autograd adds it to another gradient anyway."""

    widens_half = False  # copies keep their dtype

    def __init__(self, dst, axis):
        self.dst, self.axis = dst, axis

    def _device_of(self, inputs):
        self.sources = [x.device for x in inputs]  # the one Function whose inputs may be on several devices
        return self.dst

    def forward(self, *xs):
        self.axis = _checked_axis(xs, self.axis)
        self.starts = list(itertools.accumulate((x.shape[self.axis] for x in xs), initial=0))  # and the total
        if all(src is self.dst for src in self.sources):
            return self.dst.xp.concatenate(xs, axis=self.axis)
        if len(xs) == 2 and _reaches(self.dst, self.sources):  # one kernel reads both, one across the link
            return _join_on(self.dst, xs, self.sources, self.axis)
        shape = list(xs[0].shape)
        shape[self.axis] = self.starts[-1]
        out = self.dst.xp.empty(tuple(shape), dtype=xs[0].dtype)
        for x, src, start in zip(xs, self.sources, self.starts):
            part = out[_along(self.axis, start, start + x.shape[self.axis])]
            if src is self.dst:
                part[...] = x  # one copy on dst's stream
            elif src.is_cuda and self.dst.is_cuda:
                with src:
                    x = src.xp.ascontiguousarray(x)  # rows of raw bytes, made before the crossing's ordering
                with _ordered(src, self.dst):
                    _pitched_copy(self.dst, out, start, x, 0, self.axis, x.shape[self.axis])
            else:  # between the host and a GPU
                part[...] = copy_array(x, src, self.dst)
        return out

    def backward(self, gy):
        gy = self.dst.xp.ascontiguousarray(gy)  # a pitched copy reads it as rows
        return tuple(self._input_gradient(gy, i) if needed else None for i, needed in enumerate(self.needs_grad))

    def _input_gradient(self, gy, i):
        x, src, start, axis = self.inputs[i], self.sources[i], self.starts[i], self.axis
        part = gy[_along(axis, start, start + x.shape[axis])]
        if src is self.dst:
            # a tensor with more than one use gets its gradients added, which reads a view; with one, the view
            # would go to its one consumer, which may need contiguous memory (a kernel launch copies it anyway)
            return part if part.flags.c_contiguous or x.uses > 1 else part.copy()
        if not (src.is_cuda and self.dst.is_cuda):
            return copy_array(part, self.dst, src)
        with _ordered(self.dst, src):
            gx = src.xp.empty(x.shape, dtype=gy.dtype)
            _pitched_copy(src, gx, 0, gy, start, axis, x.shape[axis])
        return gx


class Exchange(Function):
    """Two tensors on two GPUs that reach each other's memory (peer access: NVLink), each joined with the other
    along `axis` on both: AlexNet's crossing between its towers, an all-gather. Forward: on each GPU one kernel
    reads its own part and the other's across the link. Backward: each input's gradient is the sum of its slices of
    the two joined gradients, one kernel on its GPU reading the other's across the link (where concat_to per GPU
    takes a copy across and autograd's add for each)."""

    widens_half = False  # copies and one sum per element, in the kernels' precision

    def __init__(self, axis):
        self.axis = axis

    def _device_of(self, inputs):
        self.sources = [x.device for x in inputs]
        return self.sources[0]

    def output_devices(self, count):
        return self.sources

    def forward(self, a, b):
        self.axis = _checked_axis((a, b), self.axis)
        self.sizes = (a.shape[self.axis], b.shape[self.axis])
        return tuple(_join_on(dst, (a, b), self.sources, self.axis) for dst in self.sources)

    def backward(self, *gys):
        if any(g is None for g in gys):  # a joined map nobody used: its gradient is zero
            gys = tuple(g if g is not None else _zeros_on(dst, next(h for h in gys if h is not None))
                        for g, dst in zip(gys, self.sources))
        starts = (0, self.sizes[0])
        return tuple(_add_parts_on(dst, gys, self.sources, start, size, self.axis) if needed else None
                     for dst, start, size, needed in zip(self.sources, starts, self.sizes, self.needs_grad))


def _zeros_on(device, like):
    with device:
        return device.xp.zeros(like.shape, like.dtype)


def _checked_axis(xs, axis):
    """`axis` as an index from 0, once the arrays are seen to join along it: one dtype, one shape elsewhere."""
    first = xs[0]
    if not -first.ndim <= axis < first.ndim:
        raise MinidlError(f"concat_to: axis {axis} is out of range for inputs of {first.ndim} dimensions")
    axis %= first.ndim
    for x in xs[1:]:
        if x.dtype != first.dtype:
            raise MinidlError(f"concat_to: inputs of {first.dtype} and {x.dtype}; cast them to one dtype first")
        if x.ndim != first.ndim or x.shape[:axis] + x.shape[axis + 1:] != first.shape[:axis] + first.shape[axis + 1:]:
            raise MinidlError(f"concat_to: shapes {first.shape} and {x.shape} differ outside axis {axis}")
    return axis


def _along(axis, start, stop):
    return (slice(None),) * axis + (slice(start, stop),)


_peer_pairs = {}  # (GPU, peer) -> whether GPU reaches peer's memory (its peer access asked for once)


def peer_access(cuda, a, b) -> bool:
    """Let GPUs a and b reach each other's memory where they can (NVLink), once per pair: without it CUDA stages
    a copy between them through host memory (CuPy enables it for its own copies, copy_from_device_async), and a
    kernel cannot read the other's memory. Whether they reach each other both ways."""
    for gpu, peer in ((a, b), (b, a)):
        if gpu == peer or (gpu, peer) in _peer_pairs:
            continue
        _peer_pairs[gpu, peer] = bool(cuda.runtime.deviceCanAccessPeer(gpu, peer))
        if _peer_pairs[gpu, peer]:
            with cuda.Device(gpu):
                try:
                    cuda.runtime.deviceEnablePeerAccess(peer)
                except cuda.runtime.CUDARuntimeError as e:  # enabled already, by CuPy
                    if e.status != cuda.runtime.errorPeerAccessAlreadyEnabled:
                        raise
    return a == b or (_peer_pairs[a, b] and _peer_pairs[b, a])


def _reaches(device, others) -> bool:
    """Whether a kernel on GPU `device` can read and write the memory of every one of the GPUs `others`."""
    return device.is_cuda and all(o.is_cuda and peer_access(device.xp.cuda, device.physical, o.physical)
                                  for o in others)


def _row_width(shape, axis):
    """A C-contiguous array of `shape` as rows for joining along `axis`: the elements of a row."""
    return math.prod(shape[axis:])


def _join_on(dst, xs, sources, axis):
    """Two arrays (on GPUs `dst` reaches) joined along `axis` on dst in one kernel (transfer.cu, join_rows), each
    read where it lies, ordered after its device's work and before that device reuses its memory."""
    arrays = []
    for x, src in zip(xs, sources):
        with src:
            arrays.append(src.xp.ascontiguousarray(x))  # rows, made on their own device before the ordering
    a, b = arrays
    shape = list(a.shape)
    shape[axis] += b.shape[axis]
    with contextlib.ExitStack() as stack:
        stack.enter_context(dst)
        for src in dict.fromkeys(s for s in sources if s is not dst):
            stack.enter_context(_ordered(src, dst))
        out = dst.xp.empty(tuple(shape), dtype=a.dtype)
        kernels.launch(CU, "join_rows", a.dtype, out.size, a, _row_width(a.shape, axis), b, _row_width(b.shape, axis),
                       out, out.size)
    return out


def _add_parts_on(device, gys, sources, start, size, axis):
    """On `device`, the sum of the slices [start, start + size) along `axis` of the two joined gradients `gys`
    (one on `device`, one on a GPU it reaches), in one kernel (transfer.cu, add_row_parts)."""
    contiguous = []
    for gy, src in zip(gys, sources):
        with src:
            contiguous.append(src.xp.ascontiguousarray(gy))  # rows, made on their own device before the ordering
    a, b = contiguous if sources[0] is device else contiguous[::-1]
    other = sources[1] if sources[0] is device else sources[0]
    inner = math.prod(a.shape[axis + 1:])
    shape = list(a.shape)
    shape[axis] = size
    with _ordered(other, device):
        out = device.xp.empty(tuple(shape), dtype=a.dtype)
        pitch = a.shape[axis] * inner
        kernels.launch(CU, "add_row_parts", a.dtype, out.size, a, start * inner, pitch, b, start * inner, pitch, out,
                       size * inner, out.size)
    return out


def _pitched_copy(on, dst, dst_start, src, src_start, axis, size):
    """Copy src[start:start + size] along `axis` into dst's slice from dst_start: one cudaMemcpy2DAsync on `on`'s
    stream. Both arrays are C-contiguous, so a slice along `axis` is prod(shape[:axis]) rows, each of `size`
    times the inner elements, rows a whole axis apart."""
    inner = math.prod(src.shape[axis + 1:]) * src.itemsize
    rows, width = math.prod(src.shape[:axis]), size * inner
    if rows == 0 or width == 0:
        return  # nothing to copy (an empty array has no address)
    peer_access(on.xp.cuda, src.device.id, dst.device.id)
    on.xp.cuda.runtime.memcpy2DAsync(dst.data.ptr + dst_start * inner, dst.shape[axis] * inner,
                                     src.data.ptr + src_start * inner, src.shape[axis] * inner,
                                     width, rows, MEMCPY_DEFAULT, on.stream.ptr)


class AsType(Function):
    """x as `dtype`; the gradient cast back. `kept`: x's cast made before (a weight's 16-bit copy that its
    optimizer wrote with it), returned instead of a new one."""

    widens_half = False  # a cast is its own rounding

    def __init__(self, dtype, kept=None):
        self.dtype, self.kept = dtype, kept

    def forward(self, x):
        self.in_dtype = x.dtype
        return x.astype(self.dtype) if self.kept is None else self.kept

    def backward(self, gy):
        return gy.astype(self.in_dtype)


def copy(x: Tensor, device: str | Device) -> Tensor:
    """x on `device` (a name or Device), with a backward that returns the gradient."""
    return Copy(as_device(device))(x)


def astype(x: Tensor, dtype, kept=None) -> Tensor:
    return AsType(dtype, kept)(x)


def exchange(xs: Sequence[Tensor], axis: int = 1) -> list[Tensor]:
    """xs, one tensor per device, joined along `axis` on each of their devices: [the joined maps on xs[i]'s device
    for each i]. Two GPUs that reach each other's memory: Exchange (a kernel a GPU each way); else concat_to onto
    each device (on one device, one concatenate for all)."""
    devices = [x.device for x in xs]
    if len(xs) == 2 and devices[0] is not devices[1] and _reaches(devices[0], devices[1:]):
        return Exchange(axis)(*xs)
    joined = {d: concat_to(xs, d, axis) for d in dict.fromkeys(devices)}
    return [joined[d] for d in devices]


def concat_to(xs: Sequence[Tensor], device: str | Device, axis: int = 1) -> Tensor:
    """xs joined along `axis` on `device` (a name or Device), wherever each is: each input crosses by one copy
    into its slice of the result, and its gradient back by one. With every input on `device`, one concatenate."""
    if not xs:
        raise MinidlError("concat_to needs at least one tensor")
    return ConcatTo(as_device(device), axis)(*xs)
