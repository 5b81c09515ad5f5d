"""The network's input from uint8 crops: float conversion, mean subtraction, PCA lighting and scale, one pass.

    x[n, c, y, x] = ((crop[n, y, x, c] - mean[where's pixel, c]) + shift[n, c]) * scale   (float32 NCHW)

computed in float32; an output of float16 or bfloat16 (the compute dtype under the "fp16" and "bf16"
precisions, so that the first layer needs no cast of its own) is that float32 value rounded once.
The CPU cuts the crops (minidl.data); this finishes them on their device. CPU: NumPy, the loader's
arithmetic step by step on mirrored crops (`crops_to_input_cpu`, the reference). GPU: to_input.cu,
one thread per output value, which also mirrors (the CPU then cuts plain windows, contiguous copies),
with the same roundings in the same order: the two agree bit for bit. `InputFeed` takes host
windows to a device through pinned buffers. Autograd-free (an input has no gradient).
"""
from __future__ import annotations

import numpy as np

import ml_dtypes

from minidl import kernels
from minidl.data.augment import Crops, crop_and_flip, subtract_mean, to_nchw
from minidl.device import Device, device as as_device
from minidl.errors import MinidlError
from minidl.precision import compute_dtype

# the input's dtypes: float32, or a 16-bit compute dtype (mean, shift and scale stay float32 for all)
OUTPUT_TYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable (cuda_runtime_api.h): CuPy's runtime has no name for it
CU = kernels.KernelFile.beside(__file__, "to_input.cu", ("crops_to_input",), types=OUTPUT_TYPES)


def output_dtype(dtype) -> np.dtype:
    """`dtype` as a NumPy dtype, if it is one of OUTPUT_TYPES; else a MinidlError naming them."""
    dtype = np.dtype(dtype)
    if dtype not in OUTPUT_TYPES:
        names = ", ".join(str(t) for t in OUTPUT_TYPES)
        raise MinidlError(f"the network's input is {names}, not {dtype}")
    return dtype


def crops_to_input_cpu(crops: np.ndarray, mean: np.ndarray, where: Crops, shift: np.ndarray | None,
                       scale: float, out: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
    """uint8 (N, crop, crop, 3) crops cut at `where` -> float32 (N, 3, crop, crop), into `out` if given; `mean`
    is (S, S, 3) or (3,), `shift` float32 (N, 3) or None. `dtype` (out's own if given): float32, or float16 or
    bfloat16, the float32 result rounded once."""
    dtype = output_dtype(dtype if out is None else out.dtype)
    x = subtract_mean(crops, mean, crops.shape[1], where)
    if shift is not None:
        x += shift[:, None, None, :]
    if dtype != np.float32:  # the same float32 operations (an elementwise product: its order is free), one rounding
        if scale != 1:
            x *= np.float32(scale)
        if out is None:
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=dtype)
        out[...] = x.transpose(0, 3, 1, 2)
        return out
    if out is None:
        out = to_nchw(x)
    else:
        np.copyto(out, x.transpose(0, 3, 1, 2))
    if scale != 1:
        out *= np.float32(scale)
    return out


def crops_to_input_gpu(windows, mean, where, shift, scale: float, dtype=np.float32):
    """The kernel, on device arrays of the current GPU: windows uint8 (N, crop, crop, 3), not mirrored, mean
    float32 (S, S, 3), where int32 (N, 3) rows of (top, left, mirrored), shift float32 (N, 3). The input's
    `dtype`: float32, or float16 or bfloat16 (the float32 value rounded once)."""
    dtype = output_dtype(dtype)
    count, crop = windows.shape[:2]
    out = kernels.empty((count, 3, crop, crop), dtype)
    kernels.launch(CU, "crops_to_input", dtype, out.size, windows, mean, where, shift, out, out.size, crop,
                   mean.shape[0], float(scale))
    return out


