"""Loss curves of AlexNet under each precision: does 16-bit training track float32? (issue 28)

Trains models/alexnet.py on the built-in data (or --data) for --steps steps from the same seed under each
--precisions value (the same batches, crops and dropout masks: each is a function of the step), and prints
each curve (the mean training loss of every --log-every steps) with its largest gap from the first
precision's, relative to max(loss, 0.1). fp16 runs with loss scaling, as `minidl train` does.

    python benchmarks/precision_curves.py --steps 300 --devices cpu
    MINIDL_EMULATE_GPUS=1 python benchmarks/precision_curves.py --steps 300 --devices cuda:0,cuda:0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def curves(model: str, steps: int, devices: str, precisions: list[str], log_every: int, data: str | None,
           batch_size: int | None = None, window: int = 50) -> dict:
    """Each precision's interval losses, and its gaps from the first's: per interval and per window of `window`
    steps (the mean loss of each: one interval's mean at a small batch is mostly the batch's noise)."""
    from minidl.training.train import train
    result = {}
    for precision in precisions:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            history = train(model, data=data, devices=devices, out_dir=out, max_steps=steps, log_every=log_every,
                            precision=precision, epochs=1000, checkpoint_seconds=1e9, batch_size=batch_size)
        losses = history["interval_loss"]
        result[precision] = dict(loss=losses, seconds=round(time.perf_counter() - started, 1))
        print(f"{precision}: {len(losses)} intervals, last loss {losses[-1]:.4f} "
              f"({result[precision]['seconds']} s)", file=sys.stderr, flush=True)
    per_window = max(1, window // log_every)
    reference = np.array(result[precisions[0]]["loss"])
    for precision in precisions[1:]:
        loss = np.array(result[precision]["loss"])
        n = min(len(loss), len(reference))
        gap = np.abs(loss[:n] - reference[:n]) / np.maximum(reference[:n], 0.1)
        result[precision]["largest_gap"] = float(gap.max())
        result[precision]["mean_gap"] = float(gap.mean())
        windows = n // per_window
        mean = lambda a: a[:windows * per_window].reshape(windows, per_window).mean(axis=1)  # noqa: E731
        result[precision]["window_gaps"] = (np.abs(mean(loss) - mean(reference)) / mean(reference)).tolist()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(os.path.dirname(HERE), "models", "alexnet.py"))
    parser.add_argument("--data", help="a minidl dataset (default: the built-in data)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, help="default: the model file's for its data")
    parser.add_argument("--window", type=int, default=50, help="steps per compared window of mean losses")
    parser.add_argument("--json", help="write the curves here")
    args = parser.parse_args(argv)
    result = curves(args.model, args.steps, args.devices, args.precisions.split(","), args.log_every, args.data,
                    args.batch_size, args.window)
    first = args.precisions.split(",")[0]
    for precision, found in result.items():
        gap = "" if precision == first else (f"  largest gap from {first} {100 * found['largest_gap']:.2f}%, "
                                             f"mean {100 * found['mean_gap']:.2f}%")
        print(f"{precision:5s} " + " ".join(f"{x:.3f}" for x in found["loss"]) + gap)
        if precision != first:
            print(f"      gaps of the {args.window}-step mean losses: "
                  + ", ".join(f"{100 * g:.1f}%" for g in found["window_gaps"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
