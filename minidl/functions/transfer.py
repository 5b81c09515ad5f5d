"""Moving a tensor between devices or dtypes where autograd sees it.

`copy(x, device)` moves one tensor (Chainer's F.copy) and `concat_to(xs, device, axis)` joins
tensors from several devices on one; they are the only ways a tensor crosses devices, and
their backwards send each gradient back to its source. On CUDA the two logical devices may
share a GPU but never a stream, so each crossing is ordered by events (_ordered): the
destination stream waits until the source stream has produced the data, and the source
stream waits until the copy has read it before its memory can be reused.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Sequence

from minidl.core import Function, Tensor
from minidl.device import Device, device as as_device
from minidl.errors import MinidlError

MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the copy's direction from the addresses (unified addressing)


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


_peer_pairs = set()  # (GPU, peer) pairs whose peer access was asked for


def peer_access(cuda, a, b):
    """Let GPUs a and b reach each other's memory where they can (NVLink), once per pair: without it CUDA stages
    a copy between them through host memory. CuPy does so for its own copies (copy_from_device_async)."""
    for gpu, peer in ((a, b), (b, a)):
        if gpu == peer or (gpu, peer) in _peer_pairs:
            continue
        _peer_pairs.add((gpu, peer))
        if cuda.runtime.deviceCanAccessPeer(gpu, peer):
            with cuda.Device(gpu):
                try:
                    cuda.runtime.deviceEnablePeerAccess(peer)
                except cuda.runtime.CUDARuntimeError as e:  # enabled already, by CuPy
                    if e.status != cuda.runtime.errorPeerAccessAlreadyEnabled:
                        raise


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


def concat_to(xs: Sequence[Tensor], device: str | Device, axis: int = 1) -> Tensor:
    """xs joined along `axis` on `device` (a name or Device), wherever each is: each input crosses by one copy
    into its slice of the result, and its gradient back by one. With every input on `device`, one concatenate."""
    if not xs:
        raise MinidlError("concat_to needs at least one tensor")
    return ConcatTo(as_device(device), axis)(*xs)
