"""Benchmark a full training step: forward, loss, backward, momentum update.

On synthetic data, after warm-up; each step is timed with device events on a
GPU (the host clock after a synchronize on the CPU), and the median is
reported, so one slow step (a page fault, a compile) does not move it.
"""
import resource
import statistics
import time

import numpy as np

from minidl.core import Tensor
from minidl.device import device as as_device, keep_freed_host_memory
from minidl.functions import softmax_cross_entropy
from minidl.functions.dropout import seed as seed_dropout
from minidl.optim import MomentumSGD


def _timer(device):
    """start() / stop() -> seconds, measured on the device's own clock."""
    if not device.is_cuda:
        return time.perf_counter, lambda start: time.perf_counter() - start
    cp = device.xp

    def start():
        with device:
            event = cp.cuda.Event()
            event.record()
            return event

    def stop(begin):
        with device:
            end = cp.cuda.Event()
            end.record()
            end.synchronize()
            return cp.cuda.get_elapsed_time(begin, end) / 1000.0
    return start, stop


def peak_memory_bytes(devices):
    """Peak device memory held by CuPy's pool on the GPUs, else the process's peak RSS."""
    gpus = {d.physical for d in devices if d.is_cuda}
    if gpus:
        return max(_pool_peak.get(g, 0) for g in gpus)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


_pool_peak = {}


def _note_pool(devices):
    for d in devices:
        if d.is_cuda:
            with d:
                used = d.xp.get_default_memory_pool().used_bytes()
            _pool_peak[d.physical] = max(_pool_peak.get(d.physical, 0), used)


def bench(model_file, *, batch_size=128, devices=("cpu", "cpu"), steps=20, warmup=3, num_classes=1000,
          seed=0, progress=None):
    """Time `steps` training steps; returns a dict of medians and the peak memory."""
    keep_freed_host_memory()
    devices = tuple(as_device(d) for d in devices)
    config = model_file.config
    model = model_file.build(num_classes, [d.name for d in devices], config["init"], seed)
    optimizer = MomentumSGD(model.params(), config["lr"], config["momentum"], config["weight_decay"])
    rng = np.random.default_rng(seed)
    size = config["input_size"]
    x = Tensor(rng.standard_normal((batch_size, 3, size, size)).astype(np.float32), device=model.input_device)
    y = Tensor(rng.integers(0, num_classes, batch_size), device=model.output_device)
    start, stop = _timer(model.output_device)
    times = []
    for i in range(warmup + steps):
        seed_dropout(i)
        begin = start()
        loss = softmax_cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for d in devices:  # the step ends when every tower's stream is done
            d.synchronize()
        elapsed = stop(begin)
        _note_pool(devices)
        del loss
        if i >= warmup:
            times.append(elapsed)
        if progress:
            progress(i + 1, warmup + steps)
    median = statistics.median(times)
    return dict(batch_size=batch_size, devices=[d.name for d in devices], steps=steps,
                ms_per_step=1000 * median, images_per_s=batch_size / median,
                peak_memory_bytes=peak_memory_bytes(devices))
