"""Predict AlexNet's GPU step time without a GPU: one training step on emulated GPUs, its cost ledger, the roofline.

    python benchmarks/time_model.py --devices cuda:0,cuda:0 --batch-size 128 --gpu h100 [--json FILE]

The step is the trainer's (minidl.training.train): the input fed as the loader feeds it,
forward, loss, backward, the verdict on the devices, the update; then the guard's read of
a log interval, counted apart. One warm-up step, then one measured (the ledger is
deterministic). Device time is attributed to layers, backward included (attribute_to_layers).
`--ledger FILE` saves the measured step's ledger, and `--from-ledger FILE` models a saved
one again (another --gpu) without the emulator.
The model and its assumptions: emulator/minidl_emulator/roofline.py and benchmarks/NOTES.md.
"""
import argparse
import collections
import dataclasses
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "emulator"))  # this checkout's emulator, not an installed one


def attribute_to_layers(model) -> None:
    """Label the ledger's entries with the layer they serve, backward included: each Function made inside a
    layer's forward keeps that layer's name, and its backward runs under "<name> backward". It patches
    Layer.__call__ and each Function class's backward, for this process (a benchmark's measurement only)."""
    from minidl.core import Function
    from minidl.layers import Layer
    from minidl_emulator.ledger import current_label, labelled
    names = {id(layer): f"{name} ({type(layer).__name__})" for name, layer in model.named_layers()}
    names[id(model)] = "(model root: its forward between layers, e.g. the stacked conv1)"
    layer_call, function_call = Layer.__call__, Function.__call__

    def call_layer(self, *inputs):
        with labelled(names.get(id(self), current_label())):
            return layer_call(self, *inputs)

    def labelled_backward(backward):
        def run(self, *gys):
            with labelled(f"{getattr(self, '_cost_label', '') or 'model'} backward"):
                return backward(self, *gys)
        return run

    def call_function(self, *inputs):
        self._cost_label = current_label()
        cls = type(self)
        if "_cost_labelled" not in cls.__dict__:
            cls.backward, cls._cost_labelled = labelled_backward(cls.backward), True
        return function_call(self, *inputs)
    Layer.__call__, Function.__call__ = call_layer, call_function


READ_LABEL = "the interval's read"  # the guard's one blocking read, once per log interval


def run_step(devices: list[str], batch_size: int, model_path: str, precision: str = "tf32") -> list:
    """The ledger entries of one training step as the trainer takes it, after one warm-up step.

    The batch comes as training feeds it (minidl.training.train): uint8 crops through the loader's
    InputFeed (pinned, finished on the input device), int32 labels uploaded to the output device,
    then minidl.training.step.train_step judged by a StepGuard, and the guard's one blocking read
    (once per log interval; taken after this step, so the prediction counts it every step). `precision`:
    minidl.precision's; fp16 steps with loss scaling, as the trainer takes them.
    """
    os.environ["MINIDL_EMULATE_GPUS"] = str(max(int(d.split(":")[1]) for d in devices) + 1)
    import numpy as np

    from minidl.core import Tensor
    from minidl.data.augment import Crops
    from minidl.functions.to_input import InputFeed
    from minidl.loss_scale import DynamicLossScale
    from minidl.optim import MomentumSGD
    from minidl.precision import set_precision
    from minidl.training.model_file import load_model_file
    from minidl.training.step import StepGuard, labels_on_output, train_step
    from minidl.training.train import fp16_needs_scaling
    from minidl_emulator.ledger import LEDGER, labelled

    set_precision(precision)

    model_file = load_model_file(model_path)
    config = model_file.config
    model = model_file.build(1000, devices, config["init"], 0)
    optimizer = MomentumSGD(model.params(), config["lr"], config["momentum"], config["weight_decay"])
    guard = StepGuard(model, optimizer, skip=False, loss_scale=DynamicLossScale() if fp16_needs_scaling() else None)
    rng = np.random.default_rng(0)
    size = config["input_size"]
    feed = InputFeed(model.input_device, rng.uniform(0, 255, (size + 32, size + 32, 3)).astype(np.float32), 1 / 64)
    attribute_to_layers(model)
    for step in range(2):
        crops = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        where = Crops(*(rng.integers(0, 33, batch_size) for _ in range(2)), rng.integers(0, 2, batch_size))
        shift = rng.standard_normal((batch_size, 3)).astype(np.float32)
        labels = rng.integers(0, 1000, batch_size).astype(np.int32)
        mark = LEDGER.mark()
        with labelled("input"):
            x, y = feed(crops, where, shift, labels)  # the labels with the crops, as the trainer's loader sends them
            x, y = Tensor(x, device=model.input_device), labels_on_output(y, model)
        with labelled("loss, verdict, update"):  # the layers' own labels inside
            logits, loss = train_step(model, optimizer, x, y, step, checked=True, guard=guard, position=step)
        with labelled(READ_LABEL):
            guard.read()
        entries = LEDGER.since(mark)
        del logits, loss
    return entries


