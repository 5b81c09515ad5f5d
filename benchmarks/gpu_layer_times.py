"""Time each layer of AlexNet's training step on a GPU, forward and backward, with device events.

    python benchmarks/gpu_layer_times.py --batch-size 128 --steps 5 --json OUT.json

Both towers on one device (cuda:0,cuda:0), so all the step's work is on one stream and the
time between two events is the work enqueued between them. An event is recorded at every
change of the innermost layer (forward: the layer's call; backward: each Function's backward
under its forward's layer, "<layer> backward"; "(update)": the optimizer), and each interval
is charged to the label in force, so nested layers are not counted twice. Labels follow
benchmarks/time_model.py (a layer of either tower counted as one), so the two compare per layer.
Runs on emulated GPUs too (MINIDL_EMULATE_GPUS=2), where the times are the host's.
"""
import argparse
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT_LABEL = "(model root: its forward between layers, e.g. the stacked conv1)"  # time_model.py's


class Timeline:
    """Events on one stream at each change of label; `charged()` the ms between them, per label."""

    def __init__(self, device):
        self.device, self.labels, self.marks = device, [""], []

    def enter(self, label):
        self.labels.append(label)
        self._mark()

    def leave(self):
        self.labels.pop()
        self._mark()

    def _mark(self):
        with self.device:
            self.marks.append((self.labels[-1], self.device.stream.record()))

    def charged(self):
        cp = self.device.xp
        totals = {}
        self.marks[-1][1].synchronize()
        for (label, start), (_, end) in zip(self.marks, self.marks[1:]):
            totals[label or "(unlabelled)"] = totals.get(label or "(unlabelled)", 0.0) + \
                cp.cuda.get_elapsed_time(start, end)
        self.marks = self.marks[-1:]
        return totals


def instrument(model, optimizer, guard, timeline):
    """Mark every layer's call, every Function's backward (under its forward's layer), the step's
    check (StepGuard) and the update."""
    from minidl import functions  # noqa: F401 -- every Function subclass defined
    from minidl.core import Function
    from minidl.layers import Layer
    names = {id(layer): f"{name} ({type(layer).__name__})" for name, layer in model.named_layers()}
    names[id(model)] = ROOT_LABEL
    layer_call, function_call = Layer.__call__, Function.__call__

    def call_layer(self, *inputs):
        timeline.enter(names.get(id(self), timeline.labels[-1]))
        try:
            return layer_call(self, *inputs)
        finally:
            timeline.leave()

    def call_function(self, *inputs):
        self.timing_label = timeline.labels[-1]
        return function_call(self, *inputs)

    def timed_backward(backward):
        def run(self, *grads):
            timeline.enter(f"{getattr(self, 'timing_label', '') or '(unlabelled)'} backward")
            try:
                return backward(self, *grads)
            finally:
                timeline.leave()
        return run
    Layer.__call__, Function.__call__ = call_layer, call_function
    classes, seen = [Function], set()  # the base dispatches to backward_cpu or backward_gpu
    while classes:
        cls = classes.pop()
        if cls in seen:
            continue
        seen.add(cls)
        classes += cls.__subclasses__()
        if "backward" in cls.__dict__:
            cls.backward = timed_backward(cls.__dict__["backward"])
    for owner, method, label in ((optimizer, "step", "(update)"), (guard, "check", "(the step's check)")):
        setattr(owner, method, _labelled(getattr(owner, method), label, timeline))


def _labelled(call, label, timeline):
    def run(*args, **kwargs):
        timeline.enter(label)
        try:
            return call(*args, **kwargs)
        finally:
            timeline.leave()
    return run


def by_layer(ms_by_label):
    """{layer: [forward ms, backward ms]}, a layer of either tower counted as one (time_model.by_layer)."""
    layers = {}
    for label, ms in ms_by_label.items():
        layer = re.sub(r"^tower\d+\.", "", label.removesuffix(" backward")) or "(unlabelled)"
        layers.setdefault(layer, [0.0, 0.0])[label.endswith(" backward")] += ms
    return dict(sorted(layers.items(), key=lambda item: -sum(item[1])))


def measure(model_path, batch_size, steps, warmup):
    import numpy as np
    from minidl.core import Tensor
    from minidl.optim import MomentumSGD
    from minidl.training.model_file import load_model_file
    from minidl.training.step import StepGuard, train_step
    model_file = load_model_file(model_path)
    config = model_file.config
    devices = model_file.devices_for("cuda:0,cuda:0")
    model = model_file.build(1000, devices, config["init"], 0)
    optimizer = MomentumSGD(model.params(), config["lr"], config["momentum"], config["weight_decay"])
    guard = StepGuard(model, optimizer, skip=False)
    rng = np.random.default_rng(0)
    size = config["input_size"]
    x = Tensor(rng.standard_normal((batch_size, 3, size, size)).astype(np.float32), device=model.input_device)
    y = Tensor(rng.integers(0, 1000, batch_size).astype(np.int32), device=model.output_device)
    timeline = Timeline(model.output_device)
    instrument(model, optimizer, guard, timeline)
    per_step = []
    for i in range(warmup + steps):
        timeline.enter("")
        train_step(model, optimizer, x, y, i, checked=True, guard=guard, position=i)
        timeline.leave()
        charged = timeline.charged()
        if i >= warmup:
            per_step.append(charged)
    guard.read()
    labels = sorted({label for step in per_step for label in step})
    mean = {label: statistics.fmean(step.get(label, 0.0) for step in per_step) for label in labels}
    return dict(devices="cuda:0,cuda:0", batch_size=batch_size, steps=steps,
                ms_per_step=statistics.median(sum(step.values()) for step in per_step),
                ms_by_label=mean, ms_by_layer=by_layer(mean))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.path.join(os.path.dirname(HERE), "models", "alexnet.py"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    result = measure(args.model, args.batch_size, args.steps, args.warmup)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"measured {result['ms_per_step']:.2f} ms a step (cuda:0,cuda:0, batch {args.batch_size}); by layer "
          "(forward, backward):")
    for layer, (forward, backward) in result["ms_by_layer"].items():
        print(f"  {layer[:50]:50s} {forward:8.3f} {backward:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
