"""minidl's AlexNet training step against PyTorch's, in one run, on the same machine.

    python benchmarks/vs_torch.py --device cpu --batch-size 32
    python benchmarks/vs_torch.py --device cuda --batch-size 128

PyTorch (when importable) runs the same paper AlexNet in eager mode: groups=2
in conv2/4/5, LRN with the paper's constants (PyTorch divides alpha by n, so
alpha=5e-4 is the paper's 1e-4), dropout 0.5, SGD with momentum 0.9 and weight
decay 0.0005, synthetic 227x227 data. PyTorch is a peer to measure against,
never a dependency of minidl. Both are timed as the median of full steps after
warm-up.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import minidl  # noqa: E402  before PyTorch can load NumPy: minidl sets OpenBLAS's thread timeout first


def torch_alexnet(nn):
    return nn.Sequential(
        nn.Conv2d(3, 96, 11, 4), nn.ReLU(), nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(), nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(),
        nn.Linear(9216, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(4096, 1000))


def bench_torch(device, batch_size, steps, warmup):
    import torch
    from torch import nn
    torch.manual_seed(0)
    model = torch_alexnet(nn).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005)
    x = torch.randn(batch_size, 3, 227, 227, device=device)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if device == "cuda":
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            elapsed = time.perf_counter() - begin
        if i >= warmup:
            times.append(elapsed)
    median = statistics.median(times)
    memory = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dict(name=f"PyTorch {torch.__version__} eager fp32 ({torch.get_num_threads()} threads)"
                if device == "cpu" else f"PyTorch {torch.__version__} eager (TF32 convs)",
                ms_per_step=1000 * median, images_per_s=batch_size / median, peak_memory_bytes=memory)


def bench_minidl(device, batch_size, steps, warmup):
    from minidl.bench import bench
    from minidl.model_file import load_model_file
    devices = ("cpu", "cpu") if device == "cpu" else ("cuda:0", "cuda:0")
    result = bench(load_model_file(os.path.join(ROOT, "models", "alexnet.py")), batch_size=batch_size,
                   devices=devices, steps=steps, warmup=warmup)
    return dict(name="minidl fp32", **{k: result[k] for k in ("ms_per_step", "images_per_s", "peak_memory_bytes")})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    rows = []
    try:
        rows.append(bench_torch(args.device, args.batch_size, args.steps, args.warmup))
    except ImportError:
        print("PyTorch is not importable here: measuring minidl alone", file=sys.stderr)
    rows.append(bench_minidl(args.device, args.batch_size, args.steps, args.warmup))
    base = rows[0]["images_per_s"]
    print(f"\nAlexNet training step, batch {args.batch_size}, {args.device}, median of {args.steps} steps")
    print(f"{'':40} {'ms/step':>9} {'images/s':>9} {'vs first':>9} {'peak mem':>9}")
    for r in rows:
        memory = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB"
        print(f"{r['name']:40} {r['ms_per_step']:9.1f} {r['images_per_s']:9.1f} "
              f"{r['images_per_s'] / base:8.2f}x {memory:>9}")


if __name__ == "__main__":
    main()
