"""summary(): each layer with its device, output shape and parameter count."""
import numpy as np

from minidl.core import Tensor, no_grad


def summary(model, input_shape, device=None):
    """The table as a string, from one forward pass of a random batch of `input_shape`."""
    if device is None:
        device = next((l.device for _, l in model.named_layers() if l.device is not None), "cpu")
    names = {id(l): name for name, l in model.named_layers()}
    x = Tensor(np.random.default_rng(0).standard_normal(input_shape).astype(np.float32), device=device)
    was_training = model.training
    calls = []
    removers = [layer.register_forward_hook(lambda l, inputs, y: calls.append((l, y.shape)))
                for _, layer in model.named_layers()]
    try:
        with no_grad():
            model.eval()(x)
    finally:
        for remove in removers:
            remove()
        model.train(was_training)
    rows = [(names.get(id(l), type(l).__name__), l.describe(), str(l.device), str(tuple(shape)),
             sum(p.size for p in l._params.values()))
            for l, shape in calls if not l._layers]  # leaves only: containers repeat their children
    header = ("layer", "type", "device", "output", "params")
    table = [header] + [r[:4] + (f"{r[4]:,}",) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("-" * len(lines[0]))
    lines.append(f"total parameters: {model.num_params():,}")
    return "\n".join(lines)