class InputFeed:
    """Host uint8 windows (crops not yet mirrored) -> the network's input on `device` (NumPy on the CPU).

    The input's dtype: `dtype` if given (float32, float16 or bfloat16); else, on a GPU, the precision's 16-bit
    compute dtype under "fp16" and "bf16" (minidl.precision.compute_dtype, read at each call: the input is
    uploaded and finished in 16 bits, and the first layer has nothing to cast) and float32 otherwise; on the
    CPU float32 (its Functions compute 16-bit arrays in float32 anyway).

    A GPU's windows go through two pinned host buffers in turn (grown when a batch needs more):
    a call waits for the copy out of its buffer two calls ago only if it has not finished. Windows
    lying in host memory given to register() (the loader workers' shared slots) are uploaded
    straight from it, with no copy on the host: their memory must then stay unwritten until
    `last_upload` is done. Not for use by two threads at once.
    """

    def __init__(self, device: Device | str | None, mean: np.ndarray, scale: float, dtype=None) -> None:
        """`mean`: the (S, S, 3) mean image the crops were cut from (a per-channel mean spread over it)."""
        self.device, self.scale = as_device(device), scale
        self.dtype = None if dtype is None else output_dtype(dtype)
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        # two pinned buffers in turn, each with the event after its last copy out: a batch is staged while
        # the previous one's copy may still run
        self._pinned, self._copied, self._device_mean, self._turn = [None, None], [None, None], None, 0
        self._registered = {}  # start address -> bytes of host memory page-locked by register()
        self.last_upload = None  # the event after the last call's host-to-device copy (GPU)

    def __call__(self, crops: np.ndarray, where: Crops, shift: np.ndarray | None, labels: np.ndarray | None = None,
                 room: np.ndarray | None = None):
        """The input from `crops`; with `labels`, (input, labels as int32 on the device). On a GPU the crops,
        their places, their lighting and the labels go up in one copy. `room`: the crops' slot of registered
        memory (a uint8 array starting with them), which this may write past the crops (the places, lighting and
        labels) to upload from it in that one copy; without it, crops in registered memory take two copies."""
        if labels is not None and len(labels) != len(crops):
            raise MinidlError(f"{len(labels)} labels for {len(crops)} crops: want one label per crop")
        if not self.device.is_cuda:
            zero = np.zeros(len(crops), int)
            mirrored = crop_and_flip(crops, crops.shape[1], Crops(zero, zero, where.flips))
            x = crops_to_input_cpu(mirrored, self.mean, where, shift, self.scale,
                                   dtype=np.float32 if self.dtype is None else self.dtype)
            return x if labels is None else (x, np.asarray(labels, np.int32))
        with self.device:
            if self._device_mean is None:
                self._device_mean = self.device.xp.asarray(self.mean)
            uploaded = self._upload(crops, _trailer(where, shift, labels), room)
            n = len(crops)
            places, lighting, on_device_labels = uploaded[1][:3 * n], uploaded[1][3 * n:6 * n], uploaded[1][6 * n:]
            x = crops_to_input_gpu(uploaded[0], self._device_mean, places.reshape(n, 3),
                                   lighting.view(np.float32).reshape(n, 3), self.scale, self.output_dtype())
            return x if labels is None else (x, on_device_labels)

    def _upload(self, crops, trailer, room):
        """(crops, trailer) on the device: in one copy where the crops are staged, or lie in `room` with space for
        the trailer after them (4-byte aligned); else the crops from registered memory, then the trailer."""
        xp, stream = self.device.xp, self.device.stream
        offset = -(-crops.nbytes // 4) * 4
        together = offset + trailer.nbytes
        # a room that starts with the crops, has space for the trailer, and is page-locked
        in_room = (room is not None and _address(room) == _address(crops) and room.nbytes >= together
                   and self._in_registered(room[:together]))
        staged, turn = self._staged(crops, together) if not in_room else (room[:together], None)
        if in_room or turn is not None:  # the trailer after the crops, one upload
            staged.reshape(-1)[offset:together] = trailer.view(np.uint8)
            flat = xp.empty(together, np.uint8)
            flat.set(staged.reshape(-1)[:together], stream=stream)
            on_device, rows = flat[:crops.nbytes].reshape(crops.shape), flat[offset:].view(np.int32)
        else:
            on_device = xp.empty(crops.shape, np.uint8)
            on_device.set(staged, stream=stream)
            rows = xp.asarray(trailer)
        self.last_upload = stream.record()
        if turn is not None:
            self._copied[turn] = self.last_upload
        return on_device, rows

    def output_dtype(self) -> np.dtype:
        """The dtype of a GPU call's input now: `dtype` if given, else the precision's compute dtype or float32."""
        if self.dtype is not None:
            return self.dtype
        dtype = compute_dtype()  # (a dtype's truth is its count of fields: compared with None, not by `or`)
        return np.dtype(np.float32 if dtype is None else dtype)

    def register(self, host: np.ndarray) -> bool:
        """Page-lock the C-contiguous host array `host` (cudaHostRegister), so that windows lying in it are
        uploaded from it directly; False on the CPU, or where the driver refuses (the windows are then
        copied into a pinned buffer, as any others). unregister() it before its memory goes."""
        if not self.device.is_cuda:
            return False
        runtime = self.device.xp.cuda.runtime
        start = _address(host)
        try:  # portable: page-locked for every GPU's context, not only the current one's
            runtime.hostRegister(start, host.nbytes, HOST_REGISTER_PORTABLE)
        except runtime.CUDARuntimeError:  # e.g. already registered, or the driver's limit on locked memory
            return False
        self._registered[start] = host.nbytes
        return True

    def unregister(self, host: np.ndarray) -> None:
        """Undo register(host) once the last upload is done (nothing may still read it); a no-op if not registered."""
        start = _address(host)
        if self._registered.pop(start, None) is None:
            return
        if self.last_upload is not None:
            self.last_upload.synchronize()
        self.device.xp.cuda.runtime.hostUnregister(start)

    def _in_registered(self, crops):
        start = _address(crops)
        return any(low <= start and start + crops.nbytes <= low + size for low, size in self._registered.items())

    def _staged(self, crops, nbytes):
        """`crops` itself where it lies in registered memory (turn None); else `crops` copied into the start of the
        pinned buffer of this turn (`nbytes` long: room after them), once the last copy from it is done."""
        if self._in_registered(crops):
            return crops, None
        turn, self._turn = self._turn, 1 - self._turn
        copied = self._copied[turn]
        if copied is not None and not copied.done:  # a query first: a blocking wait only when it must
            copied.synchronize()
        if self._pinned[turn] is None or self._pinned[turn].nbytes < nbytes:
            memory = self.device.xp.cuda.alloc_pinned_memory(nbytes)
            self._pinned[turn] = np.frombuffer(memory, np.uint8, nbytes)
        staged = self._pinned[turn][:nbytes]
        np.copyto(staged[:crops.nbytes].reshape(crops.shape), crops)
        return staged, turn


def trailer_bytes(rows: int) -> int:
    """The most bytes a batch of `rows` crops needs after them to go up in one copy (alignment, places,
    lighting, labels): the room a loader's slot keeps for it."""
    return 3 + 7 * 4 * rows


def _trailer(where: Crops, shift: np.ndarray | None, labels: np.ndarray | None) -> np.ndarray:
    """The crops' places (top, left, mirrored), their lighting (float32 bits) and the labels: one int32 array."""
    n = len(where.tops)
    trailer = np.zeros(7 * n if labels is not None else 6 * n, np.int32)
    trailer[:3 * n] = np.stack([where.tops, where.lefts, where.flips], axis=1).reshape(-1)
    if shift is not None:
        trailer[3 * n:6 * n] = np.asarray(shift, np.float32).reshape(-1).view(np.int32)
    if labels is not None:
        trailer[6 * n:] = labels  # checked against the classes when read: they fit
    return trailer


def _address(host: np.ndarray) -> int:
    return host.__array_interface__["data"][0]
