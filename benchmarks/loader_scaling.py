"""The training loader's throughput with 1 and 2 (or more) workers, on a machine without a GPU (issue 26).

    python benchmarks/loader_scaling.py DATA.h5 [--workers 1 2] [--repeats 3] [--batches 100]

What a GPU run asks of the CPU, measured: the workers cut each batch's uint8 windows (the paper's random
crops; mirroring and the float stages are the device's) into their shared slots, and the parent hands each
slot to the device as `minidl train` does, through the real Loader, WorkerPool and Batches. Only the device
is a stand-in: on a GPU the slots are page-locked and the copy engine reads them (InputFeed.register), so the
host does no per-batch copy; the stand-in feed does nothing but take the slot, and --staged makes it copy
the windows into a staging buffer instead, as the feed does where the slots cannot be page-locked.
`minidl bench-data --devices cuda:0` times the same with the device's work, on a machine that has one.

Each configuration runs --repeats times, interleaved (1, 2, 1, 2, ...) so that drift in the machine's speed
falls on both; throughput is timed from the first batch to the last (the workers' start left out), CPU is
every process's, start-up included. Figures in benchmarks/NOTES.md.
"""
import argparse
import contextlib
import resource
import statistics
import time

import numpy as np

from minidl.data.loader import Batches, Loader
from minidl.data.workers import WorkerPool


class StandInFeed:
    """The device's side of InputFeed, without a device: slots 'registered', an upload that is at once done."""

    class Done:
        done = True

        def synchronize(self):
            pass

    def __init__(self, staged: bool):
        self.staged, self.last_upload, self._buffer = staged, self.Done(), None

    def register(self, host):
        return not self.staged

    def unregister(self, host):
        pass

    def __call__(self, crops, where, shift):
        if self.staged:  # InputFeed's pinned staging copy (np.copyto into a reused buffer)
            if self._buffer is None or self._buffer.nbytes < crops.nbytes:
                self._buffer = np.empty(crops.nbytes, np.uint8)
            np.copyto(self._buffer[:crops.nbytes].reshape(crops.shape), crops)
        return crops


def cpu_seconds():
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def run(path, workers, batches, batch_size, staged):
    loader = Loader(path, split="train", batch_size=batch_size, crop=227, augment=True, drop_last=True,
                    workers=workers)
    count = min(len(loader), batches)
    numbers = loader.batch_numbers(0)[:count]
    cpu_start = cpu_seconds()
    slot_bytes = batch_size * 227 * 227 * 3
    pool = WorkerPool(lambda: loader._maker(0, False), numbers, workers, loader.prefetch, slot_bytes)
    with contextlib.closing(Batches(loader, 0, pool, StandInFeed(staged))) as delivered:
        for i, _ in enumerate(delivered):
            if i == 0:
                first = time.perf_counter()
        seconds = time.perf_counter() - first
    cpu = cpu_seconds() - cpu_start  # the workers waited for at close
    return (count - 1) * batch_size / seconds, 1000 * cpu / (count * batch_size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--staged", action="store_true", help="copy each batch on the host (the fallback path)")
    args = parser.parse_args(argv)
    run(args.data, max(args.workers), args.batches, args.batch_size, args.staged)  # the images into the page cache
    found = {w: [] for w in args.workers}
    for _ in range(args.repeats):
        for workers in args.workers:
            found[workers].append(run(args.data, workers, args.batches, args.batch_size, args.staged))
    base = statistics.median(r for r, _ in found[args.workers[0]])
    for workers, runs in found.items():
        rates = [r for r, _ in runs]
        print(f"{workers} worker(s): {statistics.median(rates):,.0f} images/s (runs: "
              f"{', '.join(f'{r:,.0f}' for r in rates)}), CPU {statistics.median(c for _, c in runs):.3f} ms "
              f"per image, {statistics.median(rates) / base:.2f}x {args.workers[0]} worker(s)"
              f"{' (staged on the host)' if args.staged else ''}")


if __name__ == "__main__":
    main()
