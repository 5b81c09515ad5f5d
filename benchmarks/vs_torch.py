"""minidl's AlexNet training step against PyTorch's, in one run, on the same machine.

    python benchmarks/vs_torch.py --device cpu --batch-size 32
    python benchmarks/vs_torch.py --device cuda --batch-size 128

PyTorch (when importable) runs the same paper AlexNet in eager mode: groups=2
in conv2/4/5, LRN with the paper's constants (PyTorch divides alpha by n, so
alpha=5e-4 is the paper's 1e-4), dropout 0.5, SGD with momentum 0.9 and weight
decay 0.0005, synthetic 227x227 data. PyTorch is a peer to measure against,
never a dependency of minidl. Both are timed as the median of full steps after
warm-up.

Each framework runs in a process of its own, as a user runs it, and the two take
turns in rounds, PyTorch, minidl, minidl, PyTorch, ... (ABBA), each round after
its own warm-up: this machine's speed drifts by 10-20% over tens of seconds, and
timing one framework after the other lets the drift move the ratio.

The C library's allocator is part of what is measured. minidl tells glibc to
keep freed memory (minidl.cpu.memory.keep_freed_host_memory); PyTorch leaves glibc's
defaults, under which every array over 32 MB is mapped fresh and page-faulted
each step (PyTorch's tuning guide suggests preloading jemalloc or tcmalloc).
`--same-allocator` gives PyTorch's process minidl's settings, which take its page
faults away: closer to a comparison of the two engines (though M_ARENA_MAX=1, one
heap for all threads, is a setting chosen for minidl's threads, not a neutral one).
"""
import argparse
import importlib.util
import multiprocessing
import os
import resource
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)  # minidl from this checkout; only minidl's worker imports it


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
    # on the CPU the process's resident peak, as minidl's bench reports its own
    memory = (torch.cuda.max_memory_allocated() if device == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return dict(name=f"PyTorch {torch.__version__} eager fp32 ({torch.get_num_threads()} threads)"
                if device == "cpu" else f"PyTorch {torch.__version__} eager (TF32 convs)",
                step_seconds=times, peak_memory_bytes=memory)


def bench_minidl(device, batch_size, steps, warmup):
    from minidl.training.bench import bench
    from minidl.training.model_file import load_model_file
    devices = ("cpu", "cpu") if device == "cpu" else ("cuda:0", "cuda:0")
    result = bench(load_model_file(os.path.join(ROOT, "models", "alexnet.py")), batch_size=batch_size,
                   devices=devices, steps=steps, warmup=warmup)
    return dict(name="minidl fp32", **{k: result[k] for k in ("step_seconds", "peak_memory_bytes")})


def worker(framework, device, batch_size, same_allocator, connection):
    """A framework's own process: runs a round of steps for each (steps, warmup) it is sent."""
    if same_allocator:
        from minidl.cpu.memory import keep_freed_host_memory
        keep_freed_host_memory()
    if framework == "PyTorch":
        import torch  # noqa: F401  imported before the first round, not inside it
        bench = bench_torch
    else:
        import minidl_cli  # noqa: F401  first, as the minidl command: it sets OpenBLAS's thread timeout before NumPy
        import minidl.training.bench  # noqa: F401
        bench = bench_minidl
    connection.send("ready")
    while (job := connection.recv()) is not None:
        connection.send(bench(device, batch_size, *job))


def schedule(frameworks, steps, rounds):
    """[(framework, timed steps)] in ABBA order: PyTorch, minidl, minidl, PyTorch, ...

    With an even number of rounds a drift linear in time weighs on both alike.
    """
    order = []
    for r in range(rounds):
        share = steps // rounds + (r < steps % rounds)
        order += [(f, share) for f in (frameworks if r % 2 == 0 else frameworks[::-1])]
    return order


def at_least(minimum):
    def count(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return count


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=at_least(1), default=32)
    parser.add_argument("--steps", type=at_least(1), default=20, help="timed steps of each framework, over all rounds")
    parser.add_argument("--warmup", type=at_least(0), default=3, help="untimed steps at the start of each round")
    parser.add_argument("--rounds", type=at_least(2), default=4, help="an even number (ABBA)")
    parser.add_argument("--same-allocator", action="store_true",
                        help="give PyTorch minidl's glibc settings (see above)")
    args = parser.parse_args()
    if args.rounds % 2 or args.rounds > args.steps:
        parser.error(f"--rounds must be even and at most --steps ({args.steps}), got {args.rounds}")
    return args


def run_rounds(frameworks, args):
    """Each framework in a process of its own, its steps in the rounds of `schedule`: {framework: [run, ...]}."""
    context = multiprocessing.get_context("spawn")  # a fresh process each: no thread pool or allocator shared
    connections, processes, runs = {}, {}, {f: [] for f in frameworks}

    def receive(f):
        try:
            return connections[f].recv()
        except EOFError:
            processes[f].join()
            code = processes[f].exitcode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code} (its error is above)"
            sys.exit(f"{f}'s process {how}")

    try:
        for f in frameworks:
            connections[f], theirs = context.Pipe()
            processes[f] = context.Process(target=worker, daemon=True,
                                           args=(f, args.device, args.batch_size, args.same_allocator, theirs))
            processes[f].start()
            theirs.close()  # the worker's end lives in the worker alone: its death is then our EOFError
        for f in frameworks:  # every import done before the first timed step
            receive(f)
        for f, steps in schedule(frameworks, args.steps, args.rounds):
            connections[f].send((steps, args.warmup))
            runs[f].append(receive(f))
    finally:
        for connection in connections.values():
            try:
                connection.send(None)
            except OSError:  # that worker has stopped
                pass
        for process in processes.values():
            process.join()
    return runs


def report(runs, args):
    rows = []
    for f, framework_runs in runs.items():
        times = [t for run in framework_runs for t in run["step_seconds"]]
        median = statistics.median(times)
        name = framework_runs[0]["name"] + (", minidl's malloc settings"
                                            if f == "PyTorch" and args.same_allocator else "")
        rows.append(dict(name=name, steps=len(times), ms_per_step=1000 * median, images_per_s=args.batch_size / median,
                         peak_memory_bytes=max(run["peak_memory_bytes"] for run in framework_runs)))
    base = rows[0]["images_per_s"]
    print(f"\nAlexNet training step, batch {args.batch_size}, {args.device}, median of each one's steps "
          f"over {args.rounds} rounds")
    width = max(len(r["name"]) for r in rows)
    # on the CPU each process's resident peak (ru_maxrss: the libraries' pages too); on a GPU the allocator's peak
    memory_column = "peak RSS" if args.device == "cpu" else "peak mem"
    print(f"{'':{width}} {'steps':>5} {'ms/step':>9} {'images/s':>9} {'vs first':>9} {memory_column:>9}")
    for r in rows:
        print(f"{r['name']:{width}} {r['steps']:5} {r['ms_per_step']:9.1f} {r['images_per_s']:9.1f} "
              f"{r['images_per_s'] / base:8.2f}x {r['peak_memory_bytes'] / 2**30:5.2f} GiB")


def main():
    args = parse_arguments()
    frameworks = ["PyTorch", "minidl"]
    # found, not imported: this process only directs the two (a PyTorch that is found but fails stops the run)
    if importlib.util.find_spec("torch") is None:
        print("PyTorch is not importable here: measuring minidl alone", file=sys.stderr)
        frameworks = ["minidl"]
    report(run_rounds(frameworks, args), args)


if __name__ == "__main__":
    main()
