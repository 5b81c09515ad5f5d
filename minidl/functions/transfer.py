"""Moving a tensor between devices or dtypes where autograd sees it.

`copy(x, device)` is the only way a tensor crosses devices (Chainer's F.copy):
its backward copies the gradient back to the source. On CUDA the two logical
devices may share a GPU but never a stream, so each crossing is ordered by an
event: the destination stream waits until the source stream has produced x,
and the source stream waits until the copy has read x before its memory can be
reused.
"""
from __future__ import annotations

from minidl.core import Function, Tensor
from minidl.device import Device, device as as_device


def copy_array(array, src, dst):
    """`array` (on `src`) as a new array on `dst`, ordered on both devices' streams."""
    if src is dst:
        with dst:
            return array.copy()
    if not dst.is_cuda:
        with src:
            return array.get(stream=src.stream, blocking=True)
    xp = dst.xp
    ready = None
    if src.is_cuda:
        with src:
            if src.physical != dst.physical:
                # a copy between GPUs moves raw bytes: make them contiguous first, on the
                # source's stream and before `ready`, so the copy waits for them too
                array = xp.ascontiguousarray(array)
            ready = src.stream.record()
    with dst:
        if ready is not None:
            dst.stream.wait_event(ready)
        if not src.is_cuda:
            out = xp.asarray(array)  # host to device
        elif src.physical == dst.physical:
            out = array.copy()  # same GPU, but ordered on the destination's stream
        else:  # between GPUs (CUDA uses peer access where it is enabled)
            out = xp.empty(array.shape, dtype=array.dtype)
            out.data.copy_from_device_async(array.data, array.nbytes, dst.stream)
        done = dst.stream.record()
    if src.is_cuda:
        # the source's memory (the contiguous temporary too, freed when this returns)
        # goes back to its stream's pool: that stream must not reuse it before the copy read it
        src.stream.wait_event(done)
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
