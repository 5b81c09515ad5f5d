"""Benchmark a full training step: the input as the trainer feeds it, forward, loss, backward, update.

On synthetic data, after warm-up; each step is timed with device events on a
GPU (the host clock after a synchronize on the CPU), and the median is
reported, so one slow step (a page fault, a compile) does not move it.
"""
import collections
import resource
import statistics
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np

from minidl.core import Tensor
from minidl.cpu.memory import keep_freed_host_memory
from minidl.data.augment import Crops
from minidl.functions.to_input import InputFeed
from minidl.layers.summary import check_training_memory
from minidl.optim import MomentumSGD
from minidl.precision import set_precision
from minidl.training.model_file import ModelFile
from minidl.training.step import StepGuard, labels_on_output, train_step


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


class _PeakMemory:
    """The high-water mark of CuPy's pool on each GPU during a run, from its allocation hooks.

    The pool's used bytes after a step miss the activations, freed by then;
    the hook sees every allocation and free as it happens.
    """

    def __init__(self, devices):
        self.gpus = sorted({d.physical for d in devices if d.is_cuda})
        self.hook = None
        if self.gpus:
            cp = next(d for d in devices if d.is_cuda).xp
            tracker = self

            class Hook(cp.cuda.MemoryHook):
                name = "minidl-peak-memory"

                def malloc_postprocess(self, device_id, mem_size, **kwargs):
                    tracker.used[device_id] += mem_size
                    tracker.peak[device_id] = max(tracker.peak[device_id], tracker.used[device_id])

                def free_postprocess(self, device_id, mem_size, **kwargs):
                    tracker.used[device_id] -= mem_size
            self.hook = Hook()
            self.used = collections.Counter()
            for gpu in self.gpus:  # what the model already holds counts too
                with cp.cuda.Device(gpu):
                    self.used[gpu] = cp.get_default_memory_pool().used_bytes()
            self.peak = collections.Counter(self.used)

    def __enter__(self):
        if self.hook is not None:
            self.hook.__enter__()
        return self

    def __exit__(self, *exc):
        if self.hook is not None:
            self.hook.__exit__(*exc)

    def bytes(self):
        """The largest GPU's peak; on the CPU the process's peak resident memory."""
        if self.gpus:
            return max(self.peak.values())
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _device_work(devices):
    """The device's count of its operations so far, where it keeps one (emulated GPUs); else None."""
    cuda_devices = [d for d in devices if d.is_cuda]
    work = getattr(cuda_devices[0].xp.cuda, "work", None) if cuda_devices else None
    return None if work is None else dict(work)


def _batches(model, batch_size: int, size: int, num_classes: int, seed: int) -> Callable[[], tuple]:
    """next_batch() -> (x, y) as the trainer gets them: on a GPU, uint8 crops through the loader's pinned
    InputFeed, finished there, each step; on the CPU the loader's workers finish them, so x is made once."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, batch_size).astype(np.int32)  # the loader checked them
    if not model.input_device.is_cuda:
        x = Tensor(rng.standard_normal((batch_size, 3, size, size)).astype(np.float32), device=model.input_device)
        return lambda: (x, Tensor(labels, device=model.output_device))
    crops = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    where = Crops(np.zeros(batch_size, int), np.zeros(batch_size, int), rng.integers(0, 2, batch_size))
    shift = rng.standard_normal((batch_size, 3)).astype(np.float32)
    feed = InputFeed(model.input_device, np.full((size, size, 3), 128, np.float32), 1 / 64)

    def next_batch():  # the labels go up with the crops, as the trainer's loader sends them
        x, y = feed(crops, where, shift, labels)
        return Tensor(x, device=model.input_device), labels_on_output(y, model)
    return next_batch


def bench(model_file: ModelFile, *, batch_size: int = 128, devices: Union[None, str, Sequence[str]] = None,
          steps: int = 20, warmup: int = 3, num_classes: int = 1000, seed: int = 0,
          progress: Optional[Callable[[int, int], None]] = None, precision: Optional[str] = None) -> dict:
    """Time `steps` training steps; returns a dict of medians and the peak memory.

    precision: minidl.precision.set_precision's, for the process (None: as it is)."""
    keep_freed_host_memory()
    if precision is not None:
        set_precision(precision)
    config = model_file.config
    devices = model_file.devices_for(devices)
    model = model_file.build(num_classes, devices, config["init"], seed)
    check_training_memory(model, batch_size, config["input_size"])  # before the batch is allocated
    optimizer = MomentumSGD(model.params(), config["lr"], config["momentum"], config["weight_decay"])
    next_batch = _batches(model, batch_size, config["input_size"], num_classes, seed)
    guard = StepGuard(model, optimizer, skip=False)  # the trainer's step: judged on the devices, read at the end
    start, stop = _timer(model.output_device)
    times = []
    peak = _PeakMemory(devices)
    with peak:
        for i in range(warmup + steps):
            if i == warmup:
                work_before = _device_work(devices)
            begin = start()
            x, y = next_batch()
            logits, loss = train_step(model, optimizer, x, y, dropout_seed=i, checked=True, guard=guard)
            for d in devices:  # the step ends when every tower's stream is done
                d.synchronize()
            elapsed = stop(begin)
            del logits, loss
            if i >= warmup:
                times.append(elapsed)
            if progress:
                progress(i + 1, warmup + steps)
    guard.read()
    median = statistics.median(times)
    result = dict(batch_size=batch_size, devices=[d.name for d in devices], steps=steps,
                  ms_per_step=1000 * median, images_per_s=batch_size / median, peak_memory_bytes=peak.bytes(),
                  step_seconds=times)
    work_after = _device_work(devices)
    if work_after is not None:  # on emulated GPUs: the device operations of one step, and their bytes
        result["device_work_per_step"] = {kind: (work_after.get(kind, 0) - work_before.get(kind, 0)) / steps
                                          for kind in work_after}
    return result
