"""Benchmark the training loader: images/s delivered to a device, CPU per image, peak memory.

The batches are the training split's with the paper's augmentation, as `minidl train` loads
them. Throughput is timed from the first batch delivered to the last (steady state: the
workers' start is left out); CPU time is every process's (this one's and the workers',
start-up included), divided by the images delivered.
"""
from __future__ import annotations

import contextlib
import resource
import time

from minidl.data.loader import Loader, default_workers
from minidl.device import Device, device as as_device
from minidl.errors import DataError


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its children waited for (the workers, once closed)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def bench_data(path: str, *, workers: int | None = None, batch_size: int = 128, crop: int = 227,
               device: Device | str | None = None, batches: int = 30) -> dict:
    """Deliver up to `batches` training batches of `path` to `device` (None: the CPU) with `workers` processes
    (None: default_workers(); 0: a thread); returns what was measured (see the keys)."""
    workers = default_workers() if workers is None else workers
    device = as_device(device)
    loader = Loader(path, split="train", batch_size=batch_size, crop=crop, augment=True, drop_last=True,
                    workers=workers, device=device)
    count = min(len(loader), batches)
    if count < 2:
        raise DataError(f"{path} has {loader.num_images} training images: bench-data needs two batches of "
                        f"{batch_size} at least (use a smaller --batch-size)")
    cpu_start = _cpu_seconds()
    with contextlib.closing(loader.epoch_batches(0)) as delivered:
        for i, _ in zip(range(count), delivered):
            if i == 0:
                device.synchronize()
                first = time.perf_counter()
        device.synchronize()
        seconds = time.perf_counter() - first
    cpu = _cpu_seconds() - cpu_start  # after close: the workers have been waited for
    timed_images = (count - 1) * batch_size
    return dict(path=path, device=device.name, workers=workers, batch_size=batch_size, crop=crop, batches=count,
                images_per_s=timed_images / seconds, cpu_ms_per_image=1000 * cpu / (count * batch_size),
                peak_memory_bytes=1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                worker_peak_memory_bytes=1024 * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