def by_layer(ms_by_label: dict) -> dict:
    """{layer: [forward ms, backward ms]} from the ledger's labels, a layer of either tower counted as one."""
    layers = {}
    for label, ms in ms_by_label.items():
        layer = re.sub(r"^tower\d+\.", "", label.removesuffix(" backward")) or "(unlabelled)"
        layers.setdefault(layer, [0.0, 0.0])[label.endswith(" backward")] += ms
    return dict(sorted(layers.items(), key=lambda item: -sum(item[1])))


def report(prediction, entries, args) -> dict:
    from minidl_emulator import roofline
    summary = roofline.summarize(entries)
    precision = getattr(args, "precision", "tf32")
    result = dict(gpu=args.gpu, devices=args.devices, batch_size=args.batch_size, precision=precision,
                  **prediction, **summary)
    print(f"{args.gpu.upper()}, devices {args.devices}, batch {args.batch_size}, {precision}: "
          f"predicted {prediction['ms_per_step']:.2f} ms a step "
          f"(device busy {prediction['device_ms']:.2f} ms, host issue {prediction['host_ms']:.2f} ms, "
          f"{prediction['segments']} segment(s) between blocking reads)")
    read = sum(e.kind != "sync" for e in entries if e.label == READ_LABEL)
    result["read_operations"] = read
    per_gpu = collections.Counter(e.device for e in entries if e.kind != "sync" and e.label != READ_LABEL)
    result["device_operations_per_gpu"] = {f"cuda:{d}": n for d, n in sorted(per_gpu.items())}
    split = "" if len(per_gpu) < 2 else " (" + ", ".join(f"{n} on cuda:{d}" for d, n in sorted(per_gpu.items())) + ")"
    print(f"device operations a step: {summary['device_operations'] - read}{split}, and {read} in the read of a log "
          f"interval; blocking reads: {summary['blocking_reads']} (that read), "
          f"hidden copies: {summary['hidden_copies']} ({summary['hidden_copy_bytes'] / 1e9:.2f} GB)")
    print("GEMM GFLOP by compute unit: " + ", ".join(f"{unit} {flops / 1e9:.1f}"
                                                    for unit, flops in summary["gemm_flops_by_unit"].items()))
    print("device ms by kind:")
    for kind, ms in prediction["ms_by_kind"].items():
        if kind != "sync":  # host time, in the segments
            print(f"  {kind:22s} {ms:8.3f}")
    layers = by_layer(prediction["ms_by_label"])
    if layers:
        print("device ms by layer, both towers together (forward, backward):")
        for layer, (forward, backward) in layers.items():
            print(f"  {layer[:50]:50s} {forward:8.3f} {backward:8.3f}")
        result["ms_by_layer"] = layers
    print("device ms by operation (top 15):")
    for name, ms, count in prediction["ms_by_name"][:15]:
        print(f"  {name[:60]:60s} {count:4d}x {ms:8.3f}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="cuda:0,cuda:1")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--gpu", default="h100", choices=("h100", "h200", "a100"))
    parser.add_argument("--model", default=os.path.join(os.path.dirname(HERE), "models", "alexnet.py"))
    parser.add_argument("--json", help="write the prediction and the ledger's summary here")
    parser.add_argument("--ledger", help="save the measured step's ledger here (JSON)")
    parser.add_argument("--precision", default="tf32", choices=("tf32", "fp32", "fp16", "bf16"))
    parser.add_argument("--from-ledger", help="model this saved ledger instead of running a step")
    args = parser.parse_args(argv)
    from minidl_emulator import ledger, roofline
    if args.from_ledger:
        with open(args.from_ledger) as f:
            saved = json.load(f)
        entries = [ledger.Entry(**e) for e in saved["entries"]]
        args.devices, args.batch_size = saved["devices"], saved["batch_size"]
        args.precision = saved.get("precision", "tf32")
    else:
        started = time.perf_counter()
        entries = run_step(args.devices.split(","), args.batch_size, args.model, args.precision)
        print(f"(emulated in {time.perf_counter() - started:.0f} s)", file=sys.stderr)
        if args.ledger:
            with open(args.ledger, "w") as f:
                json.dump(dict(devices=args.devices, batch_size=args.batch_size, precision=args.precision,
                               entries=[dataclasses.asdict(e) for e in entries]), f)
    prediction = roofline.predict(entries, roofline.GPUS[args.gpu])
    result = report(prediction, entries, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
