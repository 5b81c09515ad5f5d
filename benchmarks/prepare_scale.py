"""prepare-data at two folder sizes: peak memory (parent and workers, sampled) and images/s.

    python benchmarks/prepare_scale.py [--sizes 1000 4000] [--workers 1 2] [--storage raw]

The folders hold synthetic 320x240-480x360 JPEGs (smooth gradients and noise), 100 classes,
made once under --cache. Figures in benchmarks/NOTES.md.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from PIL import Image


def make_folder(root, count, classes=100):
    if os.path.isdir(root) and sum(len(files) for _, _, files in os.walk(root)) == count:
        return root
    rng = np.random.default_rng(count)
    for i in range(count):
        folder = os.path.join(root, f"n{i % classes:08d}")
        os.makedirs(folder, exist_ok=True)
        width, height = (int(v) for v in rng.integers((320, 240), (481, 361)))
        down, across = np.mgrid[0:1:height * 1j, 0:1:width * 1j]
        pixels = (down[..., None] * rng.uniform(0, 200, 3) + across[..., None] * rng.uniform(0, 55, 3)
                  + rng.normal(0, 8, (height, width, 3)))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.JPEG"), quality=90)
    return root


def tree_rss(pid):
    """Resident bytes of a process and its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def cpu_seconds(pid):
    """CPU seconds (user + system) of one process so far, from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


def run(folder, out, workers, storage):
    command = [sys.executable, "-m", "minidl_cli.main", "prepare-data", folder, out, "--overwrite",
               "--workers", str(workers), "--storage", storage]
    start, peak, parent_cpu = time.perf_counter(), 0, 0.0
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        parent_cpu = cpu_seconds(process.pid) or parent_cpu  # the last reading before it ended
        time.sleep(0.05)
    assert process.returncode == 0
    return time.perf_counter() - start, peak, parent_cpu


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--storage", default="raw")
    parser.add_argument("--cache", default="/tmp/minidl-prepare-scale")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each worker count, interleaved (1, 2, 1, 2, ...): drift falls on both")
    args = parser.parse_args()
    for size in args.sizes:
        folder = make_folder(os.path.join(args.cache, str(size)), size)
        rates = {workers: [] for workers in args.workers}
        for _ in range(args.repeats):
            for workers in args.workers:
                seconds, peak, parent_cpu = run(folder, os.path.join(args.cache, f"out-{size}.h5"), workers,
                                                args.storage)
                rates[workers].append(size / seconds)
                print(f"{size:6d} images, {workers} worker(s), {args.storage}: {size / seconds:6.1f} images/s, "
                      f"peak memory {peak / 2**20:6.0f} MiB (all processes), the parent's CPU "
                      f"{1000 * parent_cpu / size:.2f} ms per image (start-up included)", flush=True)
        if args.repeats > 1:
            base = statistics.median(rates[args.workers[0]])
            print(f"{size:6d} images, medians: " + ", ".join(
                f"{w} worker(s) {statistics.median(r):.1f} images/s ({statistics.median(r) / base:.2f}x)"
                for w, r in rates.items()))


if __name__ == "__main__":
    main()
